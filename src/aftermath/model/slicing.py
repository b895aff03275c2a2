"""Slicing tensors and models to a tier: the tensor side of the geometry's prefix regions."""

from __future__ import annotations

import torch

from aftermath.errors import TierError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec, param_shapes, region_slices, sliced_config
from aftermath.model.transformer import MatFormerLM


def slice_tensor(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The prefix region of `tensor` with the tier's `shape` (a contiguous copy)."""
    if len(shape) != tensor.dim() or any(s > t for s, t in zip(shape, tensor.shape)):
        raise TierError(f"cannot slice a tensor of shape {tuple(tensor.shape)} to {shape}")
    return tensor[region_slices(shape)].contiguous()


def slice_state_dict(state: dict[str, torch.Tensor], config: MatFormerConfig, spec: TierSpec) -> dict[str, torch.Tensor]:
    """The tensors of `spec`, cut from a state dict of the model `config` describes."""
    shapes = param_shapes(config, spec)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise TierError(f"the state dict lacks {len(missing)} tensors of {spec.name}, e.g. {missing[:3]}")
    return {name: slice_tensor(state[name], shape) for name, shape in shapes.items()}


def sliced_model(model: MatFormerLM, spec: TierSpec) -> MatFormerLM:
    """A new model holding only `spec`'s weights, copied from `model`."""
    model.check_spec(spec)
    config = sliced_config(model.config, spec)
    small = MatFormerLM(config)
    state = slice_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.config, spec)
    small.load_state_dict(state, strict=True)
    return small
