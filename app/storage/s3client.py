"""The S3 client shared by the s3 lease and the s3 snapshot store: minio-py behind asyncio.to_thread."""

from __future__ import annotations

import asyncio
import io
import urllib.parse
from typing import Any

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from app.config import S3Config

# Codes under which S3 servers (AWS, MinIO, SeaweedFS) report a missing object.
_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_PRECONDITION = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_ACCESS = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


class ObjectStoreError(Exception):
    """The object store could not be reached or refused the request (message names endpoint and bucket)."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class S3Client:
    """One bucket under one key prefix; async methods, each a blocking minio call in a worker thread."""

    def __init__(self, cfg: S3Config, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> None:
        url = urllib.parse.urlsplit(cfg.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"s3.endpoint {cfg.endpoint!r} is not an http(s)://host:port URL")
        self.endpoint = cfg.endpoint
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix if not cfg.prefix or cfg.prefix.endswith("/") else cfg.prefix + "/"
        # Few, quick retries: a lease round must fail within a fraction of its TTL, not after
        # urllib3's default back-off; the caller's next round is the retry. A PUT is retried
        # only when it never reached the server (connect errors): a conditional PUT that timed
        # out may have been applied, and its replay would then fail with 412 and mislead us.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(
                total=2,
                backoff_factor=0.1,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=frozenset({"GET", "HEAD", "DELETE"}),
            ),
            maxsize=8,
        )
        self.minio = Minio(
            url.netloc,
            access_key=cfg.access_key or None,
            secret_key=cfg.secret_key or None,
            region=cfg.region or "us-east-1",  # a fixed region spares a GetBucketLocation per bucket
            secure=url.scheme == "https",
            http_client=http,
        )

    def key(self, *parts: str) -> str:
        """The object key of parts under the configured prefix."""
        return self.prefix + "/".join(parts)

    def _error(self, what: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, S3Error) and exc.code in _ACCESS:
            why = f"access denied ({exc.code}): check s3.access_key and s3.secret_key"
        elif isinstance(exc, S3Error):
            why = f"{exc.code}: {exc.message}"
        elif isinstance(exc, urllib3.exceptions.MaxRetryError):
            why = f"cannot reach the endpoint: {exc.reason}"
        else:
            why = repr(exc)
        return ObjectStoreError(f"S3 {self.endpoint} bucket {self.bucket!r}: {what}: {why}")

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as exc:
            if exc.code in _PRECONDITION or (exc.response is not None and exc.response.status == 412):
                raise PreconditionFailed(f"{what}: precondition failed") from exc
            raise self._error(what, exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._error(what, exc) from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket if it is missing."""
        if not await self._call("bucket_exists", self.minio.bucket_exists, self.bucket):
            try:
                await self._call("make_bucket", self.minio.make_bucket, self.bucket)
            except ObjectStoreError:
                # Another replica may have created it at the same moment.
                if not await self._call("bucket_exists", self.minio.bucket_exists, self.bucket):
                    raise

    async def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag (without quotes), or None when it does not exist."""

        def fetch() -> tuple[bytes, str] | None:
            try:
                response = self.minio.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING:
                    return None
                raise
            try:
                return response.read(), str(response.headers.get("etag", "")).strip('"')
            finally:
                response.close()
                response.release_conn()

        result: tuple[bytes, str] | None = await self._call(f"get {key}", fetch)
        return result

    async def put(self, key: str, data: bytes) -> None:
        """Write an object unconditionally (multipart when large)."""
        await self._call(f"put {key}", self.minio.put_object, self.bucket, key, io.BytesIO(data), len(data))

    async def put_if(self, key: str, data: bytes, *, etag: str | None) -> str:
        """Write only if the object is absent (etag None) or still has this ETag; the new ETag.

        PreconditionFailed when the condition does not hold. minio-py's put_object has no way
        to send If-None-Match / If-Match, so this goes through its `_put_object`, the single-PUT
        primitive that put_object itself uses and that passes headers as given (minio 7.2).
        """
        headers = {"If-None-Match": "*"} if etag is None else {"If-Match": f'"{etag}"'}
        try:
            result = await self._call(f"conditional put {key}", self.minio._put_object, self.bucket, key, data, headers)
        except ObjectStoreError as exc:
            # If-Match on an object that is gone: some servers answer 404 rather than 412.
            cause = exc.__cause__
            if etag is not None and isinstance(cause, S3Error) and cause.code in _MISSING:
                raise PreconditionFailed(f"conditional put {key}: the object is gone") from exc
            raise
        return str(result.etag or "").strip('"')

    async def delete(self, key: str) -> None:
        """Remove an object; a missing one is fine."""
        await self._call(f"delete {key}", self.minio.remove_object, self.bucket, key)

    async def list(self, prefix: str) -> list[str]:
        """Keys of every object under prefix (recursively)."""

        def names() -> list[str]:
            return [obj.object_name or "" for obj in self.minio.list_objects(self.bucket, prefix, recursive=True)]

        keys: list[str] = await self._call(f"list {prefix}", names)
        return keys

    async def close(self) -> None:
        """Drop pooled HTTP connections."""
        self.minio._http.clear()
