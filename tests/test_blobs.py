"""Content in S3: through boto3 against an endpoint, or through localstack-client."""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

from rtqcc.store.blobs import (EXPECT_CONTINUE_ABOVE_BYTES, BlobMissing, S3BlobStore, _make_client, manuscript_key,
                               section_key)
from rtqcc.settings import Settings

import pytest


def test_keys_are_deterministic():
    assert section_key("RTQCC-X", 3) == "manuscripts/RTQCC-X/sections/3.md"
    assert manuscript_key("RTQCC-X") == "manuscripts/RTQCC-X/manuscript.md"


def test_the_client_is_made_on_first_use(base_settings, blob_store):
    store = S3BlobStore.from_settings(base_settings.with_overrides(s3_create_bucket=False))
    assert callable(store._client)  # nothing built yet: a cold start that never stores pays nothing
    store.put("probe/first-use.md", b"x")
    assert not callable(store._client) or hasattr(store._client, "put_object")


def test_runs_storing_their_first_sections_together_share_one_client(base_settings, blob_store):
    settings = base_settings.with_overrides(s3_create_bucket=False)
    made = []

    def make_client():
        made.append(_make_client(settings))
        return made[-1]

    store = S3BlobStore(make_client, blob_store.bucket)
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


def test_only_a_large_body_waits_for_the_servers_go_ahead(base_settings, blob_store):
    client = _make_client(base_settings.with_overrides(s3_create_bucket=False))
    expect_sent = {}

    def sending(request, **_):
        expect_sent[request.url.rsplit("/", 1)[-1]] = request.headers.get("Expect")

    client.meta.events.register("before-send.s3.PutObject", sending)
    store = S3BlobStore(lambda: client, blob_store.bucket)
    small, large = b"a section" * 500, os.urandom(EXPECT_CONTINUE_ABOVE_BYTES + 1)
    store.put("probe/small.md", small)
    store.put("probe/large.bin", large, "application/octet-stream")
    assert expect_sent == {"small.md": None, "large.bin": b"100-continue"}
    assert store.get("probe/small.md") == small and store.get("probe/large.bin") == large


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
