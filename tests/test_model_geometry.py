"""Tier geometry: widths, heads, Mix'n'Match specs, and the errors for tiers that cannot exist."""

import pytest

from aftermath.errors import ConfigError, TierError
from aftermath.model.transformer import MatFormerLM
from aftermath.model import (
    MatFormerConfig,
    max_tier,
    mix_spec,
    own_spec,
    param_shapes,
    parameter_count,
    parse_spec,
    preset_config,
    sliced_config,
    tier_spec,
)


def test_ffn_and_head_tiers_of_tiny():
    cfg = preset_config("tiny")  # ffn 512, 8 query heads, 4 KV heads, heads nest
    assert [tier_spec(cfg, t).ffn_widths[0] for t in range(4)] == [512, 256, 128, 64]
    assert [tier_spec(cfg, t).q_heads[0] for t in range(4)] == [8, 4, 2, 2]  # stops at one GQA group
    assert [tier_spec(cfg, t).kv_heads[0] for t in range(4)] == [4, 2, 1, 1]
    assert max_tier(cfg) == 3


def test_heads_stay_when_not_nested():
    cfg = preset_config("tiny", matformer_nest_heads=False)
    assert tier_spec(cfg, 2).q_heads == (8,) * 4
    assert tier_spec(cfg, 2).kv_heads == (4,) * 4


def test_param_shapes_are_prefix_regions():
    cfg = preset_config("tiny")
    full = param_shapes(cfg)
    t1 = param_shapes(cfg, tier_spec(cfg, 1))
    assert full.keys() == t1.keys()
    assert t1["model.layers.0.mlp.gate_proj.weight"] == (256, 128)
    assert t1["model.layers.0.mlp.down_proj.weight"] == (128, 256)
    assert t1["model.layers.0.self_attn.q_proj.weight"] == (64, 128)  # 4 heads x 16
    assert t1["model.layers.0.self_attn.k_proj.weight"] == (32, 128)  # 2 KV heads x 16
    assert t1["model.layers.0.self_attn.o_proj.weight"] == (128, 64)
    assert t1["model.embed_tokens.weight"] == full["model.embed_tokens.weight"]
    for name in full:
        assert all(a <= b for a, b in zip(t1[name], full[name]))


def test_parameter_counts_shrink_with_tier_and_match_the_sliced_models():
    cfg = preset_config("tiny")
    counts = [parameter_count(cfg, tier_spec(cfg, t)) for t in range(4)]
    # counted independently: the parameters of the model each tier's sliced config builds
    built = [sum(p.numel() for p in MatFormerLM(sliced_config(cfg, tier_spec(cfg, t))).parameters()) for t in range(4)]
    assert counts == built
    assert all(a > b for a, b in zip(counts, counts[1:]))  # every tier is strictly smaller (its FFN halves)
    assert counts[0] == sum(p.numel() for p in MatFormerLM(cfg).parameters())


def test_mix_n_match_spec():
    cfg = preset_config("tiny")
    spec = parse_spec(cfg, "mix=512,256,128,64")
    assert spec.ffn_widths == (512, 256, 128, 64)
    assert spec.tier is None and spec.name == "mix"
    assert param_shapes(cfg, spec)["model.layers.2.mlp.up_proj.weight"] == (128, 128)
    sliced = sliced_config(cfg, spec)
    assert sliced.matformer_layer_intermediate_sizes == [512, 256, 128, 64]
    assert own_spec(sliced).ffn_widths == spec.ffn_widths
    assert not sliced.transformers_compatible


def test_sliced_config_round_trips_through_json(tmp_path):
    cfg = preset_config("tiny")
    sliced = sliced_config(cfg, tier_spec(cfg, 2))
    sliced.save(tmp_path)
    loaded = MatFormerConfig.load(tmp_path)
    assert loaded.intermediate_size == 128 and loaded.matformer_tier == 2
    assert loaded.matformer_base_intermediate_size == 512
    assert loaded.num_attention_heads == 2 and loaded.matformer_base_num_attention_heads == 8
    assert own_spec(loaded) == tier_spec(cfg, 2)
    assert loaded.base().intermediate_size == 512


def test_width_that_does_not_divide_is_an_error():
    cfg = preset_config("tiny", intermediate_size=384, matformer_min_intermediate_size=16)  # 384 = 2^7 * 3
    assert tier_spec(cfg, 4).ffn_widths[0] == 24
    with pytest.raises(TierError, match=r"384 to divide by 2\^8=256"):
        tier_spec(cfg, 8)


def test_tier_beyond_smallest_width_is_an_error():
    cfg = preset_config("tiny")
    with pytest.raises(TierError, match=r"FFN width 32, below the smallest allowed width 64.*tier <= 3"):
        tier_spec(cfg, 4)


def test_negative_tier_is_an_error():
    with pytest.raises(TierError, match="non-negative"):
        tier_spec(preset_config("tiny"), -1)


def test_heads_that_break_gqa_grouping_are_an_error():
    cfg = preset_config("tiny")  # group of 2 query heads per KV head
    with pytest.raises(TierError, match=r"3 query heads breaks the GQA grouping: use a multiple of 2"):
        mix_spec(cfg, "odd", [512] * 4, q_heads=[8, 8, 3, 8])
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        preset_config("tiny", num_attention_heads=6, num_key_value_heads=4, head_dim=16)
    with pytest.raises(TierError, match="matformer_min_attention_heads 3 is not a multiple of the GQA group size 2"):
        tier_spec(preset_config("tiny", matformer_min_attention_heads=3), 1)


def test_spec_with_wrong_number_of_layers_is_an_error():
    cfg = preset_config("tiny")
    with pytest.raises(TierError, match=r"lists 3 FFN widths; the model has 4 layers"):
        parse_spec(cfg, "short=512,256,128")
    with pytest.raises(TierError, match=r"FFN width 1024 is outside \[64, 512\]"):
        parse_spec(cfg, "wide=1024,512,512,512")
    with pytest.raises(TierError, match="NAME=w0,w1"):
        parse_spec(cfg, "512,256")


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        preset_config("tiny", hidden_act="gelu")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")
