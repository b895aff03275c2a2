"""Content-addressed blob store: a payload is stored under the sha256 of its bytes, checked on receipt.

The blobs of the rounds in flight, in memory: a restarted coordinator redoes the rounds after its last
checkpoint, so a blob never needs to outlive the process, and a round's N uploads cost no file system work.
Blobs are immutable: putting the same bytes twice is a no-op. The store counts its bytes, so the owner can bound
them (`put(..., storage_cap)`; StorageFull beyond it), and the ledger collects the rounds no member needs.
"""

from __future__ import annotations

import hashlib
import re

from aftermath.errors import PayloadError

HEX64 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    return isinstance(text, str) and HEX64.fullmatch(text) is not None


class BlobTooLarge(PayloadError):
    pass


class StorageFull(PayloadError):
    """The blob store holds its cap of bytes; old rounds must be collected first."""


def check_blob(sha256: str, data: bytes, max_bytes: int) -> None:
    """A client's blob must fit `max_bytes` and hash to its id (BlobTooLarge, PayloadError)."""
    if len(data) > max_bytes:
        raise BlobTooLarge(f"blob of {len(data)} bytes exceeds the cap of {max_bytes} bytes "
                           f"(network.max_blob_bytes)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise PayloadError(f"blob bytes hash to {actual}, not to the id {sha256} they were sent under")


class BlobStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # the largest blob a client may put
        self._blobs: dict[str, bytes] = {}
        self.total_bytes = 0

    def _check_id(self, sha256: str) -> None:
        if not is_sha256(sha256):
            raise PayloadError(f"blob id {sha256!r} is not a sha256 (64 lowercase hex digits)")

    def has(self, sha256: str) -> bool:
        return sha256 in self._blobs

    def put(self, sha256: str, data: bytes, storage_cap: int | None = None) -> bool:
        """Store `data` under `sha256`; False when it was already there. Raises when the hash does not match, and
        StorageFull when the store would exceed `storage_cap` bytes."""
        self._check_id(sha256)
        check_blob(sha256, data, self.max_bytes)
        if sha256 in self._blobs:
            return False
        if storage_cap is not None and self.total_bytes + len(data) > storage_cap:
            raise StorageFull(f"blob storage holds {self.total_bytes} bytes; {len(data)} more would pass the cap of "
                              f"{storage_cap} (network.max_blob_storage_bytes); retry after the next round")
        return self._keep(sha256, bytes(data))

    def put_own(self, sha256: str, data: bytes) -> bool:
        """Store a blob the coordinator made itself (a round's update): no size cap or storage cap, but
        counted, and collected like the others."""
        self._check_id(sha256)
        return sha256 not in self._blobs and self._keep(sha256, data)

    def _keep(self, sha256: str, data: bytes) -> bool:
        self._blobs[sha256] = data
        self.total_bytes += len(data)
        return True

    def get(self, sha256: str) -> bytes:
        return self._blobs[sha256]  # KeyError when absent

    def size(self, sha256: str) -> int:
        return len(self._blobs[sha256])

    def delete(self, sha256: str) -> None:
        data = self._blobs.pop(sha256, None)
        if data is not None:
            self.total_bytes -= len(data)


class BlobLedger:
    """Which blobs belong to which round, so the store keeps only what members may still fetch: the accepted
    sets of the last `keep_rounds` steps. Everything else uploaded before that (rejected, late, junk) goes."""

    def __init__(self, store: BlobStore, keep_rounds: int = 2) -> None:
        self.store = store
        self.keep_rounds = keep_rounds
        self._uploaded: dict[str, int] = {}  # sha -> the step that was training when it arrived
        self._accepted: dict[int, list[str]] = {}  # step -> its accepted set's blobs

    def uploaded(self, sha256: str, step: int) -> None:
        self._uploaded.setdefault(sha256, step)

    def applied(self, step: int, accepted: list[str]) -> list[str]:
        """Step `step` was applied with `accepted`: collect what no member can need any more (the blobs
        deleted are returned, for a mirror to delete too)."""
        self._accepted[step] = list(accepted)
        horizon = step - self.keep_rounds
        for old in [s for s in self._accepted if s < horizon]:
            del self._accepted[old]
        keep = {sha for shas in self._accepted.values() for sha in shas}
        collected = []
        for sha, when in list(self._uploaded.items()):
            if when < horizon and sha not in keep:
                self.store.delete(sha)
                del self._uploaded[sha]
                collected.append(sha)
        return collected
