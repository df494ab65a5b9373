"""Section content and manuscripts in S3, under deterministic keys."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Protocol

from ..errors import ServiceUnavailable
from ..redact import redact_urls
from ..settings import Settings

log = logging.getLogger(__name__)


# botocore asks S3 to answer `Expect: 100-continue` before the body of every PUT, whatever its
# size: a round trip more, and a quarter of the CPU, for a section of a few kB. As the AWS SDK for
# Go does, ask only before a body worth not sending to a server that would refuse it.
EXPECT_CONTINUE_ABOVE_BYTES = 2 * 1024 * 1024


def _expect_continue_for_large_bodies(model: Any, params: dict, **_: Any) -> None:
    from botocore.utils import determine_content_length

    body = params.get("body")
    if (model.http.get("method") in ("PUT", "POST") and hasattr(body, "read")
            and (determine_content_length(body) or 0) > EXPECT_CONTINUE_ABOVE_BYTES):
        params["headers"]["Expect"] = "100-continue"


def _make_client(settings: Settings) -> Any:
    from botocore.handlers import add_expect_header

    client = _new_client(settings)
    client.meta.events.unregister("before-call.s3", add_expect_header)
    client.meta.events.register("before-call.s3", _expect_continue_for_large_bodies)
    return client


def _new_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=3,
        read_timeout=10,
        # One connection for each job a consumer runs at once (botocore's default pool is 10).
        max_pool_connections=max(10, settings.max_in_flight),
        s3={"addressing_style": "path"} if settings.s3_endpoint_url or settings.localstack_host else None,
        # No CRC32 computed for every PUT and checked on every GET unless an operation requires
        # one: a tenth of a PUT's CPU, and S3-compatible servers (SeaweedFS, MinIO, LocalStack)
        # that do not know the newer checksum headers answer as they did.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if settings.localstack_host and not settings.s3_endpoint_url:
        # LocalStack's own client session finds its endpoint, and its test credentials unless some are set
        # (an S3 server playing LocalStack's edge may accept only its own).
        from localstack_client.session import Session

        configured = {"aws_access_key_id": settings.aws_access_key_id,
                      "aws_secret_access_key": settings.aws_secret_access_key}
        return Session(localstack_host=settings.localstack_host, region_name=settings.s3_region,
                       **{name: value for name, value in configured.items() if value}).client("s3", config=config)
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        aws_session_token=settings.aws_session_token,
        config=config,
    )


def section_key(external_id: str, idx: int, version: int = 1) -> str:
    """Where a version of a section is stored: the first at the key it always had, each later one
    beside it. Deterministic, so a write retried after a crash lands on the same object."""
    if version == 1:
        return f"manuscripts/{external_id}/sections/{idx}.md"
    return f"manuscripts/{external_id}/sections/{idx}.v{version}.md"


def manuscript_key(external_id: str, revision: int = 0) -> str:
    """Where an assembly of the manuscript is stored: the first draft's, then one per revision."""
    if revision == 0:
        return f"manuscripts/{external_id}/manuscript.md"
    return f"manuscripts/{external_id}/manuscript.r{revision}.md"


def export_key(manuscript_key: str, extension: str) -> str:
    """Where an export of one assembly of the manuscript is stored: beside it, named after it
    (`manuscripts/{id}/exports/manuscript.r2.pdf` for `manuscripts/{id}/manuscript.r2.md`), so a
    revision, which makes a new manuscript key, makes new exports and the old ones stay whole."""
    folder, _, name = manuscript_key.rpartition("/")
    return f"{folder}/exports/{name.removesuffix('.md')}.{extension}"


def job_prefix(external_id: str) -> str:
    """Every object of a job is stored under this (sections, versions, manuscripts, exports)."""
    return f"manuscripts/{external_id}/"


def job_of_key(key: str) -> str:
    """The job whose prefix a key is under (a fork's rows name its source's objects)."""
    return key.split("/", 2)[1] if key.count("/") >= 2 else ""


class BlobStore(Protocol):
    def put(self, key: str, body: bytes, content_type: str = "text/markdown; charset=utf-8", *,
            content_disposition: str | None = None) -> None: ...

    def get(self, key: str) -> bytes: ...

    def read_at_most(self, key: str, limit_bytes: int | None) -> bytes | None: ...

    def presigned_get(self, key: str, *, expires_s: int = 300) -> str: ...

    def ping(self) -> None: ...

    def keys_under(self, prefix: str) -> list[str]: ...

    def delete(self, keys: list[str]) -> None: ...


class BlobMissing(Exception):
    """The key names no object."""


class S3BlobStore:
    """S3 through boto3. The client is made on first use: boto3 costs ~200 ms to import and set
    up, which a cold start that never touches S3 (an idle consumer, most API routes) skips."""

    def __init__(self, client: Any | Callable[[], Any], bucket: str):
        self._client = client
        self._making = threading.Lock()
        self.bucket = bucket

    @property
    def client(self) -> Any:
        if callable(self._client) and not hasattr(self._client, "put_object"):
            # Once, however many runs ask together (a consumer starting with a hundred jobs made a
            # hundred clients, 40% of its CPU; and boto3's default session is not thread-safe).
            with self._making:
                if callable(self._client) and not hasattr(self._client, "put_object"):
                    self._client = self._client()
        return self._client

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3BlobStore":
        store = cls(lambda: _make_client(settings), settings.s3_bucket)
        if settings.s3_create_bucket:
            store.ensure_bucket()
        return store

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put(self, key: str, body: bytes, content_type: str = "text/markdown; charset=utf-8", *,
            content_disposition: str | None = None) -> None:
        """Store `body`; `content_disposition`: the header S3 answers every download of it with
        (an export's file name, kept with the object rather than signed into each URL)."""
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"ContentDisposition": content_disposition} if content_disposition else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable("store", key, exc) from exc

    def get(self, key: str) -> bytes:
        body = self.read_at_most(key, None)
        assert body is not None
        return body

    def read_at_most(self, key: str, limit_bytes: int | None) -> bytes | None:
        """The object's bytes, or None when it is larger than `limit_bytes` (then not downloaded)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=key)
            if limit_bytes is not None and found["ContentLength"] > limit_bytes:
                found["Body"].close()
                return None
            return found["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise BlobMissing(key) from exc
            raise _unavailable("read", key, exc) from exc
        except BotoCoreError as exc:
            raise _unavailable("read", key, exc) from exc

    def presigned_get(self, key: str, *, expires_s: int = 300) -> str:
        """A URL that downloads the object without credentials until it expires."""
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=expires_s)

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def keys_under(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix` (all its pages)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [item["Key"] for page in pages for item in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable("list", prefix, exc) from exc

    def delete(self, keys: list[str]) -> None:
        """Delete the objects (a missing one is not an error), a thousand per request as S3 allows."""
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise _unavailable("delete", batch[0], exc) from exc
            failed = [error for error in answer.get("Errors", []) if error.get("Code") != "NoSuchKey"]
            if failed:
                raise _unavailable("delete", failed[0].get("Key", batch[0]), RuntimeError(failed[0].get("Message")))


_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


def _unavailable(verb: str, key: str, exc: Exception) -> ServiceUnavailable:
    # The tenant learns that storage is away; the endpoint and the error's details go to the log.
    log.warning("S3 could not %s %s: %s", verb, key, redact_urls(str(exc)))
    return ServiceUnavailable("Storage is unavailable; try again shortly.", headers={"Retry-After": "2"})
