"""Hugging Face-format model directories: config.json + safetensors (single file or shards)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aftermath.checkpoint.streaming import tensor_locations
from aftermath.errors import CheckpointError
from aftermath.model.config import MatFormerConfig
from aftermath.model.transformer import MatFormerLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(tensor_locations(directory).values())):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name)
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return state


def save_model_dir(model: MatFormerLM, directory: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ the tokenizer files found in `tokenizer_dir`).

    The directory is written beside its final place and renamed into it, so it appears complete or not at all.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.config.save(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def load_model_dir(directory: str | Path) -> MatFormerLM:
    """Build the model a directory describes (universal, a tier, or a spec) and load its weights."""
    config = MatFormerConfig.load(directory)
    model = MatFormerLM(config)
    state = load_state_dict(directory)
    expected = set(model.state_dict())
    got = set(state)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{directory}: tensor {name} has shape {tuple(state[name].shape)}, config.json implies "
                f"{tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model
