"""Tier export: layout, manifest, sharded sources and outputs, atomicity, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aftermath.checkpoint.export import export_tiers
from aftermath.checkpoint.hf_dir import load_state_dict, save_model_dir
from aftermath.checkpoint.manifest import MANIFEST_NAME, read_manifest, sha256_file
from aftermath.checkpoint.streaming import INDEX_FILE, parse_size, tensor_headers
from aftermath.errors import CheckpointError, TierError
from aftermath.model import build_model, param_shapes, preset_config, tier_spec
from aftermath.model.slicing import slice_state_dict

torch.set_num_threads(1)


def make_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "to": 1, "be": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture
def universal(tmp_path: Path):
    model = build_model(preset_config("tiny"), seed=3)
    src = save_model_dir(model, tmp_path / "m", tokenizer_dir=make_tokenizer(tmp_path / "tok"))
    return model, src


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (to show nothing changed)."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_writes_sibling_tiers_and_a_verified_manifest(universal):
    model, src = universal
    before = snapshot(src)
    manifest = export_tiers(src, tiers=[1, 2], specs=["mix=512,256,128,64"])
    data = json.loads((src / MANIFEST_NAME).read_text())
    assert data["schema_version"] == 1 and data["matformer_base_intermediate_size"] == 512
    assert data["common_files"] == ["tokenizer.json"]
    assert [t["tier"] for t in data["tiers"]] == [0, 1, 2, None]
    assert data["tiers"][0]["files"] == ["config.json", "model.safetensors"]
    assert data["tiers"][1]["files"][:2] == ["../m-tier1/config.json", "../m-tier1/model.safetensors"]
    assert data["tiers"][1]["intermediate_size"] == 256 and data["tiers"][3]["layer_intermediate_sizes"] == [512, 256, 128, 64]
    # every listed file has the sha256 of what is on disk
    listed = manifest.all_files()
    assert set(listed) == set(data["sha256"])
    for rel in listed:
        assert sha256_file((src / rel).resolve()) == data["sha256"][rel]
    # the source only gained the manifest
    after = snapshot(src)
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == before
    # tier dirs: config, weights equal to the universal prefix, tokenizer
    universal_state = {k: v.detach() for k, v in model.state_dict().items()}
    for t in (1, 2):
        d = src.with_name(f"m-tier{t}")
        cfg = json.loads((d / "config.json").read_text())
        spec = tier_spec(model.config, t)
        assert cfg["intermediate_size"] == 512 >> t and cfg["matformer_tier"] == t
        assert cfg["matformer_base_intermediate_size"] == 512 and cfg["matformer_base_num_attention_heads"] == 8
        assert cfg["num_attention_heads"] == spec.q_heads[0] and cfg["aftermath_transformers_compatible"] is True
        assert (d / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        expected = slice_state_dict(universal_state, model.config, spec)
        got = load_state_dict(d)
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    mix = json.loads((src.with_name("m-mix") / "config.json").read_text())
    assert mix["matformer_layer_intermediate_sizes"] == [512, 256, 128, 64]
    assert mix["aftermath_transformers_compatible"] is False
    assert not list(src.parent.glob(".*tmp*")), "no temp directory may remain"


def test_sharded_source_and_sharded_output_with_correct_index(tmp_path: Path):
    model = build_model(preset_config("tiny"), seed=1)
    src = tmp_path / "m"
    src.mkdir()
    model.config.save(src)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({k: state[k] for k in part}, str(src / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (src / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    manifest = export_tiers(src, tiers=[1], max_shard_size="400KB")
    assert manifest.entry(tier=0).files == ["config.json", INDEX_FILE, *sorted(halves)]
    out = tmp_path / "m-tier1"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    spec = tier_spec(model.config, 1)
    shapes = param_shapes(model.config, spec)
    total = 0
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            assert name in f.keys()
            total += f.get_tensor(name).numel() * 4
    assert set(index["weight_map"]) == set(shapes) and index["metadata"]["total_size"] == total
    for shard in shards:  # every shard respects the limit unless it holds a single bigger tensor
        headers = tensor_headers_of(out / shard)
        assert sum(headers.values()) <= 400_000 or len(headers) == 1
    expected = slice_state_dict(state, model.config, spec)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def tensor_headers_of(path: Path) -> dict[str, int]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numel() * 4 for k in f.keys()}


def test_existing_destination_is_refused_without_force(universal):
    _, src = universal
    export_tiers(src, tiers=[1])
    tier_dir = src.with_name("m-tier1")
    (tier_dir / "keep.txt").write_text("mine")
    before, manifest_before = snapshot(tier_dir), (src / MANIFEST_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="already exist.*--force"):
        export_tiers(src, tiers=[1, 2])
    assert snapshot(tier_dir) == before and (src / MANIFEST_NAME).read_bytes() == manifest_before
    assert not src.with_name("m-tier2").exists()
    export_tiers(src, tiers=[1], force=True)
    assert not (tier_dir / "keep.txt").exists() and read_manifest(src).entry(tier=1) is not None


def test_reexport_keeps_other_tiers_only_while_the_universal_weights_are_unchanged(universal):
    model, src = universal
    export_tiers(src, tiers=[1])
    export_tiers(src, tiers=[2])
    assert [e.name for e in read_manifest(src).tiers] == ["tier0", "tier2", "tier1"]
    # new universal weights: the old tier entries would describe stale slices, so they are dropped
    save_model_dir(build_model(model.config, seed=9), src)
    export_tiers(src, tiers=[3])
    assert [e.name for e in read_manifest(src).tiers] == ["tier0", "tier3"]


def test_already_sliced_source_is_refused(universal):
    _, src = universal
    export_tiers(src, tiers=[1])
    tier_dir = src.with_name("m-tier1")
    before = snapshot(tier_dir)
    with pytest.raises(CheckpointError, match="already sliced"):
        export_tiers(tier_dir, tiers=[1])
    # also when the tier must be inferred: no matformer_tier, only base and own widths
    cfg = json.loads((tier_dir / "config.json").read_text())
    del cfg["matformer_tier"]
    (tier_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="already sliced"):
        export_tiers(tier_dir, tiers=[1])
    assert not tier_dir.with_name("m-tier1-tier1").exists()
    assert {k: v for k, v in snapshot(tier_dir).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}


def test_a_tier_the_model_cannot_have_writes_nothing(universal):
    _, src = universal
    before = snapshot(src.parent)
    with pytest.raises(TierError, match="tier <= 3"):
        export_tiers(src, tiers=[1, 4])
    with pytest.raises(TierError, match="4 layers"):
        export_tiers(src, specs=["bad=512,256"])
    assert snapshot(src.parent) == before


def test_a_corrupt_source_writes_nothing(universal):
    _, src = universal
    export_tiers(src, tiers=[1])
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = snapshot(src.parent)
    with pytest.raises(CheckpointError, match="cannot read"):
        export_tiers(src, tiers=[1, 2], force=True)
    assert snapshot(src.parent) == before


def test_a_failure_mid_export_leaves_nothing_behind(universal):
    import os

    _, src = universal
    export_tiers(src, tiers=[1])
    before = snapshot(src.parent)
    # tier 1 is written to its temp directory first; then tier 2's temp path cannot be made a directory
    blocker = src.parent / f".m-tier2.tmp-{os.getpid()}"
    blocker.write_text("in the way")
    with pytest.raises(OSError):
        export_tiers(src, tiers=[1, 2], force=True)
    blocker.unlink()
    assert snapshot(src.parent) == before
    assert not [p for p in src.parent.iterdir() if p.name.startswith(".")]


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    with pytest.raises(CheckpointError, match="not understood"):
        parse_size("lots")


def test_cli_export_then_refuse(universal, capsys):
    from aftermath.cli import main

    _, src = universal
    assert main(["export-tiers", "--src", str(src), "--tiers", "1", "2"]) == 0
    assert "files hashed" in capsys.readouterr().out and (src / MANIFEST_NAME).is_file()
    assert main(["export-tiers", "--src", str(src), "--tiers", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export-tiers", "--src", str(src)]) == 2


def test_optimizer_state_is_exported_cut_to_each_tier_and_hashed(universal):
    from aftermath.checkpoint.optimizer_state import OPTIMIZER_STATE_FILE, load_optimizer_state, save_optimizer_state

    model, src = universal
    gen = torch.Generator().manual_seed(0)
    state = {f"exp_avg/{n}": torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    state["t"] = torch.tensor(7)
    save_optimizer_state(src / OPTIMIZER_STATE_FILE, state, "adamw")
    manifest = export_tiers(src, tiers=[1])
    tier1 = manifest.entry(tier=1)
    rel = f"../{src.name}-tier1/{OPTIMIZER_STATE_FILE}"
    assert rel in tier1.files and OPTIMIZER_STATE_FILE in manifest.entry(tier=0).files
    assert manifest.sha256[rel] == sha256_file(src.parent / f"{src.name}-tier1" / OPTIMIZER_STATE_FILE)
    cut = load_optimizer_state(src.parent / f"{src.name}-tier1" / OPTIMIZER_STATE_FILE, "adamw")
    for name, shape in param_shapes(model.config, tier_spec(model.config, 1)).items():
        full = state[f"exp_avg/{name}"]
        assert torch.equal(cut[f"exp_avg/{name}"], full[tuple(slice(0, s) for s in shape)])
    assert int(cut["t"]) == 7
    with pytest.raises(CheckpointError, match="'adamw' optimizer.*uses 'muon'"):
        load_optimizer_state(src / OPTIMIZER_STATE_FILE, "muon")
