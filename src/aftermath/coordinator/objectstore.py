"""Blob storage in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO), beside the embedded disk store.

Why: the embedded store (`blobs.BlobStore`) keeps every payload on the coordinator's disk and sends it to every
member through the coordinator's uplink; with many clients the blobs outgrow both. With `[storage] backend =
"s3"` the coordinator mirrors each validated blob (and each round's update) once to a bucket, and clients
download it from the bucket directly, through a presigned URL (or a public / CDN URL) the coordinator redirects
them to. The coordinator's own disk store keeps only the rounds in flight.

`S3BlobStore` has the interface and semantics of `BlobStore`: content-addressed (the key is the sha256 of the
bytes, checked before any upload), immutable (putting the same bytes twice is a no-op), bounded (`max_bytes` per
blob, `storage_cap` over all, counted in `total_bytes`). Keys are `{prefix}blobs/{sha[:2]}/{sha}`.

Credentials are never in the run config (it is served to clients): boto3's usual chain is used
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles, instance roles), on the coordinator only.
Every network failure surfaces as an `ObjectStoreError`, one line naming the endpoint and bucket and the fix.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from aftermath.coordinator.blobs import StorageFull, check_blob, is_sha256
from aftermath.errors import AftermathError, PayloadError
from aftermath.runconfig import StorageSection

NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
          "AllAccessDisabled", "Forbidden", "Unauthorized"}
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


class ObjectStoreError(AftermathError):
    """The object store (S3, R2, MinIO) cannot be reached, refuses the credentials, or lacks the bucket."""


class S3BlobStore:
    """A content-addressed blob store in an S3-compatible bucket; see the module docstring.

    Safe to use from several threads (the coordinator's event loop thread and its worker): the boto3 client is
    thread-safe, and the byte accounting is under a lock."""

    def __init__(self, bucket: str, max_bytes: int, *, prefix: str = "", endpoint_url: str = "",
                 region: str = "us-east-1", presign_seconds: int = 900, public_base_url: str = "",
                 session: boto3.session.Session | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3) -> None:
        """`session` carries explicit credentials (tests); None = boto3's default credential chain. Raises
        ObjectStoreError when the bucket does not exist, the credentials are refused or the endpoint is down."""
        self.bucket = bucket
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.presign_seconds = presign_seconds
        self.public_base_url = public_base_url.rstrip("/")
        self.where = f"{endpoint_url or f'AWS S3 ({region})'} bucket {bucket!r}"
        config = Config(
            region_name=region, signature_version="s3v4", connect_timeout=connect_timeout,
            read_timeout=read_timeout, retries={"mode": "standard", "max_attempts": max_attempts},
            # a custom endpoint (MinIO, R2, a test server) is addressed path-style: http://host/bucket/key
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # only the checksums S3 requires: some S3-compatible stores refuse boto3's default extra checksums
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        try:
            self.client = (session or boto3.session.Session()).client(
                "s3", endpoint_url=endpoint_url or None, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise ObjectStoreError(f"cannot set up the object store client for {self.where}: {exc}; check "
                                   f"storage.endpoint_url and storage.region") from exc
        self._lock = threading.Lock()
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND | {"NoSuchBucket"}:
                raise ObjectStoreError(f"bucket {bucket!r} does not exist at {endpoint_url or 'AWS S3'}: create it, "
                                       f"or fix storage.bucket / storage.endpoint_url") from exc
            raise self._error("open", exc) from exc
        except BotoCoreError as exc:
            raise self._error("open", exc) from exc
        self._sizes: dict[str, int] = {}  # key -> bytes, of the objects this store holds under its prefix
        for obj in self._list():
            self._sizes[obj["Key"]] = int(obj["Size"])

    @classmethod
    def from_section(cls, storage: StorageSection, max_bytes: int, **options: Any) -> "S3BlobStore":
        """The store a `[storage]` section (backend s3) describes; `options` go to the constructor (session,
        timeouts)."""
        if not storage.bucket:
            raise ObjectStoreError("storage.bucket is empty: set it to the name of an existing bucket")
        return cls(storage.bucket, max_bytes, prefix=storage.prefix, endpoint_url=storage.endpoint_url,
                   region=storage.region, presign_seconds=storage.presign_seconds,
                   public_base_url=storage.public_base_url, **options)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def key(self, sha256: str) -> str:
        if not is_sha256(sha256):
            raise PayloadError(f"blob id {sha256!r} is not a sha256 (64 lowercase hex digits)")
        return f"{self.prefix}blobs/{sha256[:2]}/{sha256}"

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and self._head(self.key(sha256)) is not None

    def put(self, sha256: str, data: bytes, storage_cap: int | None = None) -> bool:
        """Store `data` under `sha256`; False when it was already there (nothing uploaded). Raises when the hash
        does not match, BlobTooLarge over max_bytes, and StorageFull when the store would exceed `storage_cap`."""
        key = self.key(sha256)
        check_blob(sha256, data, self.max_bytes)
        if self._head(key) is not None:
            return False
        with self._lock:  # reserve the bytes before the upload, so two concurrent puts cannot both pass the cap
            reserved = key not in self._sizes
            if reserved:
                held = sum(self._sizes.values())
                if storage_cap is not None and held + len(data) > storage_cap:
                    raise StorageFull(f"blob storage holds {held} bytes; {len(data)} more would pass the cap of "
                                      f"{storage_cap} (network.max_blob_storage_bytes); retry after the next round")
                self._sizes[key] = len(data)
        try:
            # content-addressed and immutable: a CDN in front of a public bucket may cache it for ever
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream",
                                   CacheControl="public, max-age=31536000, immutable")
        except (ClientError, BotoCoreError) as exc:
            if reserved:
                with self._lock:
                    self._sizes.pop(key, None)
            raise self._error("upload", exc, key) from exc
        return True

    def get(self, sha256: str) -> bytes:
        key = self.key(sha256)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                raise KeyError(sha256) from None
            raise self._error("download", exc, key) from exc
        except BotoCoreError as exc:
            raise self._error("download", exc, key) from exc

    def size(self, sha256: str) -> int:
        """The blob's bytes; KeyError when it is absent."""
        size = self._head(self.key(sha256))
        if size is None:
            raise KeyError(sha256)
        return size

    def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)  # no error when it is absent
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", exc, key) from exc
        with self._lock:
            self._sizes.pop(key, None)

    def clear(self) -> None:
        """Remove every object under `{prefix}blobs/` (those of other prefixes stay)."""
        keys = [obj["Key"] for obj in self._list()]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise self._error("clear", exc, f"{self.prefix}blobs/") from exc
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ObjectStoreError(
                    f"{self.where} refused to delete {len(answer['Errors'])} of {len(batch)} objects (first: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}); check that the "
                    f"credentials may delete objects")
        with self._lock:
            self._sizes.clear()

    def download_url(self, sha256: str) -> str:
        """Where a client downloads the blob without credentials: `{public_base_url}/{key}` when that is set,
        else a presigned GET URL valid `presign_seconds`. Computed locally: it does not check that the blob
        exists (a URL of an absent blob answers 404 or 403)."""
        key = self.key(sha256)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key)}"
        try:
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=self.presign_seconds)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("presign", exc, key) from exc

    # --- helpers ---------------------------------------------------------------------------------------------

    def _head(self, key: str) -> int | None:
        """The object's size, None when absent."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise self._error("look up", exc, key) from exc
        except BotoCoreError as exc:
            raise self._error("look up", exc, key) from exc

    def _list(self) -> list[dict[str, Any]]:
        """Every object under `{prefix}blobs/`, across pages."""
        objects: list[dict[str, Any]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=f"{self.prefix}blobs/"):
                objects.extend(page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", exc, f"{self.prefix}blobs/") from exc
        return objects

    def _error(self, action: str, exc: Exception, key: str = "") -> ObjectStoreError:
        """One line for a failed request: what failed, where, and what to check."""
        what = f"{action} {key}" if key else action
        if isinstance(exc, NoCredentialsError):
            return ObjectStoreError(f"no credentials for {self.where} ({what}): set AWS_ACCESS_KEY_ID and "
                                    f"AWS_SECRET_ACCESS_KEY in the coordinator's environment")
        if isinstance(exc, ClientError):
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "") or ""
            if code in DENIED:
                return ObjectStoreError(f"{self.where} denied {what} ({code}): check AWS_ACCESS_KEY_ID / "
                                        f"AWS_SECRET_ACCESS_KEY and that they may read and write the bucket")
            return ObjectStoreError(f"{self.where} refused {what}: {code} {message}".rstrip()
                                    + "; check storage.bucket, storage.region and storage.endpoint_url")
        if isinstance(exc, EndpointConnectionError) or "connect" in type(exc).__name__.lower():
            return ObjectStoreError(f"cannot reach the object store at {self.endpoint_url or 'AWS S3'} "
                                    f"(bucket {self.bucket!r}, {what}): check storage.endpoint_url, the network "
                                    f"and the credentials")
        return ObjectStoreError(f"{self.where}: {what} failed: {exc}; check storage.endpoint_url, storage.region "
                                f"and the credentials")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
