"""Credentials of the embedded services: random, made once per data folder, kept there (mode 0600).

Each service keeps its own in its own folder, so a restart on the same data finds the same password
(the cluster, the URLs a running client holds) and a new folder gets new ones: nothing is a shipped
default and nothing is derived from another secret."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

CREDENTIALS_FILE = "credentials.json"
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700


class CredentialsError(RuntimeError):
    """A credentials file exists but cannot be used; the message names it."""


def random_password() -> str:
    # hex: safe unquoted in a URL's userinfo, a redis.conf line and a Postgres pwfile
    return secrets.token_hex(24)


def private_folder(path: Path) -> Path:
    """`path` as a folder only its owner can enter (made so, or narrowed if an older run left it open)."""
    path.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(PRIVATE_FOLDER)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, a file only its owner can read, from its first byte on (no umask window)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), PRIVATE_FILE)  # an existing file keeps its mode on O_CREAT
        handle.write(text)


def kept_credentials(folder: Path, make: Callable[[], dict[str, str]]) -> dict[str, str]:
    """The credentials kept in `folder`, made with `make()` on first use.

    Published with a hard link from a private temp file, so two starts racing on one folder agree on
    one set and neither reads a half-written file."""
    private_folder(folder)
    path = folder / CREDENTIALS_FILE
    if not path.exists():
        draft = folder / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        write_private(draft, json.dumps(make(), indent=2) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another start made them first: use those
        finally:
            draft.unlink()
    return _read(path)


def _read(path: Path) -> dict[str, str]:
    if stat.S_IMODE(path.lstat().st_mode) & 0o077:
        path.chmod(PRIVATE_FILE)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CredentialsError(f"cannot read the credentials in {path} ({error}); remove the file to make new ones "
                               "(the service's data in that folder must then go too)") from None
    if not isinstance(loaded, dict) or not all(isinstance(value, str) and value for value in loaded.values()):
        raise CredentialsError(f"{path} does not hold credentials; remove it to make new ones")
    return loaded
