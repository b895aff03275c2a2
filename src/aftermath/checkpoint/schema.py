"""What a checkpoint's config says it is: metadata inference, geometry checks, and the schema hash.

- Inference: a config without `matformer_tier` gets its tier from the power-of-two ratio of the base FFN width
  (from the config or the manifest) to its own width; any other ratio is an error.
- Geometry check: a config that says "tier t" must have exactly tier t's widths and heads of its base model.
- Schema hash: one hash of the architecture, the same for the universal model and every tier of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aftermath.errors import CheckpointError, ConfigError
from aftermath.model import MatFormerConfig, TierSpec, max_tier, own_spec, param_shapes, tier_spec


def config_from_dict(data: dict[str, Any], base_intermediate_size: int | None = None,
                     where: str = "config.json") -> MatFormerConfig:
    """A MatFormerConfig from config.json data, inferring the MatFormer metadata a foreign config lacks."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    data = dict(data)
    width = data.get("intermediate_size")
    own_base = data.get("matformer_base_intermediate_size")
    if own_base is not None and base_intermediate_size is not None and own_base != base_intermediate_size:
        raise CheckpointError(
            f"{where} says matformer_base_intermediate_size {own_base}, but its manifest says "
            f"{base_intermediate_size}: the file belongs to another model; re-export the tiers"
        )
    base = own_base if own_base is not None else base_intermediate_size
    if base is not None:
        data["matformer_base_intermediate_size"] = base
    if "matformer_tier" not in data:
        if data.get("matformer_layer_intermediate_sizes"):
            data["matformer_tier"] = -1
        elif base is None or width == base:
            data["matformer_tier"] = 0
        else:
            data["matformer_tier"] = infer_tier(base, width, where)
    try:
        return MatFormerConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def infer_tier(base: int, width: Any, where: str = "config.json") -> int:
    """Tier t such that width == base / 2^t; an error for any other ratio."""
    if not isinstance(width, int) or width <= 0 or base % width:
        raise CheckpointError(
            f"{where}: cannot infer the tier: intermediate_size {width!r} is not the base width {base} divided "
            f"by a power of two; set matformer_tier in config.json or check the base width"
        )
    ratio = base // width
    if ratio & (ratio - 1):
        raise CheckpointError(
            f"{where}: cannot infer the tier: base width {base} / intermediate_size {width} = {ratio} is not a "
            f"power of two (tier t has width base/2^t); set matformer_tier in config.json"
        )
    return ratio.bit_length() - 1


def read_config(directory: str | Path, base_intermediate_size: int | None = None) -> MatFormerConfig:
    """Load `config.json` of a model directory with metadata inference and a geometry check."""
    path = Path(directory)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json at {path}: is this a model directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    config = config_from_dict(data, base_intermediate_size, where=str(path))
    check_geometry(config, where=str(path))
    return config


def check_geometry(config: MatFormerConfig, where: str = "config.json") -> TierSpec:
    """The geometry the config holds, after checking it is what its tier of its base model must be."""
    own = own_spec(config)
    base = config.base()
    tier = config.matformer_tier
    if tier == 0 and not config.is_universal:
        raise CheckpointError(
            f"{where} says matformer_tier 0 (the universal model) but has intermediate_size "
            f"{config.intermediate_size} / {config.num_attention_heads} heads, while the base has "
            f"{config.matformer_base_intermediate_size} / {config.matformer_base_num_attention_heads}; fix the config"
        )
    if tier > 0:
        try:
            expected = tier_spec(base, tier)
        except ConfigError as exc:
            raise CheckpointError(f"{where} says matformer_tier {tier}, which its base model cannot have: {exc}") from exc
        if expected.layers != own.layers:
            raise CheckpointError(
                f"{where} says matformer_tier {tier}, whose geometry is FFN {expected.ffn_widths[0]} / "
                f"{expected.q_heads[0]} query heads, but the config holds FFN {own.ffn_widths[0]} / "
                f"{own.q_heads[0]} heads (a config without matformer_base_num_attention_heads cannot tell the "
                f"base head count: add it)"
            )
    if tier < 0 and not own.fits_within(own_spec(base)):
        raise CheckpointError(f"{where}: the spec's widths exceed its base model")
    return own


def schema_hash(config: MatFormerConfig) -> str:
    """sha256 of the canonical architecture: the universal parameter space, the function and the tier geometry.

    Identical for a universal config and every tier or spec exported from it (a config that lacks
    `matformer_base_intermediate_size` is its own base). Not included: max_position_embeddings, dtype,
    token ids, initialisation: they do not change what a tier's weights mean.
    """
    base = config.base()
    canonical = {
        "format": "aftermath-schema-1",
        "params": {name: list(shape) for name, shape in sorted(param_shapes(base, own_spec(base)).items())},
        "hidden_act": base.hidden_act,
        "qk_norm": base.qk_norm,
        "tie_word_embeddings": base.tie_word_embeddings,
        "rope_theta": float(base.rope_theta),
        "rope_scaling": base.extra.get("rope_scaling"),
        "rms_norm_eps": float(base.rms_norm_eps),
        "tiers": [tier_spec(base, t).to_json() for t in range(max_tier(base) + 1)],
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
