"""The MatFormer model: config, tier geometry, the transformer."""

from aftermath.model.config import PRESETS, MatFormerConfig, preset_config
from aftermath.model.geometry import (
    LayerGeometry,
    TierSpec,
    max_tier,
    mix_spec,
    own_spec,
    param_shapes,
    parameter_count,
    parse_spec,
    region_slices,
    sliced_config,
    tier_spec,
)
from aftermath.model.transformer import MatFormerLM, build_model

__all__ = [
    "PRESETS", "MatFormerConfig", "preset_config", "LayerGeometry", "TierSpec", "max_tier", "mix_spec",
    "own_spec", "param_shapes", "parameter_count", "parse_spec", "region_slices",
    "sliced_config", "tier_spec", "MatFormerLM", "build_model",
]
