"""Content in S3: through boto3 against an endpoint, or through localstack-client."""

from __future__ import annotations

import os
import signal
import threading
from urllib.parse import urlsplit

from rtqcc.store.blobs import (BlobMissing, S3BlobStore, _make_client, _make_object_store, manuscript_key,
                               section_key)
from rtqcc.errors import ServiceUnavailable
from rtqcc.settings import Settings

import pytest


def test_keys_are_deterministic():
    assert section_key("RTQCC-X", 3) == "manuscripts/RTQCC-X/sections/3.md"
    assert manuscript_key("RTQCC-X") == "manuscripts/RTQCC-X/manuscript.md"


def test_the_clients_are_made_on_first_use_and_a_put_needs_no_boto3_client(base_settings, blob_store):
    store = S3BlobStore.from_settings(base_settings.with_overrides(s3_create_bucket=False))
    assert not store._made  # nothing built yet: a cold start that never stores pays nothing
    store.put("probe/first-use.md", b"x")
    assert set(store._made) == {"objects"}
    assert store.get("probe/first-use.md") == b"x"


def test_runs_storing_their_first_sections_together_share_one_client(base_settings, blob_store):
    settings = base_settings.with_overrides(s3_create_bucket=False)
    made = []

    def make_objects():
        made.append(_make_object_store(settings))
        return made[-1]

    store = S3BlobStore(lambda: _make_client(settings), make_objects, blob_store.bucket)
    together = threading.Barrier(16)

    def first_put(n: int) -> None:
        together.wait()
        store.put(f"probe/together-{n}.md", b"x")

    threads = [threading.Thread(target=first_put, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert sorted(store.keys_under("probe/together-")) == sorted(f"probe/together-{n}.md" for n in range(16))


def test_an_object_keeps_its_type_and_file_name_and_a_read_stops_at_a_limit(blob_store):
    body = "# Chapter\n\nhéllo".encode()
    blob_store.put("probe/typed.md", body, "text/markdown; charset=utf-8",
                   content_disposition='attachment; filename="chapter.md"')
    stored = blob_store.client.head_object(Bucket=blob_store.bucket, Key="probe/typed.md")
    assert stored["ContentType"] == "text/markdown; charset=utf-8"
    assert stored["ContentDisposition"] == 'attachment; filename="chapter.md"'
    assert blob_store.read_at_most("probe/typed.md", len(body)) == body
    assert blob_store.read_at_most("probe/typed.md", len(body) - 1) is None
    with pytest.raises(BlobMissing):
        blob_store.read_at_most("probe/never-stored.md", 10)


def test_a_process_forked_after_storing_is_refused_instead_of_hanging(blob_store):
    blob_store.put("probe/before-fork.md", b"x")
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report what its put did, and die rather than hang past the alarm
        signal.alarm(60)
        try:
            blob_store.put("probe/after-fork.md", b"y")
            outcome = "stored"
        except RuntimeError as exc:
            outcome = str(exc)
        os.write(writing, outcome.encode())
        os._exit(0)
    os.close(writing)
    try:
        with os.fdopen(reading, "rb") as pipe:
            outcome = pipe.read().decode()
    finally:
        os.waitpid(child, 0)
    assert "spawn" in outcome and str(os.getpid()) in outcome


def test_a_localstack_host_gives_a_localstack_client_session(s3_endpoint, blob_store):
    host = urlsplit(s3_endpoint).netloc  # the S3 server plays LocalStack's edge
    settings = Settings.from_env({"LOCALSTACK_HOST": host, "S3_BUCKET": blob_store.bucket,
                                  # the S3 server's own identity: it refuses LocalStack's usual test/test
                                  "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                                  "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]})
    assert settings.s3_create_bucket and settings.s3_endpoint_url is None
    store = S3BlobStore.from_settings(settings)
    assert store.client.meta.endpoint_url == f"http://{host}"
    store.put("a/b.md", "héllo".encode())
    assert store.get("a/b.md").decode() == "héllo"
    with pytest.raises(BlobMissing):
        store.get("a/missing.md")


def test_storage_without_credentials_is_unavailable_to_the_tenant_and_says_why_in_the_log(
        base_settings, blob_store, monkeypatch, caplog):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # Nowhere else to look: no files, and no instance metadata (it is not on this machine).
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = base_settings.with_overrides(s3_create_bucket=False, aws_access_key_id=None,
                                            aws_secret_access_key=None, aws_session_token=None)
    store = S3BlobStore.from_settings(settings)
    with pytest.raises(ServiceUnavailable) as raised:
        store.put("probe/no-credentials.md", b"x")
    assert "credentials" not in str(raised.value)
    assert "no AWS credentials: set AWS_ACCESS_KEY_ID" in caplog.text
