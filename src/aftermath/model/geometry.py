"""Tier geometry: the one source of truth for what a tier or a Mix'n'Match spec keeps.

Every MatFormer region is a *prefix*: tier t keeps the first FFN neurons of each layer (gate/up rows,
down columns) and, when the model nests its heads, the first query heads with the matching first KV heads
(o_proj columns). So the region of a parameter inside the universal tensor is fully described by the
tier's shape of that parameter: `universal[:s0, :s1]`. The model, the exporter, the codec and the
aggregator all ask this module; none recomputes widths on its own.

Rules, for a universal model with FFN width W, H query heads and K KV heads (group g = H/K):
- tier t has FFN width W / 2^t in every layer; W must divide exactly and the width may not drop below
  `matformer_min_intermediate_size`;
- with nested heads, the query-head count halves with each tier while the result is a whole number of
  GQA groups and at least `matformer_min_attention_heads`, then stays; KV heads = query heads / g;
- a Mix'n'Match spec lists one FFN width per layer (and optionally one head count per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from aftermath.errors import TierError
from aftermath.model.config import MatFormerConfig


@dataclass(frozen=True)
class LayerGeometry:
    ffn_width: int
    q_heads: int
    kv_heads: int


@dataclass(frozen=True)
class TierSpec:
    """What one tier (or Mix'n'Match spec) keeps of the universal model, layer by layer."""

    name: str  # "tier0", "tier1", ... or the spec's name
    tier: int | None  # the nested tier number, None for a Mix'n'Match spec
    layers: tuple[LayerGeometry, ...]
    head_dim: int

    @property
    def ffn_widths(self) -> tuple[int, ...]:
        return tuple(layer.ffn_width for layer in self.layers)

    @property
    def q_heads(self) -> tuple[int, ...]:
        return tuple(layer.q_heads for layer in self.layers)

    @property
    def kv_heads(self) -> tuple[int, ...]:
        return tuple(layer.kv_heads for layer in self.layers)

    @property
    def uniform(self) -> bool:
        """True when every layer has the same widths (a config with one intermediate_size can hold it)."""
        return len(set(self.layers)) == 1

    def fits_within(self, other: "TierSpec") -> bool:
        return len(self.layers) == len(other.layers) and all(
            a.ffn_width <= b.ffn_width and a.q_heads <= b.q_heads and a.kv_heads <= b.kv_heads
            for a, b in zip(self.layers, other.layers)
        )

    def to_json(self) -> dict:
        return {"name": self.name, "tier": self.tier, "ffn_widths": list(self.ffn_widths),
                "q_heads": list(self.q_heads), "kv_heads": list(self.kv_heads)}


# ---------------------------------------------------------------------------------------------- tiers
def _nested_heads(config: MatFormerConfig, tier: int) -> tuple[int, int]:
    base_h = config.matformer_base_num_attention_heads
    base_kv = config.matformer_base_num_key_value_heads
    group = base_h // base_kv
    if not config.matformer_nest_heads:
        return base_h, base_kv
    min_heads = config.matformer_min_attention_heads
    if min_heads % group:
        raise TierError(
            f"matformer_min_attention_heads {min_heads} is not a multiple of the GQA group size {group} "
            f"({base_h} query heads / {base_kv} KV heads); use a multiple of {group}"
        )
    heads = base_h
    for _ in range(tier):
        half = heads // 2
        if heads % 2 or half < min_heads or half % group:
            break
        heads = half
    return heads, heads // group


def max_tier(config: MatFormerConfig) -> int:
    """The largest nested tier this model allows."""
    base = config.matformer_base_intermediate_size
    t = 0
    while base % (2 ** (t + 1)) == 0 and base // 2 ** (t + 1) >= config.matformer_min_intermediate_size:
        t += 1
    return t


def tier_spec(config: MatFormerConfig, tier: int) -> TierSpec:
    """The geometry of nested tier `tier` of the universal model `config` belongs to."""
    if not isinstance(tier, int) or isinstance(tier, bool) or tier < 0:
        raise TierError(f"tier must be a non-negative integer, got {tier!r}")
    base = config.matformer_base_intermediate_size
    divisor = 2**tier
    if base % divisor:
        raise TierError(
            f"tier {tier} needs the FFN width {base} to divide by 2^{tier}={divisor}; it does not. "
            f"Use a tier <= {max_tier(config)}"
        )
    width = base // divisor
    if width < config.matformer_min_intermediate_size:
        raise TierError(
            f"tier {tier} would have FFN width {width}, below the smallest allowed width "
            f"{config.matformer_min_intermediate_size} (matformer_min_intermediate_size). "
            f"Use a tier <= {max_tier(config)}"
        )
    q, kv = _nested_heads(config, tier)
    layer = LayerGeometry(ffn_width=width, q_heads=q, kv_heads=kv)
    return TierSpec(name=f"tier{tier}", tier=tier, layers=(layer,) * config.num_hidden_layers,
                    head_dim=config.head_dim)


def mix_spec(config: MatFormerConfig, name: str, ffn_widths: Sequence[int],
             q_heads: Sequence[int] | None = None) -> TierSpec:
    """A Mix'n'Match spec: one FFN width per layer (and optionally one query-head count per layer)."""
    n_layers = config.num_hidden_layers
    base_w = config.matformer_base_intermediate_size
    base_h = config.matformer_base_num_attention_heads
    group = base_h // config.matformer_base_num_key_value_heads
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise TierError(f"spec name {name!r} must be non-empty letters, digits, '-' or '_'")
    if name.startswith("tier") and name[4:].isascii() and name[4:].isdigit():
        raise TierError(f"spec name {name!r} is reserved for nested tiers; pick another name")
    if len(ffn_widths) != n_layers:
        raise TierError(
            f"spec {name!r} lists {len(ffn_widths)} FFN widths; the model has {n_layers} layers "
            f"(give exactly one width per layer)"
        )
    heads = list(q_heads) if q_heads is not None else [base_h] * n_layers
    if len(heads) != n_layers:
        raise TierError(f"spec {name!r} lists {len(heads)} head counts; the model has {n_layers} layers")
    layers = []
    for i, (w, h) in enumerate(zip(ffn_widths, heads)):
        if not isinstance(w, int) or not config.matformer_min_intermediate_size <= w <= base_w:
            raise TierError(
                f"spec {name!r} layer {i}: FFN width {w!r} is outside "
                f"[{config.matformer_min_intermediate_size}, {base_w}] (matformer_min_intermediate_size .. base width)"
            )
        if not isinstance(h, int) or not 0 < h <= base_h or h % group:
            raise TierError(
                f"spec {name!r} layer {i}: {h!r} query heads breaks the GQA grouping: use a multiple of "
                f"{group} between {group} and {base_h}"
            )
        layers.append(LayerGeometry(ffn_width=w, q_heads=h, kv_heads=h // group))
    return TierSpec(name=name, tier=None, layers=tuple(layers), head_dim=config.head_dim)


def parse_spec(config: MatFormerConfig, text: str) -> TierSpec:
    """Parse `NAME=w0,w1,...` (the command-line form of a Mix'n'Match spec)."""
    if "=" not in text:
        raise TierError(f"spec {text!r} must look like NAME=w0,w1,... (one FFN width per layer)")
    name, _, widths = text.partition("=")
    try:
        values = [int(v) for v in widths.split(",") if v.strip()]
    except ValueError as exc:
        raise TierError(f"spec {text!r}: widths must be integers separated by commas") from exc
    return mix_spec(config, name.strip(), values)


def own_spec(config: MatFormerConfig) -> TierSpec:
    """The geometry the model described by `config` itself holds (universal, a tier, or a spec)."""
    group = config.num_attention_heads // config.num_key_value_heads
    widths = config.matformer_layer_intermediate_sizes or [config.intermediate_size] * config.num_hidden_layers
    layers = tuple(LayerGeometry(w, config.num_attention_heads, config.num_attention_heads // group) for w in widths)
    if config.is_universal:
        return TierSpec(name="tier0", tier=0, layers=layers, head_dim=config.head_dim)
    tier = config.matformer_tier if config.matformer_tier >= 0 else None
    name = f"tier{tier}" if tier is not None else (config.matformer_spec_name or "spec")
    return TierSpec(name=name, tier=tier, layers=layers, head_dim=config.head_dim)


# ------------------------------------------------------------------------------------- parameter shapes
def param_shapes(config: MatFormerConfig, spec: TierSpec | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of the model at `spec` (default: the model's own geometry).

    Because regions are prefixes, these shapes are also the regions inside the universal tensors.
    """
    spec = spec or own_spec(config)
    d, hd, v = config.hidden_size, spec.head_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i, layer in enumerate(spec.layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (layer.q_heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (layer.kv_heads * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (layer.kv_heads * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, layer.q_heads * hd)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if config.hidden_act == "silu":
            shapes[p + "mlp.gate_proj.weight"] = (layer.ffn_width, d)
        shapes[p + "mlp.up_proj.weight"] = (layer.ffn_width, d)
        shapes[p + "mlp.down_proj.weight"] = (d, layer.ffn_width)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def region_slices(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index of a tier's region inside a universal tensor, from the tier's shape of that tensor."""
    return tuple(slice(0, n) for n in shape)


def parameter_count(config: MatFormerConfig, spec: TierSpec | None = None) -> int:
    total = 0
    for shape in param_shapes(config, spec).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def sliced_config(config: MatFormerConfig, spec: TierSpec) -> MatFormerConfig:
    """The config of a model built at `spec`'s widths (a sliced tier or spec of `config`'s base)."""
    import dataclasses

    base = config.base()
    if not spec.fits_within(own_spec(base)):
        raise TierError(f"{spec.name} does not fit within the universal model")
    if spec.uniform and len(set(spec.q_heads)) == 1:
        layer = spec.layers[0]
        per_layer = None
        width = layer.ffn_width
    else:
        if len(set(spec.q_heads)) != 1:
            raise TierError(
                f"spec {spec.name!r} varies its heads per layer; a sliced model keeps one head count for all layers"
            )
        per_layer = list(spec.ffn_widths)
        width = max(spec.ffn_widths)
        layer = spec.layers[0]
    return dataclasses.replace(
        base,
        intermediate_size=width,
        num_attention_heads=layer.q_heads,
        num_key_value_heads=layer.kv_heads,
        head_dim=base.head_dim,
        matformer_tier=spec.tier if spec.tier is not None else -1,
        matformer_layer_intermediate_sizes=per_layer,
        matformer_spec_name=None if spec.tier is not None else spec.name,
        extra=dict(base.extra),
    )
