"""A run's history, rebuilt from the coordinator's metrics records (RUN_DIR/metrics/coordinator.jsonl).

The same builder serves the live dashboard (which tails the file as the coordinator appends to it) and the
report (which reads the whole file after the run), so both show the same numbers. Pure: records in, lists out.

What the coordinator writes (aftermath.coordinator.service): one record per state-machine event (`joined`,
`dropped`, `deferred`, `phase`, `round_started`, `round_accepted`, `epoch_ended`, `finished`, `paused`,
`resumed`, `screened` and `excluded` with their reason), `screen` per round (every payload's screening
statistics), `applied` per round (payload bytes, the accepted clients' losses), `checkpoint` per epoch
(validation loss and replica hash per tier), `rejected` for refused results, and `summary` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aftermath.model import MatFormerConfig, TierSpec, parameter_count
from aftermath.round.objective import regressions

# Events worth showing a person (phase changes and round starts are in the round panel instead).
NOTABLE_EVENTS = ("joined", "dropped", "deferred", "rejected", "screened", "excluded", "fault", "paused", "resumed",
                  "epoch_ended", "checkpoint", "tier_regressed", "finished", "error", "mismatch")
MAX_EVENTS = 200


def tier_label(tier: int | None, spec: str | None) -> str:
    """The name a tier's series carries: the spec name (tier0, tier1, or a Mix'n'Match name)."""
    if spec:
        return spec
    return f"tier{tier}" if tier is not None else "unknown"


class DenseBytes:
    """client id -> bytes of its update as dense fp32 (its spec's parameter count x 4; None: spec unknown)."""

    def __init__(self, config: MatFormerConfig, spec_of: Callable[[str], TierSpec | None]) -> None:
        self.config = config
        self.spec_of = spec_of
        self._by_spec: dict[str, int] = {}

    def __call__(self, client_id: str) -> int | None:
        spec = self.spec_of(client_id)
        if spec is None:
            return None
        if spec.name not in self._by_spec:
            self._by_spec[spec.name] = 4 * parameter_count(self.config, spec)
        return self._by_spec[spec.name]


@dataclass
class RunHistory:
    """Series of a run. `dense_bytes_of(client_id)` gives the size of that client's dense fp32 update, for the
    compression ratio (None when unknown)."""

    dense_bytes_of: Callable[[str], int | None] = lambda cid: None
    client_tier: dict[str, tuple[int | None, str]] = field(default_factory=dict)  # id -> (tier, spec label)
    train_loss: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # label -> step -> losses
    val_loss: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> [{epoch, step, loss}]
    bandwidth: list[dict[str, Any]] = field(default_factory=list)  # per applied round
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    round_times: list[tuple[int, float]] = field(default_factory=list)  # (step, wall time when applied)

    # ------------------------------------------------------------------ feeding
    def add(self, rec: dict[str, Any]) -> None:
        kind = rec.get("event")
        if kind == "joined":
            cid = rec.get("client_id", "?")
            self.client_tier[cid] = (rec.get("tier"), tier_label(rec.get("tier"), rec.get("spec")))
        elif kind == "applied":
            self._add_round(rec)
        elif kind == "checkpoint":
            self._add_checkpoint(rec)
        if kind in NOTABLE_EVENTS:
            self.events.append(_event_view(rec))
            del self.events[:-MAX_EVENTS]

    def add_all(self, records: list[dict[str, Any]]) -> "RunHistory":
        for rec in records:
            self.add(rec)
        return self

    def label_of(self, client_id: str) -> str:
        return self.client_tier.get(client_id, (None, "unknown"))[1]

    def _add_round(self, rec: dict[str, Any]) -> None:
        step = int(rec.get("step", -1))
        losses: dict[str, float] = rec.get("losses") or {}
        for cid, loss in losses.items():
            if loss is None or loss >= 1e8:  # a client reports 1e9 for a non-finite loss
                continue
            self.train_loss.setdefault(self.label_of(cid), {}).setdefault(step, []).append(float(loss))
        payload = rec.get("payload_bytes") or 0
        dense_parts = [self.dense_bytes_of(cid) for cid in losses]
        dense = sum(d for d in dense_parts if d) if dense_parts and all(dense_parts) else None
        self.bandwidth.append({"step": step, "payload_bytes": payload, "accepted": rec.get("accepted", len(losses)),
                               "missing": rec.get("missing", 0), "dense_bytes": dense,
                               "ratio": round(dense / payload, 2) if dense and payload else None})
        if "time" in rec:
            self.round_times.append((step, float(rec["time"])))

    def _add_checkpoint(self, rec: dict[str, Any]) -> None:
        epoch, step = rec.get("epoch"), rec.get("step")
        for name, loss in sorted((rec.get("val_loss") or {}).items()):
            if loss is not None:
                self.val_loss.setdefault(name, []).append({"epoch": epoch, "step": step, "loss": float(loss)})
        self.checkpoints = [c for c in self.checkpoints if c["epoch"] != epoch]
        self.checkpoints.append({"epoch": epoch, "step": step, "val_loss": rec.get("val_loss") or {},
                                 "weights_sha256": rec.get("weights_sha256") or {}, "seconds": rec.get("seconds"),
                                 "time": rec.get("time")})

    # ------------------------------------------------------------------ views
    def train_series(self) -> dict[str, list[list[float]]]:
        """label -> [[step, mean loss of that tier's clients], ...]."""
        return {label: [[s, round(sum(v) / len(v), 5)] for s, v in sorted(steps.items())]
                for label, steps in sorted(self.train_loss.items())}

    def val_series(self) -> dict[str, list[list[float]]]:
        """label -> [[step, validation loss], ...] at each epoch end (the step the checkpoint holds); the nested
        tiers first, then the Mix'n'Match specs evaluated between them."""
        order = sorted(self.val_loss.items(), key=lambda item: (not item[0].startswith("tier"), item[0]))
        return {label: [[p["step"], round(p["loss"], 5)] for p in points] for label, points in order}

    def regressions(self) -> list[str]:
        """One line per exported tier or evaluated spec whose latest held-out loss is worse than its best."""
        history = [{"step": c["step"], "val_loss": c["val_loss"]} for c in sorted(self.checkpoints,
                                                                                 key=lambda c: c["epoch"])]
        return [r.message() for r in regressions(history)]

    def seconds_per_round(self, last: int = 10) -> float | None:
        """Mean wall time between recent rounds (None until two rounds are applied)."""
        times = self.round_times[-(last + 1):]
        if len(times) < 2:
            return None
        (s0, t0), (s1, t1) = times[0], times[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None


def _event_view(rec: dict[str, Any]) -> dict[str, Any]:
    kind = rec.get("event")
    skip = {"event", "time", "weights_sha256", "assignments"}
    detail = {k: v for k, v in rec.items() if k not in skip}
    return {"time": rec.get("time"), "kind": kind, "detail": detail}


class MetricsTail:
    """Reads a JSONL file incrementally: each `read()` returns the complete lines appended since the last."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        import json

        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        return out
