"""Section content and manuscripts in S3, under deterministic keys."""

from __future__ import annotations

from typing import Any, Protocol

from .errors import ServiceUnavailable
from .settings import Settings


def section_key(external_id: str, idx: int) -> str:
    return f"manuscripts/{external_id}/sections/{idx}.md"


def manuscript_key(external_id: str) -> str:
    return f"manuscripts/{external_id}/manuscript.md"


class BlobStore(Protocol):
    def put(self, key: str, body: bytes, content_type: str = "text/markdown; charset=utf-8") -> None: ...

    def get(self, key: str) -> bytes: ...

    def ping(self) -> None: ...


class BlobMissing(Exception):
    """The key names no object."""


class S3BlobStore:
    def __init__(self, client: Any, bucket: str):
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3BlobStore":
        # boto3 is heavy to import; only the routes and consumers that touch S3 pay for it.
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            aws_session_token=settings.aws_session_token,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=3,
                read_timeout=10,
                s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
            ),
        )
        store = cls(client, settings.s3_bucket)
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

    def put(self, key: str, body: bytes, content_type: str = "text/markdown; charset=utf-8") -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise ServiceUnavailable(f"Could not store {key} in S3 bucket {self.bucket}: {exc}",
                                     headers={"Retry-After": "2"}) from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise BlobMissing(key) from exc
            raise ServiceUnavailable(f"Could not read {key} from S3: {exc}", headers={"Retry-After": "2"}) from exc
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"Could not read {key} from S3: {exc}", headers={"Retry-After": "2"}) from exc

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)
