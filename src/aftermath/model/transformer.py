"""The MatFormer transformer: LLaMA-style (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face Llama. One module serves both roles:
- the *universal* model run at a tier: `model(ids, spec=tier_spec(cfg, 1))` reads prefix views of its
  weights, so it computes only the tier's widths and every weight outside the tier gets exactly zero
  gradient;
- a *sliced* model, built from `sliced_config(cfg, spec)`, which holds only the prefix weights.
Both give the same logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aftermath.errors import ConfigError, TierError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import LayerGeometry, TierSpec, own_spec
from aftermath.model.loss import chunked_cross_entropy


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm, `weight * (x * rsqrt(mean(x^2) + eps))`, keeping for backward only x and the per-token
    scale: autograd's own graph of these operations also keeps the normalised copy of x, one residual-stream
    tensor more per norm (two per layer), which does not shrink with the tier. Backward recomputes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x32 = x.to(_at_least_fp32(x.dtype))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(rstd.dtype)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping for backward only gate and up: autograd's own graph also keeps silu(gate), one
    FFN-width tensor more per layer. Backward recomputes it (elementwise, cheap)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad * silu


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: MatFormerConfig, q_heads: int, kv_heads: int) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, q_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(q_heads * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        # Prefix views: the tier's heads are the first q_heads / kv_heads heads.
        q = F.linear(x, self.q_proj.weight[: q_heads * hd]).view(b, s, q_heads, hd).transpose(1, 2)
        k = F.linear(x, self.k_proj.weight[: kv_heads * hd]).view(b, s, kv_heads, hd).transpose(1, 2)
        v = F.linear(x, self.v_proj.weight[: kv_heads * hd]).view(b, s, kv_heads, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = q_heads // kv_heads
        if group > 1:  # query head j reads KV head j // group, as Hugging Face's repeat_kv
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, q_heads * hd)
        return F.linear(out, self.o_proj.weight[:, : q_heads * hd])


class MLP(nn.Module):
    def __init__(self, config: MatFormerConfig, width: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.act = config.hidden_act
        self.gate_proj = nn.Linear(d, width, bias=False) if self.act == "silu" else None
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        up = F.linear(x, self.up_proj.weight[:width])
        if self.act == "silu":
            hidden = _SwiGLUFunction.apply(F.linear(x, self.gate_proj.weight[:width]), up)
        else:  # relu2
            hidden = F.relu(up).square()
        return F.linear(hidden, self.down_proj.weight[:, :width])


class DecoderLayer(nn.Module):
    def __init__(self, config: MatFormerConfig, ffn_width: int, q_heads: int, kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, q_heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, ffn_width)


class Backbone(nn.Module):
    """`model.*` in Hugging Face names."""

    def __init__(self, config: MatFormerConfig, spec: TierSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, g.ffn_width, g.q_heads, g.kv_heads) for g in spec.layers
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _layer_forward(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   g: LayerGeometry) -> torch.Tensor:
    x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, g.q_heads, g.kv_heads)
    return x + layer.mlp(layer.post_attention_layernorm(x), g.ffn_width)


class MatFormerLM(nn.Module):
    def __init__(self, config: MatFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = own_spec(config)
        self.model = Backbone(config, self.spec)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        # Recompute each layer's activations in backward instead of keeping them: trades compute for the
        # activation memory that does not shrink with the tier.
        self.activation_checkpointing = False

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int) -> "MatFormerLM":
        """GPT-2-style init from a seed: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in sorted(self.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        return self

    # ------------------------------------------------------------------ forward
    def check_spec(self, spec: TierSpec | None) -> TierSpec:
        if spec is None:
            return self.spec
        if not spec.fits_within(self.spec):
            raise TierError(
                f"{spec.name} (FFN widths {list(spec.ffn_widths)}, heads {list(spec.q_heads)}) does not fit within "
                f"this model's own geometry {self.spec.name} (FFN widths {list(self.spec.ffn_widths)}, heads "
                f"{list(self.spec.q_heads)}): a sliced model can only run at its own tier or a smaller one"
            )
        return spec

    def forward(self, input_ids: torch.Tensor, spec: TierSpec | None = None) -> torch.Tensor:
        """Logits of `input_ids` (batch, seq) computed at `spec` (default: the model's own geometry)."""
        return F.linear(self.hidden_states(input_ids, spec), self.head_weight())

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, spec: TierSpec | None = None) -> torch.Tensor:
        """The final normed hidden states (batch, seq, hidden_size), before the output head."""
        spec = self.check_spec(spec)
        seq = input_ids.shape[-1]
        if seq > self.config.max_position_embeddings:
            raise ConfigError(
                f"sequence length {seq} exceeds max_position_embeddings {self.config.max_position_embeddings}; "
                f"use a sequence length <= {self.config.max_position_embeddings}"
            )
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(seq, x.device, x.dtype)
        for layer, g in zip(self.model.layers, spec.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(_layer_forward, layer, x, cos, sin, g, use_reentrant=False)
            else:
                x = _layer_forward(layer, x, cos, sin, g)
        return self.model.norm(x)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, spec: TierSpec | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy, without ever holding the full logits (aftermath.model.loss)."""
        return chunked_cross_entropy(self.hidden_states(input_ids, spec), self.head_weight(), targets)


def build_model(config: MatFormerConfig, seed: int | None = None) -> MatFormerLM:
    model = MatFormerLM(config)
    if seed is not None:
        model.init_weights(seed)
    return model
