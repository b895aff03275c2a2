"""The MatFormer transformer: zero gradient outside a tier, and sliced models equal to the universal one."""

import pytest
import torch

from aftermath.errors import ConfigError, TierError
from aftermath.model import build_model, param_shapes, parse_spec, preset_config, region_slices, tier_spec
from aftermath.model.slicing import sliced_model

VARIANTS = {
    "ffn-tiers": dict(matformer_nest_heads=False),
    "head-tiers": dict(),
    "relu2-qknorm-untied": dict(hidden_act="relu2", qk_norm=True, tie_word_embeddings=False),
}


def _specs(cfg):
    return [tier_spec(cfg, 1), tier_spec(cfg, 2), parse_spec(cfg, "mix=512,128,256,64")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_gradient_outside_the_tier(variant):
    cfg = preset_config("tiny", **VARIANTS[variant])
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for spec in _specs(cfg):
        model.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:], spec).backward()
        shapes = param_shapes(cfg, spec)
        for name, p in model.named_parameters():
            inside = torch.zeros_like(p, dtype=torch.bool)
            inside[region_slices(shapes[name])] = True
            assert torch.count_nonzero(p.grad[~inside]) == 0, f"{spec.name}: {name} has gradient outside the tier"
            assert torch.count_nonzero(p.grad[inside]) > 0, f"{spec.name}: {name} got no gradient inside the tier"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sliced_model_equals_universal_at_tier(variant):
    cfg = preset_config("tiny", **VARIANTS[variant])
    model = build_model(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for spec in [tier_spec(cfg, 0)] + _specs(cfg):
            small = sliced_model(model, spec).eval()
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) or spec.tier == 0
            diff = (model(ids, spec) - small(ids)).abs().max().item()
            assert diff <= 1e-5, f"{spec.name}: max abs diff {diff}"


def test_tier_forward_uses_only_tier_width():
    """A universal model at tier 2 is cheaper than at tier 0: it computes only the tier's widths."""
    cfg = preset_config("tiny")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for t in (0, 2):
        with FlopCounterMode(display=False) as counter:
            model(ids, tier_spec(cfg, t))
        flops[t] = counter.get_total_flops()
    sliced = sliced_model(model, tier_spec(cfg, 2))
    with FlopCounterMode(display=False) as counter:
        sliced(ids)
    assert flops[2] == counter.get_total_flops() < flops[0]


def test_sliced_model_cannot_run_wider():
    cfg = preset_config("tiny")
    small = sliced_model(build_model(cfg, seed=0), tier_spec(cfg, 2))
    small(torch.zeros(1, 4, dtype=torch.long), tier_spec(cfg, 3))  # narrower is fine
    with pytest.raises(TierError, match="does not fit within this model's own geometry tier2"):
        small(torch.zeros(1, 4, dtype=torch.long), tier_spec(cfg, 1))


def test_sequence_longer_than_positions_is_an_error():
    cfg = preset_config("tiny", max_position_embeddings=16)
    with pytest.raises(ConfigError, match="sequence length 17 exceeds max_position_embeddings 16"):
        build_model(cfg, seed=0)(torch.zeros(1, 17, dtype=torch.long))


def test_activation_checkpointing_gives_same_gradients():
    cfg = preset_config("tiny")
    model = build_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    grads = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = flag
        model.loss(ids[:, :-1], ids[:, 1:], tier_spec(cfg, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_seeded_init_is_deterministic():
    cfg = preset_config("tiny")
    a, b, c = build_model(cfg, seed=5), build_model(cfg, seed=5), build_model(cfg, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name
