"""Section content and manuscripts in S3, under deterministic keys."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Protocol

from ..errors import ServiceUnavailable
from ..redact import redact_urls
from ..settings import Settings

log = logging.getLogger(__name__)

# Both clients alike: three tries, a connection within 3 s, an answer within 10.
TRIES = 3
CONNECT_TIMEOUT_S = 3
ANSWER_TIMEOUT_S = 10


def _make_client(settings: Settings) -> Any:
    """boto3's S3 client, for the bucket's management (making it, listing, deleting, signing URLs)."""
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": TRIES, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=ANSWER_TIMEOUT_S,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url or settings.localstack_host else None,
        # No CRC32 computed for every request and checked on every answer unless an operation
        # requires one: S3-compatible servers (SeaweedFS, MinIO, LocalStack) that do not know the
        # newer checksum headers answer as they did.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if settings.localstack_host and not settings.s3_endpoint_url:
        # LocalStack's own client session finds its endpoint, and its test credentials unless some are set
        # (an S3 server playing LocalStack's edge may accept only its own).
        return _localstack_session(settings).client("s3", config=config)
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        aws_session_token=settings.aws_session_token,
        config=config,
    )


def _localstack_session(settings: Settings) -> Any:
    from localstack_client.session import Session

    configured = {"aws_access_key_id": settings.aws_access_key_id,
                  "aws_secret_access_key": settings.aws_secret_access_key}
    return Session(localstack_host=settings.localstack_host, region_name=settings.s3_region,
                   **{name: value for name, value in configured.items() if value})


# The objects' bytes go through obstore (Rust's object_store), not botocore: a section's PUT took
# 1.3-2.8 ms of a consumer's CPU in botocore, with the GIL held, against 0.1-0.2 ms (measured one
# after the other on the embedded SeaweedFS, 300 PUTs of 1.5 kB each), and with hundreds of jobs
# in flight those PUTs were a quarter of a consumer's CPU. Its runtime's threads do not survive a
# fork: a process forked after it was used would hang at its first PUT, so that raises instead.
_object_store_pid: int | None = None


def _make_object_store(settings: Settings) -> Any:
    """obstore's S3 store for the objects' bytes, configured as the boto3 client is: the same
    endpoint, region, credentials, tries and timeouts."""
    from datetime import timedelta

    from obstore.store import S3Store

    options: dict[str, Any] = {
        "client_options": {"connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S),
                           "timeout": timedelta(seconds=ANSWER_TIMEOUT_S)},
        "retry_config": {"max_retries": TRIES - 1, "retry_timeout": timedelta(seconds=TRIES * ANSWER_TIMEOUT_S),
                         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                                     "base": 2.0}},
        "region": settings.s3_region,
    }
    endpoint = settings.s3_endpoint_url
    if settings.localstack_host and not endpoint:
        from localstack_client.config import get_service_endpoint

        session = _localstack_session(settings)
        endpoint = get_service_endpoint("s3", settings.localstack_host)
        options.update(access_key_id=session.aws_access_key_id, secret_access_key=session.aws_secret_access_key)
    else:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = boto3.Session(aws_access_key_id=settings.aws_access_key_id,
                                aws_secret_access_key=settings.aws_secret_access_key,
                                aws_session_token=settings.aws_session_token, region_name=settings.s3_region)
        if session.get_credentials() is None:  # as botocore's NoCredentialsError at the first request
            raise _unavailable("find credentials for", settings.s3_bucket, RuntimeError(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the function a role"))
        # botocore renews expiring credentials 10 minutes ahead: holding each set 5 keeps them valid.
        options["credential_provider"] = Boto3CredentialProvider(session, ttl=timedelta(minutes=5))
    if endpoint:
        options["client_options"]["allow_http"] = endpoint.startswith("http://")
        return S3Store(settings.s3_bucket, endpoint=endpoint, virtual_hosted_style_request=False, **options)
    return S3Store(settings.s3_bucket, virtual_hosted_style_request=True, **options)


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
    """S3: the objects' bytes through obstore, the bucket's management through boto3. Each client
    is made on first use, once however many runs ask together (a consumer starting with a hundred
    jobs made a hundred clients, 40% of its CPU; and boto3's default session is not thread-safe):
    boto3 costs ~200 ms to import and set up, which a cold start that never touches S3 skips."""

    def __init__(self, make_client: Callable[[], Any], make_objects: Callable[[], Any], bucket: str):
        self._makers = {"client": make_client, "objects": make_objects}
        self._made: dict[str, Any] = {}
        self._making = threading.Lock()
        self.bucket = bucket

    def _made_once(self, name: str) -> Any:
        made = self._made.get(name)
        if made is None:
            with self._making:
                made = self._made.get(name)
                if made is None:
                    made = self._made[name] = self._makers[name]()
        return made

    @property
    def client(self) -> Any:
        """boto3's S3 client."""
        return self._made_once("client")

    @property
    def objects(self) -> Any:
        """obstore's S3 store, refused in a process forked from one that used it (it would hang)."""
        global _object_store_pid
        if _object_store_pid not in (None, os.getpid()):
            raise RuntimeError(f"S3 was used through obstore in process {_object_store_pid}, and its runtime"
                               f" does not survive a fork: start process {os.getpid()} with the spawn method")
        store = self._made_once("objects")
        _object_store_pid = os.getpid()
        return store

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3BlobStore":
        store = cls(lambda: _make_client(settings), lambda: _make_object_store(settings), settings.s3_bucket)
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
        import obstore
        from obstore.exceptions import BaseError

        attributes = {"Content-Type": content_type}
        if content_disposition:
            attributes["Content-Disposition"] = content_disposition
        try:
            obstore.put(self.objects, key, body, attributes=attributes)
        except BaseError as exc:
            raise _unavailable("store", key, exc) from exc

    def get(self, key: str) -> bytes:
        body = self.read_at_most(key, None)
        assert body is not None
        return body

    def read_at_most(self, key: str, limit_bytes: int | None) -> bytes | None:
        """The object's bytes, or None when it is larger than `limit_bytes` (then not downloaded)."""
        import obstore
        from obstore.exceptions import BaseError

        try:
            found = obstore.get(self.objects, key)
            if limit_bytes is not None and found.meta["size"] > limit_bytes:
                return None
            return bytes(found.bytes())
        except FileNotFoundError as exc:
            raise BlobMissing(key) from exc
        except BaseError as exc:
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
