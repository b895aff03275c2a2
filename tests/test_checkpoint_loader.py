"""Loading tiers: strategies, verification, double-slicing and metadata guards, schema hash, bad manifests."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from aftermath.checkpoint.export import export_tiers
from aftermath.checkpoint.hf_dir import save_model_dir
from aftermath.checkpoint.loader import load_tier_model, resolve_checkpoint
from aftermath.checkpoint.manifest import MANIFEST_NAME, sha256_file
from aftermath.checkpoint.schema import config_from_dict, read_config, schema_hash
from aftermath.errors import CheckpointError, TierError
from aftermath.model import MatFormerConfig, build_model, parse_spec, preset_config, sliced_config, tier_spec

torch.set_num_threads(1)
IDS = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_model(preset_config("tiny"), seed=5)
    src = save_model_dir(model, root / "m")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    export_tiers(src, tiers=[1, 2], specs=["mix=512,256,128,64"])
    return model, root


@pytest.fixture
def work(exported, tmp_path):
    """A private copy of the exported checkpoint (tests that damage it)."""
    model, root = exported
    for d in root.iterdir():
        shutil.copytree(d, tmp_path / d.name)
    return model, tmp_path / "m"


def files_state(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def logits_diff(small, model, spec) -> float:
    with torch.no_grad():
        return (small(IDS) - model(IDS, spec)).abs().max().item()


# ---------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("tier", [0, 1, 2, 3])
@pytest.mark.parametrize("strategy", ["auto", "sliced", "universal"])
def test_every_strategy_gives_the_universal_model_at_the_tier(exported, tier, strategy):
    model, root = exported
    if tier == 3 and strategy == "sliced":
        with pytest.raises(CheckpointError, match="lists no tier3"):
            resolve_checkpoint(root / "m", tier=3, strategy="sliced")
        return
    small, resolved = load_tier_model(root / "m", tier=tier, strategy=strategy)
    spec = tier_spec(model.config, tier)
    assert logits_diff(small, model, spec) == 0.0
    assert small.config == sliced_config(model.config, spec) or tier == 0
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) or tier == 0
    expected = "sliced" if strategy != "universal" and tier in (1, 2) else "universal"
    assert resolved.strategy == expected
    if expected == "sliced":
        assert resolved.directory == root / f"m-tier{tier}" and resolved.verified
    else:
        assert resolved.directory == root / "m"


def test_auto_falls_back_to_universal_on_a_hash_mismatch_and_says_why(work, caplog):
    model, src = work
    weights = src.with_name("m-tier1") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: still a readable file
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="aftermath.checkpoint"):
        small, resolved = load_tier_model(src, tier=1, strategy="auto")
    assert resolved.strategy == "universal" and "sha256" in resolved.reason
    assert "universal checkpoint sliced at run time" in caplog.text
    assert logits_diff(small, model, tier_spec(model.config, 1)) == 0.0
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        resolve_checkpoint(src, tier=1, strategy="sliced")


def test_sliced_errors_on_missing_file_and_auto_falls_back(work):
    _, src = work
    (src.with_name("m-tier2") / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        resolve_checkpoint(src, tier=2, strategy="sliced")
    assert resolve_checkpoint(src, tier=2).strategy == "universal"


def test_a_corrupt_universal_file_is_an_error_for_every_strategy(work):
    _, src = work
    before = files_state(src.parent)
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    for strategy in ("auto", "universal"):
        with pytest.raises(CheckpointError, match="config.json.*sha256"):
            resolve_checkpoint(src, tier=3, strategy=strategy)
    after = files_state(src.parent)
    assert {k: v for k, v in after.items() if k != "m/config.json"} == \
        {k: v for k, v in before.items() if k != "m/config.json"}


def test_spec_by_name_and_by_widths(exported):
    model, root = exported
    small, resolved = load_tier_model(root / "m", spec="mix")
    assert resolved.strategy == "sliced" and resolved.config.matformer_layer_intermediate_sizes == [512, 256, 128, 64]
    assert not resolved.config.transformers_compatible
    assert logits_diff(small, model, resolved.spec) == 0.0
    other = parse_spec(model.config, "odd=256,256,512,128")
    small, resolved = load_tier_model(root / "m", spec="odd=256,256,512,128")
    assert resolved.strategy == "universal" and logits_diff(small, model, other) == 0.0
    with pytest.raises(CheckpointError, match="not in the manifest"):
        resolve_checkpoint(root / "m", spec="nosuch")


def test_no_manifest_auto_uses_universal_and_sliced_explains(tmp_path):
    src = save_model_dir(build_model(preset_config("tiny"), seed=1), tmp_path / "plain")
    resolved = resolve_checkpoint(src, tier=1)
    assert resolved.strategy == "universal" and "no matformer_manifest.json" in resolved.reason
    assert not resolved.verified
    with pytest.raises(CheckpointError, match="export-tiers"):
        resolve_checkpoint(src, tier=1, strategy="sliced")


def test_impossible_tier_and_unknown_strategy(exported):
    _, root = exported
    with pytest.raises(TierError, match="tier <= 3"):
        resolve_checkpoint(root / "m", tier=4)
    with pytest.raises(CheckpointError, match="strategy 'fast' is unknown"):
        resolve_checkpoint(root / "m", tier=1, strategy="fast")
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub repo id"):
        resolve_checkpoint(str(root / "missing dir"), tier=1)


# ---------------------------------------------------------------------------------------------- guards
def test_double_slicing_is_refused_and_auto_uses_a_tier_as_it_is(exported):
    model, root = exported
    tier_dir = root / "m-tier1"
    with pytest.raises(CheckpointError, match="already sliced.*never sliced twice"):
        resolve_checkpoint(tier_dir, tier=1, strategy="universal")
    with pytest.raises(CheckpointError, match="never sliced twice"):
        resolve_checkpoint(tier_dir, tier=2, strategy="auto")
    with pytest.raises(CheckpointError, match="cannot give tier0"):
        resolve_checkpoint(tier_dir, tier=0)
    small, resolved = load_tier_model(tier_dir, tier=1, strategy="auto")
    assert resolved.strategy == "sliced" and "used as it is" in resolved.reason
    assert logits_diff(small, model, tier_spec(model.config, 1)) == 0.0
    assert resolve_checkpoint(tier_dir).spec.name == "tier1"


def test_tier_is_inferred_from_widths_when_matformer_tier_is_absent(work):
    model, src = work
    tier_dir = src.with_name("m-tier2")
    cfg = json.loads((tier_dir / "config.json").read_text())
    del cfg["matformer_tier"]
    (tier_dir / "config.json").write_text(json.dumps(cfg))
    assert read_config(tier_dir).matformer_tier == 2
    with pytest.raises(CheckpointError, match="already sliced"):
        resolve_checkpoint(tier_dir, tier=2, strategy="universal")
    # with the base width only in the manifest
    del cfg["matformer_base_intermediate_size"]
    assert config_from_dict(cfg, base_intermediate_size=512).matformer_tier == 2


def test_an_impossible_width_ratio_is_an_error(tmp_path):
    cfg = preset_config("tiny").to_dict()
    del cfg["matformer_tier"]
    cfg["intermediate_size"] = 384  # 512 / 384 is not a power of two
    with pytest.raises(CheckpointError, match="cannot infer the tier"):
        config_from_dict(cfg)
    cfg["intermediate_size"] = 170  # does not even divide
    with pytest.raises(CheckpointError, match="cannot infer the tier"):
        config_from_dict(cfg)
    # a config whose stated tier contradicts its widths
    data = preset_config("tiny").to_dict() | {"matformer_tier": 1, "intermediate_size": 128,
                                              "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="matformer_tier 1"):
        read_config(tmp_path)


def test_schema_hash_is_shared_by_a_model_and_its_tiers_only(exported):
    model, root = exported
    base = model.config
    digest = schema_hash(base)
    for name in ("m-tier1", "m-tier2", "m-mix"):
        assert schema_hash(read_config(root / name)) == digest
    # a universal config without matformer_base_intermediate_size (or any matformer field) hashes the same
    plain = {k: v for k, v in base.to_dict().items() if not k.startswith("matformer_base")}
    assert schema_hash(config_from_dict(plain)) == digest
    # ...and a tier config without it, when the manifest supplies the base width
    tier = json.loads((root / "m-tier1" / "config.json").read_text())
    del tier["matformer_base_intermediate_size"]
    assert schema_hash(config_from_dict(tier, base_intermediate_size=512)) == digest
    assert resolve_checkpoint(root / "m", tier=1).schema_hash == digest
    # different architectures differ
    for change in ({"num_hidden_layers": 3}, {"hidden_size": 256}, {"vocab_size": 4000}, {"hidden_act": "relu2"},
                   {"tie_word_embeddings": False}, {"rope_theta": 5e5},
                   {"intermediate_size": 1024, "matformer_base_intermediate_size": 1024},
                   {"matformer_nest_heads": False}, {"matformer_min_intermediate_size": 128}):
        other = MatFormerConfig.from_dict(base.to_dict() | change)
        assert schema_hash(other) != digest, change
    # not architecture: the context length
    assert schema_hash(dataclasses.replace(base, max_position_embeddings=1024)) == digest


# ---------------------------------------------------------------------------------------------- bad manifests
def edit_manifest(src: Path, edit) -> None:
    path = src / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
    (lambda d: d.pop("sha256"), "sha256 must be an object"),
    (lambda d: d["sha256"].pop("../m-tier1/model.safetensors"), "listed without a sha256"),
    (lambda d: d["sha256"].update({"config.json": "abc"}), "not 64 lowercase hex"),
    (lambda d: d.update(tiers=[]), "tiers must be a non-empty list"),
    (lambda d: d["tiers"][1].update(tier="one"), "tier must be a non-negative integer"),
    (lambda d: d["tiers"][1].update(intermediate_size=300), "tier 1 of this model has FFN 256"),
    (lambda d: d.update(matformer_base_intermediate_size=1024), "belongs to another model"),
    (lambda d: d.update(schema_hash="0" * 64), "another architecture"),
])
def test_malformed_manifest_is_rejected_with_a_clear_error(work, edit, message):
    _, src = work
    edit_manifest(src, edit)
    before = files_state(src.parent)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(src, tier=1, strategy="sliced")
    assert files_state(src.parent) == before


def test_unreadable_manifest(work):
    _, src = work
    (src / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resolve_checkpoint(src, tier=1)
    (src / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        resolve_checkpoint(src, tier=0)


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../../outside/config.json", "../m-tier1/../../x",
                                      "C:/weights.safetensors", "..\\m-tier1\\config.json", "a/*.json"])
def test_absolute_or_escaping_manifest_paths_are_rejected(work, bad_path):
    _, src = work
    (src.parent.parent / "outside").mkdir(exist_ok=True)

    def edit(d):
        d["tiers"][1]["files"][0] = bad_path
        d["sha256"][bad_path] = "0" * 64

    edit_manifest(src, edit)
    for strategy in ("auto", "universal"):  # rejected before anything is read, whatever the tier
        with pytest.raises(CheckpointError, match="relative and POSIX|escapes the repository root|malformed"):
            resolve_checkpoint(src, tier=0, strategy=strategy)


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_resolves_verifies_and_fails_loudly(work, capsys):
    from aftermath.cli import main

    _, src = work
    assert main(["inspect", str(src), "--tier", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and info["strategy"] == "sliced" and info["verified"]
    assert info["directory"].endswith("m-tier1") and info["spec"]["ffn_widths"] == [256] * 4
    assert main(["inspect", str(src), "--tier", "3", "--strategy", "universal"]) == 0
    assert "slicedtotier3atruntime" in "".join(capsys.readouterr().out.split())
    assert main(["inspect", str(src)]) == 0  # the per-tier table without --tier
    assert "1,508,480parameters" in "".join(capsys.readouterr().out.split())
    (src.with_name("m-tier1") / "model.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(src), "--tier", "1", "--strategy", "sliced"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["inspect", str(src), "--tier", "1", "--strategy", "sliced", "--json"]) == 2
    assert "sha256" in json.loads(capsys.readouterr().out)["error"]
    assert main(["inspect", str(src), "--tier", "9"]) == 2
