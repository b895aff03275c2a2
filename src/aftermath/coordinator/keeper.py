"""The coordinator's own universal replica: it applies every round's accepted set exactly as the clients do,
so epoch checkpoints do not depend on any client, and it can evaluate every tier and compute the reference
replica hash of every tier.

Checkpoint layout in the run directory (replaced as a whole at each epoch end):

    RUN_DIR/checkpoint/model/                 universal HF checkpoint + optimizer_state.safetensors
                                              + matformer_manifest.json
    RUN_DIR/checkpoint/model-tier1/ ...       tier exports, each with its cut of the optimizer state
                                              (aftermath.checkpoint.export.export_tiers)
    RUN_DIR/checkpoint/checkpoint.json        epoch, step, run id, optimizer, replica hash per exported tier,
                                              validation loss per exported tier and per Mix'n'Match spec
                                              between adjacent ones (aftermath.round.objective)

A new checkpoint is built in `RUN_DIR/.checkpoint-tmp` and swapped in by renames, so `checkpoint/` is always
a complete checkpoint (or, for an instant during the swap, `.checkpoint-old/` is).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from aftermath.checkpoint.export import export_tiers
from aftermath.checkpoint.hf_dir import load_model_dir, save_model_dir
from aftermath.checkpoint.manifest import read_manifest
from aftermath.checkpoint.optimizer_state import OPTIMIZER_STATE_FILE, load_optimizer_state, save_optimizer_state
from aftermath.checkpoint.schema import schema_hash
from aftermath.errors import CheckpointError, ConfigError
from aftermath.model import MatFormerConfig, TierSpec, build_model, preset_config, tier_spec
from aftermath.model.geometry import max_tier
from aftermath.optim import Payload
from aftermath.optim.update import encode_update
from aftermath.round.objective import mix_specs_between
from aftermath.round.replica import Replica
from aftermath.runconfig import RunConfig

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
INFO_FILE = "checkpoint.json"
EVAL_BATCH = 8


def run_model_config(run: RunConfig) -> MatFormerConfig:
    """The universal model config of a run: the init checkpoint's, or the preset with its overrides."""
    if run.model.init:
        config = MatFormerConfig.load(run.model.init)
        if not config.is_universal:
            raise ConfigError(f"model.init {run.model.init} is a sliced tier; start from a universal checkpoint")
        return config
    try:
        return preset_config(run.model.preset, **run.model.overrides)
    except TypeError as exc:
        raise ConfigError(f"[model.overrides] has a key MatFormerConfig does not know: {exc}") from exc


class ModelKeeper:
    def __init__(self, run: RunConfig, run_dir: str | Path, data_dir: Path | None = None) -> None:
        self.run = run
        self.run_dir = Path(run_dir)
        self.config = run_model_config(run)
        self.schema_hash = schema_hash(self.config)
        self.spec = tier_spec(self.config, 0)
        self.data_dir = data_dir
        for t in run.model.export_tiers:
            if t < 0 or t > max_tier(self.config):
                raise ConfigError(f"model.export_tiers lists tier {t}; this model has tiers 0..{max_tier(self.config)}")
        self.replica: Replica | None = None
        self.val_stream = None  # the validation TokenStream, when the coordinator has the data
        self.val_history: list[dict[str, Any]] = []  # per checkpoint: epoch, step, val_loss per spec

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    # ------------------------------------------------------------------ start
    def recover(self) -> str | None:
        """Repair what a process killed while writing a checkpoint left behind: if the swap was interrupted
        between its two renames, the previous checkpoint is in `.checkpoint-old`: put it back. A half-written
        `.checkpoint-tmp` is removed. Returns what was done (None: nothing to do)."""
        tmp, old = self.run_dir / ".checkpoint-tmp", self.run_dir / ".checkpoint-old"
        done = None
        if not self.checkpoint_dir.exists() and old.exists():
            os.replace(old, self.checkpoint_dir)
            done = "restored the previous checkpoint from .checkpoint-old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
                done = done or f"removed the unfinished {leftover.name}"
        return done

    def start(self, resume_step: int | None) -> None:
        """Build the replica: from the last checkpoint (weights and optimizer state) when resuming, else from
        `model.init` or the seed."""
        state = None
        if resume_step is not None:
            info = self.checkpoint_info()
            if info.get("step") != resume_step:
                raise CheckpointError(f"{self.checkpoint_dir} holds step {info.get('step')}, state.json step "
                                      f"{resume_step}; move the run directory away to start afresh")
            model = load_model_dir(self.checkpoint_dir / MODEL_DIR)
            state = load_optimizer_state(self.checkpoint_dir / MODEL_DIR / OPTIMIZER_STATE_FILE,
                                         self.run.optimizer.name)
        elif self.run.model.init:
            model = load_model_dir(self.run.model.init)
        else:
            model = build_model(self.config, seed=self.run.seed)
        self.replica = Replica.build(model, self.config, self.spec, self.run, state)
        if self.data_dir is not None:
            from aftermath.data import TokenStream

            self.val_stream = TokenStream(self.data_dir, self.run.data.seq_len, seed=self.run.seed, split="val",
                                          vocab_size=self.config.vocab_size,
                                          max_positions=self.config.max_position_embeddings)

    # ------------------------------------------------------------------ rounds
    def apply_round(self, step: int, payloads: list[Payload], accepted: str | None = None) -> bytes | None:
        """Apply step `step`'s accepted set to the universal replica. With `accepted` (its accepted_digest), the
        round's update is computed once, applied, and returned as the blob to publish (the data plane 'update');
        without it the payloads are aggregated and applied streamed, and nothing is returned."""
        assert self.replica is not None
        if accepted is None:
            self.replica.apply(payloads, step)
            return None
        update = self.replica.round_update(payloads, step, accepted)
        self.replica.apply_update(update, step)
        return encode_update(update, self.replica.rule.codec.plan)

    def tier_hash(self, spec: TierSpec) -> str:
        assert self.replica is not None
        return self.replica.weights_sha256(spec)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, specs: list[TierSpec]) -> dict[str, float]:
        """Validation loss of the replica at each spec (aftermath.evaluate on the first `val_sequences`)."""
        if self.val_stream is None or self.replica is None:
            return {}
        from aftermath.evaluate import evaluate

        batches = max(1, math.ceil(self.run.data.val_sequences / EVAL_BATCH))
        return {spec.name: evaluate(self.replica.model, self.val_stream, spec, max_batches=batches,
                                    batch_size=EVAL_BATCH).loss for spec in specs}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_info(self) -> dict[str, Any]:
        path = self.checkpoint_dir / INFO_FILE
        if not path.is_file():
            return {}
        return json.loads(path.read_text())

    def write_checkpoint(self, epoch: int, step: int, extra_specs: list[TierSpec] = ()) -> dict[str, Any]:
        """Universal checkpoint + tier exports + manifest, swapped into RUN_DIR/checkpoint atomically."""
        assert self.replica is not None
        start = time.perf_counter()
        tmp = self.run_dir / ".checkpoint-tmp"
        old = self.run_dir / ".checkpoint-old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir(parents=True)
        tokenizer_dir = self.data_dir if self.data_dir is not None and (self.data_dir / "tokenizer.json").is_file() else None
        save_model_dir(self.replica.model, tmp / MODEL_DIR, tokenizer_dir=tokenizer_dir)
        save_optimizer_state(tmp / MODEL_DIR / OPTIMIZER_STATE_FILE, self.replica.state_dict(),
                             self.run.optimizer.name)
        tiers = [t for t in self.run.model.export_tiers if t > 0]
        specs = [s for s in extra_specs if s.tier is None]
        export_tiers(tmp / MODEL_DIR, tiers=tiers, specs=specs)
        all_specs = [tier_spec(self.config, t) for t in sorted({0, *tiers})] + specs
        hashes = {s.name: self.tier_hash(s) for s in all_specs}
        # the Mix'n'Match specs between exported tiers are evaluated too (not exported): they hold up only
        # if the tiers around them are trained models
        between = [s for s in mix_specs_between(self.config, self.run.model.export_tiers)
                   if s.name not in {x.name for x in specs}]
        val = self.evaluate(all_specs + between)
        self.val_history.append({"epoch": epoch, "step": step, "val_loss": val})
        info = {"run_id": self.run.run_id, "epoch": epoch, "step": step, "schema_hash": self.schema_hash,
                "optimizer": self.run.optimizer.name, "weights_sha256": hashes, "val_loss": val, "written_at": time.time()}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        if old.exists():
            shutil.rmtree(old)
        info["seconds"] = time.perf_counter() - start
        return info

    def export_spec(self, spec: TierSpec) -> None:
        """Add the Mix'n'Match `spec` to the current checkpoint (its manifest is rewritten atomically, last)."""
        model_dir = self.checkpoint_dir / MODEL_DIR
        manifest = read_manifest(model_dir)
        if manifest is not None and manifest.entry(name=spec.name) is not None:
            return
        export_tiers(model_dir, specs=[spec])

    def manifest_json(self) -> dict[str, Any] | None:
        manifest = read_manifest(self.checkpoint_dir / MODEL_DIR)
        return None if manifest is None else manifest.to_json()

