"""DCT basis, chunking and chunk geometry."""

import math

import pytest
import torch

from aftermath.errors import ConfigError
from aftermath.model import mix_spec, preset_config, tier_spec, max_tier
from aftermath.optim import ChunkPlan, dct_basis, dct_chunks, idct_chunks
from aftermath.optim.payload import index_bits

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def reference_dct(x: list[float]) -> list[float]:
    """Orthonormal DCT-II straight from its formula."""
    n = len(x)
    out = []
    for k in range(n):
        s = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        out.append(s * sum(x[i] * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)))
    return out


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16, 48, 64])
def test_basis_is_orthonormal(n):
    b = dct_basis(n)
    assert torch.allclose(b @ b.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b.T @ b, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_basis_matches_reference_dct2(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    assert torch.allclose(dct_basis(n) @ x, torch.tensor(reference_dct(x.tolist()), dtype=torch.float64), atol=1e-12)


def test_2d_chunks_match_separable_reference_and_invert():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    chunk = (4, 6)
    coeffs = dct_chunks(x, chunk)
    assert coeffs.shape == (4, 24)
    # chunk (1, 0) in row-major grid order is id 2: rows 4..8, cols 0..6
    block = x[4:8, 0:6]
    rows = torch.tensor([reference_dct(r.tolist()) for r in block], dtype=torch.float64)  # along columns
    both = torch.tensor([reference_dct(c.tolist()) for c in rows.T], dtype=torch.float64).T  # then rows
    assert torch.allclose(coeffs[2].reshape(4, 6), both, atol=1e-12)
    assert torch.allclose(idct_chunks(coeffs, (8, 12), chunk), x, atol=1e-12)
    v = torch.randn(12, generator=gen, dtype=torch.float64)
    c1 = dct_chunks(v, (4,))
    assert torch.allclose(c1[1], torch.tensor(reference_dct(v[4:8].tolist()), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(idct_chunks(c1, (12,), (4,)), v, atol=1e-12)


def test_tiny_plan_chunks_follow_the_tier_boundaries():
    plan = ChunkPlan(preset_config("tiny"), chunk=64)
    c = plan.summary()
    assert c["model.layers.0.mlp.gate_proj.weight"] == (64, 64)  # FFN 512/256/128/64
    assert c["model.layers.0.mlp.down_proj.weight"] == (64, 64)
    assert c["model.layers.0.self_attn.q_proj.weight"] == (32, 64)  # q rows 128/64/32
    assert c["model.layers.0.self_attn.k_proj.weight"] == (16, 64)  # kv rows 64/32/16
    assert c["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
    assert c["model.embed_tokens.weight"] == (64, 64)
    assert c["model.norm.weight"] == (64,)


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2-124m"])
def test_every_nested_tier_is_a_union_of_whole_chunks(preset):
    cfg = preset_config(preset)
    plan = ChunkPlan(cfg)
    for t in range(max_tier(cfg) + 1):
        shapes = plan.region_shapes(tier_spec(cfg, t))
        for name, shape in shapes.items():
            assert all(s % c == 0 for s, c in zip(shape, plan.params[name].chunk))


def test_misaligned_mix_spec_is_a_config_error_naming_param_width_and_chunk():
    cfg = preset_config("tiny")
    plan = ChunkPlan(cfg)
    plan.check_spec(mix_spec(cfg, "ok", [512, 192, 64, 320]))
    with pytest.raises(ConfigError) as err:
        plan.check_spec(mix_spec(cfg, "bad", [512, 200, 64, 512]))
    text = str(err.value)
    assert "layers.1.mlp" in text and "200" in text and "64" in text


def test_widths_without_a_common_divisor_are_a_config_error():
    # FFN 536 -> tiers 268, 134, 67: the only common divisor <= 64 is 1
    cfg = preset_config("tiny", intermediate_size=536)
    with pytest.raises(ConfigError) as err:
        ChunkPlan(cfg)
    assert "67" in str(err.value) and "min_chunk" in str(err.value)
    ChunkPlan(cfg, min_chunk=1)  # allowed when asked for explicitly


def test_index_bits_are_the_fewest_that_hold_every_position():
    assert index_bits(64) == 6 and index_bits(4096) == 12  # a 64 x 64 chunk: 12-bit indices
    assert index_bits(3072) == 12 and index_bits(4097) == 13 and index_bits(1) == 1
