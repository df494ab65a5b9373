"""Local token counts, so usage is known even when the provider reports none (aborted or cut
streams), and so a budget can be watched while a stream runs.

Models of the OpenAI families are counted exactly with tiktoken over the BPE files shipped in
this package (`encodings/`, gzipped, checked against the SHA-256 that tiktoken publishes for
them): nothing is downloaded, ever. Plain `tiktoken.get_encoding()` would fetch its files from
the network on first use, so it is never called here.

Any other model (Llama, Qwen, Mistral behind vLLM, Ollama, ...) has its own tokenizer that we do
not ship; it falls back to `estimate_tokens`, a heuristic that comes within ~10% of BPE
tokenizers on English prose and code, erring high (a safe side for budgets). Its counts are
marked as not exact (`Tokenizer.exact`)."""

from __future__ import annotations

import binascii
import gzip
import hashlib
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Mapping, Sequence

__all__ = ["Tokenizer", "count_chat_tokens", "count_tokens", "encoding", "estimate_tokens", "tokenizer_for"]

# Per the OpenAI cookbook: every chat message costs its content, its role and 3 tokens of framing;
# the reply is primed with 3 more. Exact for the gpt-4o/gpt-4.1/gpt-3.5-turbo families.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

# name -> (file under encodings/, SHA-256 of the uncompressed file as published by tiktoken,
#          pre-tokenizer pattern, special tokens); patterns copied from tiktoken_ext.openai_public.
_O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_ENCODINGS: dict[str, tuple[str, str, str, dict[str, int]]] = {
    "o200k_base": (
        "o200k_base.tiktoken.gz",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PATTERN,
        {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
    "cl100k_base": (
        "cl100k_base.tiktoken.gz",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PATTERN,
        {_ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
         _ENDOFPROMPT: 100276},
    ),
}
# Encodings tiktoken knows whose ordinary-text tokens are those of one we ship.
_SAME_AS = {"o200k_harmony": "o200k_base"}

HEURISTIC = "heuristic"
_PIECES = re.compile(r"\w+|[^\w\s]|\s+")
_load_lock = threading.Lock()


def estimate_tokens(text: str) -> int:
    """The fallback for models whose tokenizer we do not ship: a word (with the space before it)
    or a punctuation mark is about one token, a word of more than 10 letters one more per 10."""
    if not text:
        return 0
    total = 0
    for piece in _PIECES.findall(text):
        if piece.isspace():
            total += piece.count("\n\n")  # paragraph breaks are tokens of their own
            continue
        total += 1 + (len(piece) - 1) // 10
    return total


@dataclass(frozen=True)
class Tokenizer:
    """How one model's text is counted: `name` is the BPE encoding, or "heuristic"."""

    name: str
    exact: bool
    _count: Callable[[str], int]

    def count(self, text: str) -> int:
        if len(text) < REMEMBERED_FROM_CHARS:
            return self._count(text) if text else 0
        return _remembered_count(self, text)

    def count_chat(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Prompt tokens of a chat completion request with these messages."""
        return sum(
            TOKENS_PER_MESSAGE + self.count(message.get("role", "")) + self.count(message.get("content") or "")
            for message in messages
        ) + TOKENS_PER_REPLY


# A call's prompt and answer are counted twice: by the provider (what it sent, or its usage as the
# fake reports it) and by the run (its ledger, its budget). The last long texts are remembered, so
# each is tokenized once; a short one (a streamed delta) costs less to count than to look up.
REMEMBERED_FROM_CHARS = 256


@lru_cache(maxsize=64)
def _remembered_count(tokenizer: Tokenizer, text: str) -> int:
    return tokenizer._count(text)


def encoding(name: str):
    """The tiktoken Encoding `name`, built from the files shipped in this package."""
    name = _SAME_AS.get(name, name)
    if name not in _ENCODINGS:
        raise KeyError(f"no BPE file is shipped for encoding {name!r}; shipped: {sorted(_ENCODINGS)}")
    with _load_lock:  # building one takes ~0.5 s: do it once, even when threads race for it
        return _build_encoding(name)


@lru_cache(maxsize=None)
def _build_encoding(name: str):
    import tiktoken

    filename, sha256, pattern, special_tokens = _ENCODINGS[name]
    data = gzip.decompress((resources.files("rtqcc.writing") / "encodings" / filename).read_bytes())
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"the shipped BPE file {filename} is damaged: its SHA-256 is not {sha256}")
    fields = data.split()  # "<token in base64> <rank>" a line
    ranks = dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


@lru_cache(maxsize=256)
def tokenizer_for(model: str) -> Tokenizer:
    """The tokenizer of `model`: exact for the OpenAI families tiktoken maps to an encoding we
    ship (gpt-4o, gpt-4.1, gpt-5, o-series, gpt-4, gpt-3.5-turbo, ...; dated snapshots, `ft:`
    fine-tunes and an `openai/` prefix included), the heuristic for any other."""
    name = _encoding_name(model)
    if name is None:
        return Tokenizer(HEURISTIC, False, estimate_tokens)
    enc = encoding(name)
    # Text is counted as the model would read it: special-token strings are ordinary text.
    return Tokenizer(enc.name, True, lambda text: len(enc.encode_ordinary(text)))


def _encoding_name(model: str) -> str | None:
    from tiktoken.model import encoding_name_for_model

    candidate = model.strip()
    if candidate.startswith("ft:"):
        candidate = candidate[3:].split(":", 1)[0]
    candidate = candidate.rsplit("/", 1)[-1] if candidate.startswith("openai/") else candidate
    try:
        name = encoding_name_for_model(candidate)
    except KeyError:
        return None
    name = _SAME_AS.get(name, name)
    return name if name in _ENCODINGS else None


def count_tokens(text: str, model: str) -> int:
    """Tokens of `text` for `model` (see `tokenizer_for` for which are exact)."""
    return tokenizer_for(model).count(text)


def count_chat_tokens(messages: Sequence[Mapping[str, str]], model: str) -> int:
    """Prompt tokens of a chat request, framing included, as OpenAI bills them."""
    return tokenizer_for(model).count_chat(messages)
