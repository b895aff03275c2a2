"""Model configuration: Hugging Face Llama fields plus the MatFormer fields.

`config.json` files written from this class load in transformers as `LlamaForCausalLM` (unless a
NanoGPT-style option is on, in which case the file says so in `aftermath_transformers_compatible`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftermath.errors import ConfigError

ACTIVATIONS = ("silu", "relu2")


@dataclass
class MatFormerConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"  # "silu" (SwiGLU, as Llama) or "relu2" (NanoGPT-style ReLU², gate unused)
    qk_norm: bool = False  # NanoGPT-style RMSNorm of queries and keys per head
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "float32"
    # --- MatFormer fields ---
    matformer_tier: int = 0  # 0 = the universal model; t = the nested tier t; -1 = a Mix'n'Match spec
    matformer_base_intermediate_size: int | None = None  # FFN width of the universal model
    matformer_min_intermediate_size: int | None = None  # smallest FFN width a tier may have (default base/8)
    matformer_nest_heads: bool = False  # whether attention heads nest across tiers
    matformer_base_num_attention_heads: int | None = None
    matformer_base_num_key_value_heads: int | None = None
    matformer_min_attention_heads: int | None = None  # smallest query-head count (default: one KV group)
    matformer_layer_intermediate_sizes: list[int] | None = None  # Mix'n'Match: per-layer FFN widths
    matformer_spec_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys of a loaded config.json, kept as is

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.matformer_base_intermediate_size is None:
            self.matformer_base_intermediate_size = self.intermediate_size
        if self.matformer_base_num_attention_heads is None:
            self.matformer_base_num_attention_heads = self.num_attention_heads
        if self.matformer_base_num_key_value_heads is None:
            self.matformer_base_num_key_value_heads = self.num_key_value_heads
        if self.matformer_min_intermediate_size is None:
            self.matformer_min_intermediate_size = max(1, self.matformer_base_intermediate_size // 8)
        group = self.matformer_base_num_attention_heads // max(1, self.matformer_base_num_key_value_heads)
        if self.matformer_min_attention_heads is None:
            self.matformer_min_attention_heads = group
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads} (grouped-query attention needs whole groups)"
            )
        base_h = self.matformer_base_num_attention_heads
        base_kv = self.matformer_base_num_key_value_heads
        if base_h % base_kv:
            raise ConfigError(
                f"matformer_base_num_attention_heads {base_h} is not a multiple of "
                f"matformer_base_num_key_value_heads {base_kv}"
            )
        if self.num_attention_heads // self.num_key_value_heads != base_h // base_kv:
            raise ConfigError(
                f"this model has {self.num_attention_heads // self.num_key_value_heads} query heads per KV head, "
                f"its base model {base_h // base_kv}: a tier keeps whole GQA groups"
            )
        if self.intermediate_size > self.matformer_base_intermediate_size:
            raise ConfigError(
                f"intermediate_size {self.intermediate_size} exceeds matformer_base_intermediate_size "
                f"{self.matformer_base_intermediate_size}"
            )
        if self.matformer_layer_intermediate_sizes is not None:
            widths = self.matformer_layer_intermediate_sizes
            if len(widths) != self.num_hidden_layers:
                raise ConfigError(
                    f"matformer_layer_intermediate_sizes has {len(widths)} entries; the model has "
                    f"{self.num_hidden_layers} layers"
                )

    # ------------------------------------------------------------------ derived facts
    @property
    def is_universal(self) -> bool:
        """True when this config describes the full (unsliced) model."""
        return (
            self.matformer_tier == 0
            and self.matformer_layer_intermediate_sizes is None
            and self.intermediate_size == self.matformer_base_intermediate_size
            and self.num_attention_heads == self.matformer_base_num_attention_heads
        )

    @property
    def transformers_compatible(self) -> bool:
        """Whether transformers' LlamaForCausalLM computes the same function as this model."""
        return self.hidden_act == "silu" and not self.qk_norm and self.matformer_layer_intermediate_sizes is None

    def base(self) -> "MatFormerConfig":
        """The universal model's config (this config with every MatFormer dimension restored)."""
        return dataclasses.replace(
            self,
            intermediate_size=self.matformer_base_intermediate_size,
            num_attention_heads=self.matformer_base_num_attention_heads,
            num_key_value_heads=self.matformer_base_num_key_value_heads,
            matformer_tier=0,
            matformer_layer_intermediate_sizes=None,
            matformer_spec_name=None,
            extra=dict(self.extra),
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        data.update(self.extra)
        data.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
            use_cache=True,
            aftermath_transformers_compatible=self.transformers_compatible,
        )
        if not self.transformers_compatible:
            data["aftermath_note"] = (
                "this checkpoint uses options transformers' Llama does not implement "
                "(relu2 activation, QK-norm or per-layer FFN widths): load it with Aftermath"
            )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MatFormerConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        derived = {"model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp", "use_cache",
                   "aftermath_transformers_compatible", "aftermath_note"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in derived}
        if data.get("model_type", "llama") != "llama":
            raise ConfigError(f"model_type {data.get('model_type')!r} is not supported; Aftermath models are 'llama'")
        if "rope_parameters" in extra and "rope_theta" not in kwargs:
            theta = (extra.get("rope_parameters") or {}).get("rope_theta")
            if theta is not None:
                kwargs["rope_theta"] = float(theta)
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "MatFormerConfig":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: is this a model directory?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: tests and the demo
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                 matformer_nest_heads=True),
    # ~15M parameters: the CPU experiments
    "small": dict(vocab_size=4096, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  matformer_nest_heads=True),
    # GPT-2-124M class: 12 layers, 768 wide, 12 heads, tied 50k vocabulary, SwiGLU at 8/3 width (~124M)
    "gpt2-124m": dict(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                      matformer_nest_heads=True, matformer_min_attention_heads=3),
    # GPT-2-medium class: 24 layers, 1024 wide, 16 heads, tied 50k vocabulary (~341M). SwiGLU at 2.5x width
    # (2560; GPT-2's 4096 is for a 2-matrix GELU FFN) keeps the parameter count of that class, and halves
    # 2560 / 1280 / 640 / 320 stay multiples of the 64-wide DCT chunk. Heads 16 / 8 / 4 / 4 as gpt2-124m's.
    "gpt2-350m": dict(vocab_size=50304, hidden_size=1024, intermediate_size=2560, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                      matformer_nest_heads=True, matformer_min_attention_heads=4),
}


def preset_config(name: str, **overrides: Any) -> MatFormerConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MatFormerConfig(**{**PRESETS[name], **overrides})
