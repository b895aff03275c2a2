"""Content-addressed blob store: a payload is stored under the sha256 of its bytes, checked on receipt.

Files live at `ROOT/ab/abcdef...` (two-level fan-out); a write goes to a temp file renamed into place, so a
reader sees a whole blob or none. Blobs are immutable: putting the same bytes twice is a no-op. The store counts
its bytes, so the owner can bound them (`put(..., storage_cap)`; StorageFull beyond it).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from aftermath.errors import PayloadError

HEX64 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    return isinstance(text, str) and HEX64.fullmatch(text) is not None


class BlobTooLarge(PayloadError):
    pass


class StorageFull(PayloadError):
    """The blob store holds its cap of bytes; old rounds must be collected first."""


class BlobStore:
    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.total_bytes = sum(p.stat().st_size for p in self.root.glob("??/*") if p.is_file())

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise PayloadError(f"blob id {sha256!r} is not a sha256 (64 lowercase hex digits)")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def put(self, sha256: str, data: bytes, storage_cap: int | None = None) -> bool:
        """Store `data` under `sha256`; False when it was already there. Raises when the hash does not match, and
        StorageFull when the store would exceed `storage_cap` bytes."""
        path = self.path(sha256)
        if len(data) > self.max_bytes:
            raise BlobTooLarge(f"blob of {len(data)} bytes exceeds the cap of {self.max_bytes} bytes "
                               f"(network.max_blob_bytes)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise PayloadError(f"blob bytes hash to {actual}, not to the id {sha256} they were sent under")
        if path.is_file():
            return False
        if storage_cap is not None and self.total_bytes + len(data) > storage_cap:
            raise StorageFull(f"blob storage holds {self.total_bytes} bytes; {len(data)} more would pass the cap of "
                              f"{storage_cap} (network.max_blob_storage_bytes); retry after the next round")
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{sha256}.tmp-{os.getpid()}-{id(data)}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.total_bytes += len(data)
        return True

    def put_own(self, sha256: str, data: bytes) -> bool:
        """Store a blob the coordinator made itself (a round's update): no size cap or storage cap, but
        counted, and collected like the others."""
        path = self.path(sha256)
        if path.is_file():
            return False
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{sha256}.tmp-{os.getpid()}-{id(data)}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.total_bytes += len(data)
        return True

    def get(self, sha256: str) -> bytes:
        path = self.path(sha256)
        if not path.is_file():
            raise KeyError(sha256)
        return path.read_bytes()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def delete(self, sha256: str) -> None:
        path = self.path(sha256)
        if path.is_file():
            self.total_bytes -= path.stat().st_size
            path.unlink()

    def clear(self) -> None:
        """Remove every blob (and leftover temporaries)."""
        for path in self.root.glob("??/*"):
            if path.is_file():
                path.unlink()
        self.total_bytes = 0


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
