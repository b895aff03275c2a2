"""Hub repos, offline: a local Hugging Face cache laid out as the hub would leave it; no network.

The file selection is checked with huggingface_hub's own pattern filter over the repo's file list, so the
patterns mean on the hub what they mean here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from aftermath.checkpoint.export import export_tiers
from aftermath.checkpoint.hf_dir import save_model_dir
from aftermath.checkpoint.hub import parse_source
from aftermath.checkpoint.loader import load_tier_model, resolve_checkpoint
from aftermath.errors import CheckpointError
from aftermath.model import build_model, preset_config, tier_spec

torch.set_num_threads(1)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_model(preset_config("tiny"), seed=7)
    src = save_model_dir(model, root / "m")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    export_tiers(src, tiers=[1, 2])
    return model, root


def make_cached_repo(cache: Path, repo_id: str, content: Path) -> Path:
    """Lay `content` out as the cached snapshot of `repo_id` at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(content, snapshot)
    return snapshot


def repo_files(snapshot: Path) -> list[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def selected(resolved, snapshot: Path) -> set[str]:
    return set(filter_repo_objects(repo_files(snapshot), allow_patterns=resolved.hub_allow_patterns,
                                   ignore_patterns=resolved.hub_ignore_patterns))


def test_parse_source():
    assert parse_source("owner/repo") == parse_source("hf://owner/repo")
    assert parse_source("owner/repo").subfolder == ""
    assert parse_source("owner/repo/runs/m").subfolder == "runs/m"
    assert parse_source("model-dir") is None and parse_source("owner/../x") is None


def test_tier_selection_is_the_manifest_the_tier_and_the_common_files(exported, tmp_path):
    model, root = exported
    snapshot = make_cached_repo(tmp_path / "cache", "owner/repo", root)
    small, resolved = load_tier_model("owner/repo/m", tier=1, cache_dir=tmp_path / "cache")
    assert resolved.strategy == "sliced" and resolved.verified
    assert selected(resolved, snapshot) == {
        "m/matformer_manifest.json", "m/tokenizer.json",
        "m-tier1/config.json", "m-tier1/model.safetensors", "m-tier1/tokenizer.json",
    }
    with torch.no_grad():
        assert (small(torch.arange(16)[None]) - model(torch.arange(16)[None], tier_spec(model.config, 1))).abs().max() == 0


@pytest.mark.parametrize("tier, strategy", [(0, "auto"), (None, "auto"), (2, "universal")])
def test_universal_selection_is_the_model_folder_without_other_tiers(exported, tmp_path, tier, strategy):
    _, root = exported
    snapshot = make_cached_repo(tmp_path / "cache", "owner/repo", root)
    resolved = resolve_checkpoint("owner/repo/m", tier=tier, strategy=strategy, cache_dir=tmp_path / "cache")
    assert resolved.strategy == "universal"
    assert selected(resolved, snapshot) == {"m/config.json", "m/model.safetensors", "m/tokenizer.json",
                                            "m/matformer_manifest.json"}


def test_a_repo_with_tiers_inside_the_model_folder(exported, tmp_path):
    """The manifest at the repo root with tier folders inside it: the ignore list drops them for tier 0."""
    _, root = exported
    content = tmp_path / "content"
    shutil.copytree(root / "m", content)
    for t in (1, 2):
        shutil.copytree(root / f"m-tier{t}", content / f"m-tier{t}")
    manifest = (content / "matformer_manifest.json").read_text().replace("../m-tier", "m-tier")
    (content / "matformer_manifest.json").write_text(manifest)
    snapshot = make_cached_repo(tmp_path / "cache", "owner/nested", content)
    resolved = resolve_checkpoint("owner/nested", tier=0, cache_dir=tmp_path / "cache")
    assert selected(resolved, snapshot) == {"config.json", "model.safetensors", "tokenizer.json",
                                            "matformer_manifest.json"}
    resolved = resolve_checkpoint("owner/nested", tier=2, strategy="sliced", cache_dir=tmp_path / "cache")
    assert selected(resolved, snapshot) == {"matformer_manifest.json", "tokenizer.json", "m-tier2/config.json",
                                            "m-tier2/model.safetensors", "m-tier2/tokenizer.json"}


def test_manifest_paths_escaping_the_repo_are_rejected(exported, tmp_path):
    _, root = exported
    # the model folder uploaded alone as the repo: its manifest's ../m-tier1 paths leave the repo
    make_cached_repo(tmp_path / "cache", "owner/flat", root / "m")
    for strategy in ("auto", "sliced"):
        with pytest.raises(CheckpointError, match="escapes the hub repository root"):
            resolve_checkpoint("owner/flat", tier=1, strategy=strategy, cache_dir=tmp_path / "cache")


def test_corrupt_tier_on_the_hub_falls_back_to_the_universal_files(exported, tmp_path):
    _, root = exported
    snapshot = make_cached_repo(tmp_path / "cache", "owner/repo", root)
    weights = snapshot / "m-tier1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01
    weights.write_bytes(bytes(data))
    resolved = resolve_checkpoint("owner/repo/m", tier=1, cache_dir=tmp_path / "cache")
    assert resolved.strategy == "universal" and "sha256" in resolved.reason
    assert "m/model.safetensors" in selected(resolved, snapshot)
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint("owner/repo/m", tier=1, strategy="sliced", cache_dir=tmp_path / "cache")


def test_repo_without_manifest_and_missing_repo(tmp_path):
    model = build_model(preset_config("tiny"), seed=1)
    plain = save_model_dir(model, tmp_path / "plain")
    make_cached_repo(tmp_path / "cache", "owner/plain", plain)
    resolved = resolve_checkpoint("owner/plain", tier=1, cache_dir=tmp_path / "cache")
    assert resolved.strategy == "universal" and resolved.hub_allow_patterns is None  # the whole snapshot
    with pytest.raises(CheckpointError, match="cannot fetch owner/absent.*HF_HUB_OFFLINE"):
        resolve_checkpoint("owner/absent", tier=1, cache_dir=tmp_path / "cache")
