"""Resuming a run from its directory: what a restarted coordinator takes from `state.json` and the checkpoint,
and the refusal to resume a run whose config changed what the run computes.

`state.json` records the run config it was written under. On resume every field that shapes the trajectory
(TRAJECTORY_FIELDS: the seed, the model, the optimizer, the data and the batch, the run's length, which sets the
LR schedule, and the round schedule, which sets how stale each gradient is) is compared with the new config; a
change is refused with every changed field named, unless the operator forces it (`--force-resume`). The run
then goes on from the recorded data position, so no sequence is trained twice or skipped even when the global
batch size changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftermath.coordinator.persist import load_state
from aftermath.errors import ConfigError
from aftermath.runconfig import RunConfig

log = logging.getLogger("aftermath.coordinator")

TRAJECTORY_FIELDS = ("seed", "model", "optimizer", "data.dir", "data.seq_len", "schedule.global_batch_size",
                     "schedule.total_steps", "schedule.overlap")


@dataclass
class ResumePoint:
    """Where a restarted run goes on: the last checkpoint's epoch and step, and the history before it."""

    epoch: int
    step: int
    data_position: int  # the first global sequence of `step`
    val_history: list[dict[str, Any]] = field(default_factory=list)
    reference_hashes: dict[int, dict[str, str]] = field(default_factory=dict)
    hash_reports: list[dict[str, Any]] = field(default_factory=list)
    divergences: list[dict[str, Any]] = field(default_factory=list)
    exclusions: dict[str, tuple[int, str]] = field(default_factory=dict)  # client -> (step, reason): never back


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed_fields(old: dict[str, Any], new: RunConfig) -> list[str]:
    """'field: old -> new' for every trajectory field that differs between a recorded config and `new`."""
    before, after = _flatten(old), _flatten(new.public())
    changes = []
    for key in sorted(set(before) | set(after)):
        if any(key == f or key.startswith(f + ".") for f in TRAJECTORY_FIELDS) and before.get(key) != after.get(key):
            changes.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def resume_point(run: RunConfig, run_dir: Path, checkpoint_info: dict[str, Any], *,
                 force: bool = False) -> ResumePoint | None:
    """The point to resume from, or None for a new run. Raises ConfigError for a finished run, another run, or
    a changed config (unless `force`)."""
    previous = load_state(run_dir)
    if previous is not None and previous.get("finished"):
        raise ConfigError(f"{run_dir} holds a finished run (step {previous['step']}); choose another --run-dir or "
                          f"move it away")
    if previous is not None and previous.get("run_id") != run.run_id:
        raise ConfigError(f"{run_dir} holds run {previous.get('run_id')!r}, not {run.run_id!r}; choose another "
                          f"--run-dir or use that run's config")
    if previous is not None and isinstance(previous.get("run"), dict):
        changes = changed_fields(previous["run"], run)
        if changes and not force:
            raise ConfigError(f"{run_dir} was run with another config; changed: {'; '.join(changes)}. Restore those "
                              f"values, or pass --force-resume to go on with the new ones")
        for change in changes:
            log.warning("resuming with a changed config: %s", change)
    batch = run.sequences_per_round
    if previous is None:
        if checkpoint_info.get("epoch", -1) >= 0 and checkpoint_info.get("run_id") == run.run_id:
            # killed after the first epoch's checkpoint but before state.json existed
            step = checkpoint_info["step"]
            return ResumePoint(epoch=checkpoint_info["epoch"], step=step, data_position=step * batch)
        return None
    point = ResumePoint(
        epoch=previous["epoch"], step=previous["step"],
        data_position=int(previous.get("data_position", previous["step"] * batch)),
        val_history=list(previous.get("val_history", [])),
        reference_hashes={int(k): v for k, v in (previous.get("reference_hashes") or {}).items()},
        hash_reports=list(previous.get("hash_reports", [])),
        divergences=list(previous.get("divergences", [])),
        exclusions={cid: (int(step), str(reason))
                    for cid, (step, reason) in (previous.get("exclusions") or {}).items()})
    if checkpoint_info.get("step", -1) > point.step and checkpoint_info.get("epoch", -1) > point.epoch:
        # killed after the checkpoint swap but before state.json: the complete newer checkpoint wins
        log.warning("%s: the checkpoint holds epoch %s step %s, newer than state.json: resuming from it",
                    run_dir, checkpoint_info["epoch"], checkpoint_info["step"])
        point.data_position += (checkpoint_info["step"] - point.step) * batch
        point.epoch, point.step = checkpoint_info["epoch"], checkpoint_info["step"]
        point.val_history.append({"epoch": point.epoch, "step": point.step,
                                  "val_loss": checkpoint_info.get("val_loss", {})})
        point.reference_hashes[point.epoch] = dict(checkpoint_info.get("weights_sha256", {}))
    return point
