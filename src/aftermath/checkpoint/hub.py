"""Hub repos through huggingface_hub: fetch the manifest, then only the files a tier needs.

A source `OWNER/REPO` has its model (and manifest) at the repo root; `OWNER/REPO/FOLDER` has them in FOLDER,
which lets one repo hold a model directory and its tier siblings exactly as `export-tiers` lays them out
(publish the folder that holds `m/` and `m-tier1/`, load `OWNER/REPO/m`). A string that reads as a local path
(`looks_local`) is never sent to the hub; `hf://OWNER/REPO` is always a repo id.

Selection: for tier > 0, the manifest, that tier's files and the common files (`allow_patterns`); for tier 0
or the universal strategy, everything under the model's folder except the files only other tiers use.
With HF_HUB_OFFLINE=1 nothing goes to the network: files come from the local cache or the call fails.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aftermath.checkpoint.manifest import MANIFEST_NAME, Manifest, TierEntry, repo_relative
from aftermath.errors import CheckpointError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SOURCE = re.compile(rf"{_PART}/{_PART}(/{_PART})*")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    subfolder: str  # "" for the repo root

    def path(self, rel: str) -> str:
        """A path relative to the model folder, as a path from the repo root."""
        return repo_relative(self.subfolder, rel)


def parse_source(source: str) -> HubSource | None:
    """`OWNER/REPO[/FOLDER...]` -> HubSource, or None when `source` does not look like a repo id."""
    text = source.strip().removeprefix("hf://")
    if not _SOURCE.fullmatch(text) or any(p in (".", "..") for p in text.split("/")):
        return None
    parts = text.split("/")
    return HubSource("/".join(parts[:2]), "/".join(parts[2:]))


def looks_local(source: str) -> bool:
    """Whether `source` names a local path: it starts with /, ./, ../ or ~, or its first component is a local
    directory (`runs/m` beside `runs/`). Such a source that does not exist is a typo, not a repo id to retry."""
    text = source.strip()
    if text.startswith("hf://"):
        return False
    if text in (".", "..") or text.startswith(("/", "./", "../", "~")):
        return True
    return Path(text.split("/", 1)[0]).is_dir()


def offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------------------- file selection
def tier_patterns(src: HubSource, manifest: Manifest, entry: TierEntry) -> list[str]:
    """allow_patterns for one sliced tier: its files, the common files and the manifest (exact paths)."""
    wanted = [src.path(MANIFEST_NAME)]
    for rel in [*entry.files, *manifest.common_files]:
        path = src.path(rel)
        if path not in wanted:
            wanted.append(path)
    return wanted


def universal_patterns(src: HubSource, manifest: Manifest | None) -> tuple[list[str] | None, list[str] | None]:
    """(allow_patterns, ignore_patterns) for the universal model: its folder, minus files of other tiers only."""
    allow = [f"{src.subfolder}/*"] if src.subfolder else None
    if manifest is None:
        return allow, None
    base = manifest.entry(tier=0)
    keep = {src.path(f) for f in [*(base.files if base else []), *manifest.common_files, MANIFEST_NAME]}
    others = sorted({src.path(f) for e in manifest.tiers if e.tier != 0 for f in e.files} - keep)
    return allow, (others or None)


# --------------------------------------------------------------------------------------------- fetching
def _hub_error(src: HubSource, exc: Exception) -> CheckpointError:
    where = src.repo_id + (f" (folder {src.subfolder})" if src.subfolder else "")
    hint = " (HF_HUB_OFFLINE is set: only cached files can be used)" if offline() else ""
    return CheckpointError(
        f"cannot fetch {where} from the Hugging Face hub{hint}: {type(exc).__name__}: {exc}. "
        f"Check the repo id, or pass a local directory"
    )


def fetch_manifest(src: HubSource, revision: str | None, cache_dir: str | Path | None) -> tuple[Path | None, str | None]:
    """(local path of the manifest or None when the repo has none, the commit it came from)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(src.repo_id, src.path(MANIFEST_NAME), revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline()))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None, revision
    except Exception as exc:  # network, auth, missing repo: one clear error
        raise _hub_error(src, exc) from exc
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
    return path, commit


def download(src: HubSource, allow: list[str] | None, ignore: list[str] | None, revision: str | None,
             cache_dir: str | Path | None) -> Path:
    """snapshot_download with the given selection; returns the snapshot's root folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                      ignore_patterns=ignore, local_files_only=offline()))
    except Exception as exc:
        raise _hub_error(src, exc) from exc
