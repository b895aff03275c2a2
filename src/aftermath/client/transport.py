"""The client's transport to the coordinator (and to a bucket): JSON calls, blobs and checkpoint files over
aiohttp, with retries and byte counters. Every request to the coordinator goes through `Transport._send`, where
fault injection (latency, loss, bandwidth) is applied; token batches from the data server are fetched by
aftermath.data.server and pass `Transport.gate` first, which injects the same latency and loss.

The bandwidth limit has a rate per direction (aftermath.faults: `--fault-bandwidth-up`, `--fault-bandwidth-down`):
what a request sends (commits with their payloads, heartbeats and every other body) is held to the upload rate
before it leaves; what it receives (blob GETs, from the coordinator or a bucket, checkpoint files, views and other
JSON answers) is held to the download rate once it has arrived. Requests to a bucket (object storage, an absolute
URL) go through `_send` too, without the session header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from aftermath.errors import AftermathError, ConfigError
from aftermath.faults import FaultInjector, InjectedDrop
from aftermath.round.protocol import COMMIT_WITH_BLOB, pack_commit
from aftermath.tls import certificate_error_message, fingerprint_mismatch_message


Answer = TypeVar("Answer", bound=BaseModel)


class CoordinatorError(AftermathError):
    """The coordinator answered with an error (status and its JSON message)."""

    def __init__(self, status: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"coordinator said {status}: {message}")
        self.status = status
        self.message = message
        self.data = data or {}


class Unreachable(AftermathError):
    """The coordinator could not be reached after the retries."""


@dataclass
class TransferStats:
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    retries: int = 0


class Transport:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, *, retries: int = 5, backoff: float = 0.2,
                 timeout: float = 60.0, faults: FaultInjector | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.retries = retries
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.auth: str | None = None
        self.stats = TransferStats()
        self.faults = faults  # injected latency, loss and bandwidth (aftermath.faults); None = a clean network

    # ------------------------------------------------------------------ the one exit
    async def _send(self, method: str, path: str, *, body: bytes | None = None,
                    content_type: str = "application/json", params: dict[str, Any] | None = None,
                    auth: bool = True, timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, bytes]:
        """One request with retries on connection errors, 5xx and 429; returns (status, body) of the final answer.

        With fault injection, every attempt is delayed, maybe dropped (handled as a lost connection: retried)
        and held to the bandwidth limits: its body to the upload rate, its answer to the download rate."""
        headers = {"Content-Type": content_type} if body is not None else {}
        absolute = path.startswith(("http://", "https://"))  # elsewhere than the coordinator: no session
        if auth and self.auth and not absolute:
            headers["Authorization"] = f"Bearer {self.auth}"
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                self.stats.requests += 1
                if self.faults is not None:  # latency, maybe a drop, then the body through the upload pipe
                    await self.faults.before_request(_kind(method, path), len(body or b""))
                async with self.session.request(method, path if absolute else self.base_url + path, data=body,
                                                headers=headers, params=params,
                                                timeout=timeout or self.timeout) as resp:
                    data = await resp.read()
                    status, retry_header = resp.status, resp.headers.get("Retry-After")
                self.stats.bytes_up += len(body or b"")
                self.stats.bytes_down += len(data)
                if self.faults is not None:  # the answer through the download pipe (outside the request's timeout)
                    await self.faults.after_response(len(data))
                retry_after = 0.0
                if status >= 500 or status == 429:  # 429: the coordinator's rate limit
                    last = CoordinatorError(status, data[:200].decode(errors="replace"))
                    retry_after = _retry_after(retry_header)
                else:
                    return status, data
            except aiohttp.ServerFingerprintMismatch as exc:  # not the pinned coordinator: no retry, nothing sent
                raise ConfigError(fingerprint_mismatch_message(exc)) from None
            except aiohttp.ClientConnectorCertificateError as exc:  # an untrusted certificate: no retry
                raise ConfigError(certificate_error_message(self.base_url, exc)) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, InjectedDrop) as exc:
                last = exc
                retry_after = 0.0
            if attempt < self.retries:
                self.stats.retries += 1
                await asyncio.sleep(max(delay, retry_after))
                delay = min(delay * 2, 5.0)
        where = path.split("?")[0] if absolute else self.base_url + path  # never a presigned URL's signature
        raise Unreachable(f"{method} {where} failed after {self.retries + 1} attempts: {last}")

    async def gate(self, kind: str) -> None:
        """Fault injection for a request that does not go through `_send` (token batches from the data server):
        latency, maybe a drop (raises InjectedDrop; the caller retries)."""
        if self.faults is not None:
            await self.faults.before_request(kind, 0)

    async def received(self, nbytes: int) -> None:
        """Count `nbytes` that came from elsewhere than `_send` (token batches) and hold them to the download
        limit of the fault injector."""
        self.stats.bytes_down += nbytes
        if self.faults is not None:
            await self.faults.after_response(nbytes)

    # ------------------------------------------------------------------ calls
    async def call(self, method: str, path: str, payload: dict[str, Any] | None = None, *,
                   params: dict[str, Any] | None = None, auth: bool = True,
                   timeout: float | None = None) -> dict[str, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = await self._send(method, path, body=body, params=params, auth=auth,
                                        timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None)
        try:
            parsed = json.loads(data) if data else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = {"error": data[:200].decode(errors="replace")}
        if status >= 400:
            raise CoordinatorError(status, parsed.get("error", "?") if isinstance(parsed, dict) else str(parsed),
                                   parsed if isinstance(parsed, dict) else None)
        return parsed

    async def call_model(self, method: str, path: str, request: BaseModel | None, answer: type[Answer], *,
                         params: dict[str, Any] | None = None, auth: bool = True,
                         timeout: float | None = None) -> Answer:
        """A call whose body and answer are protocol models (aftermath.round.protocol)."""
        body = None if request is None else request.model_dump(mode="json", by_alias=True)
        data = await self.call(method, path, body, params=params, auth=auth, timeout=timeout)
        try:
            return answer.model_validate(data)
        except ValidationError as exc:
            raise CoordinatorError(502, f"{method} {path} answered something that is not a {answer.__name__} "
                                        f"({exc.error_count()} problems, first: {exc.errors()[0]['msg']}); is the "
                                        f"coordinator another version of Aftermath?") from exc

    async def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        status, body = await self._send("PUT", f"/blobs/{sha}", body=data, content_type="application/octet-stream")
        if status >= 400:
            raise CoordinatorError(status, body[:300].decode(errors="replace"))
        return sha

    async def commit(self, request: BaseModel, blob: bytes) -> None:
        """POST /commit with the payload in the same request (aftermath.round.protocol.pack_commit)."""
        status, body = await self._send("POST", "/commit", body=pack_commit(request, blob),
                                        content_type=COMMIT_WITH_BLOB)
        if status >= 400:
            try:
                message = json.loads(body).get("error", "?")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                message = body[:300].decode(errors="replace")
            raise CoordinatorError(status, message)

    async def get_bytes(self, path: str, sha256: str | None = None, auth: bool = True) -> bytes:
        """GET raw bytes; with `sha256`, the bytes are checked (a damaged transfer is retried once more)."""
        for attempt in range(2):
            status, body = await self._send("GET", path, auth=auth)
            if status >= 400:
                raise CoordinatorError(status, body[:300].decode(errors="replace"))
            if sha256 is None or hashlib.sha256(body).hexdigest() == sha256:
                return body
        raise CoordinatorError(502, f"{path}: the bytes received do not hash to {sha256}")

    async def get_blob(self, sha256: str, url: str | None = None) -> bytes:
        """A blob from the coordinator, or from `url` (object storage); sha256-checked either way."""
        return await self.get_bytes(url or f"/blobs/{sha256}", sha256)


def _kind(method: str, path: str) -> str:
    if path.startswith("/blobs/") or path.startswith(("http://", "https://")):  # the latter: object storage
        return "blob_up" if method == "PUT" else "blob_down"
    if path == "/commit":  # it carries the payload
        return "blob_up"
    if path.startswith("/checkpoint/files/"):
        return "checkpoint_file"
    return "json"


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), 10.0) if value else 0.0
    except ValueError:
        return 0.0
