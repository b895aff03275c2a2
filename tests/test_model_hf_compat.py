"""A sliced tier saved in HF format loads in transformers and computes the same logits."""

import json

import pytest
import torch

from aftermath.checkpoint.hf_dir import load_model_dir, save_model_dir
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("nest_heads", [True, False])
@pytest.mark.parametrize("tier", [0, 1, 2])
def test_sliced_tier_loads_in_transformers(tmp_path, tier, nest_heads):
    cfg = preset_config("tiny", matformer_nest_heads=nest_heads)
    universal = build_model(cfg, seed=7).eval()
    spec = tier_spec(cfg, tier)
    out = save_model_dir(sliced_model(universal, spec), tmp_path / f"tier{tier}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(tier))
    with torch.no_grad():
        diff = (hf(ids).logits - universal(ids, spec)).abs().max().item()
    assert diff <= 1e-5
    # and Aftermath reads back what it wrote
    reloaded = load_model_dir(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids), sliced_model(universal, spec).eval()(ids))


def test_untied_checkpoint_loads_in_transformers(tmp_path):
    cfg = preset_config("tiny", tie_word_embeddings=False)
    model = build_model(cfg, seed=8).eval()
    out = save_model_dir(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5


def test_nanogpt_options_say_transformers_cannot_load_them(tmp_path):
    cfg = preset_config("tiny", hidden_act="relu2", qk_norm=True)
    out = save_model_dir(build_model(cfg, seed=0), tmp_path / "m")
    data = json.loads((out / "config.json").read_text())
    assert data["aftermath_transformers_compatible"] is False
    assert "load it with Aftermath" in data["aftermath_note"]
