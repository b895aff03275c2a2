"""`matformer_manifest.json` (schema v1): which files make each tier, and the sha256 of every one.

Paths are POSIX and relative to the manifest's directory. A path may step out of that directory to a sibling
(`../m-tier1/config.json`) but never out of the repository root the caller names (for a local checkpoint: the
directory holding it and its tier siblings; for a hub repo: the repo). Absolute paths are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftermath.errors import CheckpointError

MANIFEST_NAME = "matformer_manifest.json"
SCHEMA_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class TierEntry:
    """One tier (or Mix'n'Match spec) the manifest lists."""

    name: str  # "tier0", "tier1", ... or the spec's name
    tier: int | None  # None for a Mix'n'Match spec
    intermediate_size: int  # the FFN width (for a spec: its widest layer)
    files: list[str]
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    layer_intermediate_sizes: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"tier": self.tier, "name": self.name, "intermediate_size": self.intermediate_size}
        if self.num_attention_heads is not None:
            data["num_attention_heads"] = self.num_attention_heads
            data["num_key_value_heads"] = self.num_key_value_heads
        if self.layer_intermediate_sizes is not None:
            data["layer_intermediate_sizes"] = list(self.layer_intermediate_sizes)
        data["files"] = list(self.files)
        return data


@dataclass
class Manifest:
    base_intermediate_size: int
    tiers: list[TierEntry]
    common_files: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    schema_hash: str | None = None

    # ------------------------------------------------------------------ lookup
    def entry(self, tier: int | None = None, name: str | None = None) -> TierEntry | None:
        for e in self.tiers:
            if (tier is not None and e.tier == tier) or (name is not None and e.name == name):
                return e
        return None

    def all_files(self) -> list[str]:
        files = list(self.common_files)
        for e in self.tiers:
            files.extend(f for f in e.files if f not in files)
        return files

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "matformer_base_intermediate_size": self.base_intermediate_size,
        }
        if self.schema_hash:
            data["schema_hash"] = self.schema_hash
        data["common_files"] = list(self.common_files)
        data["tiers"] = [e.to_json() for e in self.tiers]
        data["sha256"] = dict(sorted(self.sha256.items()))
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Parse and validate; every problem is a CheckpointError naming the field."""

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{where}: {what}; re-export it with `aftermath export-tiers --force`")

        if not isinstance(data, dict):
            raise bad(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                f"{where}: schema_version {version!r} is not supported (this Aftermath reads schema_version "
                f"{SCHEMA_VERSION}); upgrade Aftermath or re-export the tiers"
            )
        base = data.get("matformer_base_intermediate_size")
        if not _positive_int(base):
            raise bad(f"matformer_base_intermediate_size must be a positive integer, got {base!r}")
        common = data.get("common_files", [])
        if not isinstance(common, list) or not all(isinstance(f, str) for f in common):
            raise bad(f"common_files must be a list of paths, got {common!r}")
        sha = data.get("sha256")
        if not isinstance(sha, dict):
            raise bad(f"sha256 must be an object mapping paths to hex digests, got {type(sha).__name__}")
        for path, digest in sha.items():
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise bad(f"sha256 of {path!r} is {digest!r}, not 64 lowercase hex digits")
        schema_hash = data.get("schema_hash")
        if schema_hash is not None and not isinstance(schema_hash, str):
            raise bad(f"schema_hash must be a string, got {schema_hash!r}")
        raw_tiers = data.get("tiers")
        if not isinstance(raw_tiers, list) or not raw_tiers:
            raise bad(f"tiers must be a non-empty list, got {raw_tiers!r}")
        tiers = []
        seen: set[str] = set()
        for i, t in enumerate(raw_tiers):
            if not isinstance(t, dict):
                raise bad(f"tiers[{i}] must be an object, got {t!r}")
            tier = t.get("tier")
            if tier is not None and (not isinstance(tier, int) or isinstance(tier, bool) or tier < 0):
                raise bad(f"tiers[{i}].tier must be a non-negative integer or null (a spec), got {tier!r}")
            name = t.get("name", f"tier{tier}" if tier is not None else None)
            if not isinstance(name, str) or not name:
                raise bad(f"tiers[{i}] is a spec (tier null) and needs a name")
            if name in seen:
                raise bad(f"tier {name!r} is listed twice")
            seen.add(name)
            width = t.get("intermediate_size")
            if not _positive_int(width):
                raise bad(f"tiers[{i}].intermediate_size must be a positive integer, got {width!r}")
            files = t.get("files")
            if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
                raise bad(f"tiers[{i}].files must be a non-empty list of paths, got {files!r}")
            layers = t.get("layer_intermediate_sizes")
            if layers is not None and (not isinstance(layers, list) or not all(_positive_int(w) for w in layers)):
                raise bad(f"tiers[{i}].layer_intermediate_sizes must be a list of positive integers, got {layers!r}")
            heads, kv = t.get("num_attention_heads"), t.get("num_key_value_heads")
            for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
                if value is not None and not _positive_int(value):
                    raise bad(f"tiers[{i}].{key} must be a positive integer, got {value!r}")
            tiers.append(TierEntry(name=name, tier=tier, intermediate_size=width, files=list(files),
                                   num_attention_heads=heads, num_key_value_heads=kv, layer_intermediate_sizes=layers))
        manifest = cls(base_intermediate_size=base, tiers=tiers, common_files=list(common), sha256=dict(sha),
                       schema_hash=schema_hash)
        for path in manifest.all_files():
            check_relative_path(path, where)
            if path not in manifest.sha256:
                raise bad(f"file {path!r} is listed without a sha256")
        return manifest


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -------------------------------------------------------------------------------------------------- paths
def check_relative_path(path: str, where: str = MANIFEST_NAME) -> None:
    """Refuse absolute paths, Windows paths, empty parts and glob characters (they would be hub patterns)."""
    if not path or path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path):
        raise CheckpointError(f"{where}: path {path!r} must be relative and POSIX (like ../m-tier1/config.json)")
    if any(c in path for c in "*?[]") or any(part in ("", ".") for part in path.split("/")):
        raise CheckpointError(f"{where}: path {path!r} is malformed (empty parts, '.' or glob characters)")


def resolve_in_root(manifest_dir: Path, path: str, root: Path, where: str = MANIFEST_NAME) -> Path:
    """The file `path` names, relative to the manifest; an error if it leaves `root`."""
    check_relative_path(path, where)
    manifest_dir, root = Path(os.path.abspath(manifest_dir)), Path(os.path.abspath(root))
    rel_dir = manifest_dir.relative_to(root).as_posix() if manifest_dir != root else ""
    joined = posixpath.normpath(posixpath.join(rel_dir, path)) if rel_dir else posixpath.normpath(path)
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise CheckpointError(
            f"{where}: path {path!r} escapes the repository root {root}; a manifest may only name files inside it"
        )
    return root / joined


def repo_relative(manifest_dir_in_repo: str, path: str) -> str:
    """`path` (relative to the manifest) as a path from the repo root, or an error if it leaves the repo."""
    joined = posixpath.normpath(posixpath.join(manifest_dir_in_repo, path)) if manifest_dir_in_repo else \
        posixpath.normpath(path)
    if joined in (".", "..") or joined.startswith("../"):
        raise CheckpointError(
            f"{MANIFEST_NAME}: path {path!r} escapes the hub repository root; a manifest may only name files "
            f"inside the repo (publish the folder holding the model and its tier directories, and load "
            f"OWNER/REPO/MODEL_FOLDER)"
        )
    return joined


# -------------------------------------------------------------------------------------------------- I/O
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of a checkpoint directory, or None when it has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-export it with `aftermath export-tiers --force`")
    return Manifest.from_json(data, where=str(path))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write the manifest atomically (temp file + rename), so a reader sees the old one or the new one."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def verify_files(manifest: Manifest, manifest_dir: Path, root: Path, paths: list[str]) -> list[Path]:
    """Check that every path exists and matches its sha256; return the resolved files. Raises on the first problem."""
    resolved = []
    for rel in paths:
        file = resolve_in_root(manifest_dir, rel, root)
        if not file.is_file():
            raise CheckpointError(f"file {rel!r} listed in {MANIFEST_NAME} is missing (looked at {file})")
        digest = sha256_file(file)
        if digest != manifest.sha256[rel]:
            raise CheckpointError(
                f"file {rel!r} ({file}) does not match its sha256 in {MANIFEST_NAME}: expected "
                f"{manifest.sha256[rel][:16]}..., found {digest[:16]}... (corrupted or modified); fetch it again or "
                f"re-export with `aftermath export-tiers --force`"
            )
        resolved.append(file)
    return resolved
