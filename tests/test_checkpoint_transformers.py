"""Every exported nested tier loads in transformers and computes Aftermath's universal model at that tier."""

from __future__ import annotations

import json

import pytest
import torch

from aftermath.checkpoint.export import export_tiers
from aftermath.checkpoint.hf_dir import save_model_dir
from aftermath.model import build_model, max_tier, preset_config, tier_spec

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


@pytest.mark.parametrize("nest_heads", [True, False])
def test_every_nested_tier_loads_in_transformers_with_the_same_logits(tmp_path, nest_heads):
    config = preset_config("tiny", matformer_nest_heads=nest_heads)
    model = build_model(config, seed=11).eval()
    src = save_model_dir(model, tmp_path / "m")
    tiers = list(range(1, max_tier(config) + 1))
    export_tiers(src, tiers=tiers, max_shard_size="500KB")  # sharded output must load too
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    for t in [0, *tiers]:
        directory = src if t == 0 else tmp_path / f"m-tier{t}"
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            expected = model(ids, tier_spec(config, t))
            got = hf(ids).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, f"tier {t}"


def test_a_per_layer_spec_says_it_is_not_transformers_compatible(tmp_path):
    model = build_model(preset_config("tiny"), seed=2)
    src = save_model_dir(model, tmp_path / "m")
    export_tiers(src, specs=["mix=512,256,128,64"])
    cfg = json.loads((tmp_path / "m-mix" / "config.json").read_text())
    assert cfg["aftermath_transformers_compatible"] is False and "Aftermath" in cfg["aftermath_note"]
