"""The optimizer state file of a checkpoint: `optimizer_state.safetensors`, beside the weights of the universal
model and of every exported tier, listed and hashed in the manifest like them.

It holds the replica state the apply step reads (aftermath.optim.rule): for AdamW/Muon `exp_avg/NAME`,
`exp_avg_sq/NAME` (NAME's shape) and `t`; for DisTrO no tensor at all. Its metadata names the optimizer, so a
checkpoint of one optimizer is never loaded into another. A tier's file is the universal one cut to the tier:
every `KIND/NAME` tensor sliced to the prefix region of parameter NAME, everything else copied.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aftermath.errors import CheckpointError
from aftermath.model import MatFormerConfig, TierSpec, param_shapes
from aftermath.model.geometry import region_slices

OPTIMIZER_STATE_FILE = "optimizer_state.safetensors"
FORMAT = "aftermath-optimizer-state"


def save_optimizer_state(path: str | Path, state: dict[str, torch.Tensor], optimizer: str) -> Path:
    """Write `state` atomically (temp file + rename) with the optimizer's name in the metadata."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "optimizer": optimizer})
    os.replace(tmp, path)
    return path


def load_optimizer_state(path: str | Path, optimizer: str) -> dict[str, torch.Tensor]:
    """The state in `path`; a CheckpointError when it is unreadable or written by another optimizer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint has no optimizer state for the {optimizer} "
                              f"optimizer; resume from a checkpoint written by this version of Aftermath")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an Aftermath optimizer state (format {meta.get('format')!r})")
    if meta.get("optimizer") != optimizer:
        raise CheckpointError(f"{path} holds the state of the {meta.get('optimizer')!r} optimizer, but the run uses "
                              f"{optimizer!r}; resume with the optimizer the checkpoint was written with")
    return state


def slice_optimizer_state(src: str | Path, dst: str | Path, config: MatFormerConfig, spec: TierSpec) -> Path:
    """Write the tier `spec`'s cut of the universal optimizer state file `src` to `dst`."""
    shapes = param_shapes(config, spec)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        out = {}
        for key in f.keys():
            _, _, param = key.partition("/")
            tensor = f.get_tensor(key)
            if param in shapes:
                tensor = tensor[region_slices(shapes[param])].clone()
            elif param:
                raise CheckpointError(f"{src}: {key} names no parameter of the model; is it from another model?")
            out[key] = tensor
    return save_optimizer_state(dst, out, meta.get("optimizer", ""))
