"""Keeping every exported tier a trained model: what a wide client trains besides its own tier, which
Mix'n'Match specs are evaluated beside the exported tiers, and which of them got worse.

Why. Clients train their own tier; a width no client holds (tier 2 when the clients are at tiers 0 and 1) still
moves, because it is the prefix of the wider tiers, but nothing trains it as a model, and it can get worse while
the run exports it. MatFormer trains every granularity by sampling one per step; here each sequence of a wide
client's batch is given one granularity, so its payload covers its own region as always (region-normalised
aggregation unchanged) and its step costs no more than before (narrower forwards are cheaper).

`train.objective = "sampled"`: a client at spec S trains a share `train.own_share` of its sequences at S and the
rest at the exported tiers strictly inside S, spread evenly. The split is systematic sampling over a
pseudo-random order of the sequences, both from sha256 of (seed, run, step, client): the same on every machine,
and each step's shares are within one sequence of the expected ones. `"sum"`: the same weights, but every
sequence at every one of those specs (the exact expectation of "sampled", at the cost of a forward and
backward per narrower tier). `"own"`: every sequence at S.

Pure: geometry and hashes, no torch, no files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec, mix_spec, tier_spec

REGRESSION_MARGIN = 0.01  # a held-out loss this much above its best earlier value counts as got worse


@dataclass(frozen=True)
class SequenceGroup:
    """The sequences of a client's batch (row indices, ascending) trained at `spec`; each sequence's loss
    counts `weight` / (the batch's sequences) in the client's loss."""

    spec: TierSpec
    rows: tuple[int, ...]
    weight: float = 1.0


def narrower_exported(universal: MatFormerConfig, own: TierSpec, export_tiers: Sequence[int]) -> list[TierSpec]:
    """The exported tiers strictly inside `own` (fits within it, is not it), widest first."""
    specs = [tier_spec(universal, t) for t in sorted(set(export_tiers))]
    return [s for s in specs if s.fits_within(own) and s.layers != own.layers]


def unit_draw(*parts: Any) -> float:
    """A number in [0, 1) from sha256 of `parts`: the same on every machine and Python version."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


def split_batch(objective: str, own_share: float, own: TierSpec, narrower: Sequence[TierSpec], sequences: int,
                seed: int, run_id: str, step: int, client_id: str) -> list[SequenceGroup]:
    """Which of a batch's `sequences` rows train at which spec (own first; empty groups left out)."""
    if objective == "own" or not narrower or own_share >= 1.0 or sequences == 0:
        return [SequenceGroup(own, tuple(range(sequences)))]
    if objective == "sum":
        every = tuple(range(sequences))
        rest = (1.0 - own_share) / len(narrower)
        return [SequenceGroup(own, every, own_share), *(SequenceGroup(s, every, rest) for s in narrower)]
    order = sorted(range(sequences), key=lambda i: unit_draw(seed, run_id, step, client_id, "row", i))
    offset = unit_draw(seed, run_id, step, client_id, "offset")
    rows: dict[int, list[int]] = {}
    for position, row in enumerate(order):
        u = (position + offset) / sequences  # evenly spaced in [0, 1): systematic sampling
        if u < own_share:
            group = 0
        else:
            group = 1 + min(len(narrower) - 1, int((u - own_share) / (1.0 - own_share) * len(narrower)))
        rows.setdefault(group, []).append(row)
    specs = [own, *narrower]
    return [SequenceGroup(specs[g], tuple(sorted(rows[g]))) for g in sorted(rows)]


def mix_specs_between(universal: MatFormerConfig, export_tiers: Sequence[int]) -> list[TierSpec]:
    """Two Mix'n'Match specs between each pair of adjacent exported tiers a < b (wide a, narrow b):
    `mixA-B`, the first half of the layers at a's widths and the rest at b's (Gemma 3n's layer-wise mix), and
    `midA-B`, every layer at the FFN width halfway between them with b's heads."""
    tiers = sorted(set(export_tiers) | {0})
    specs = []
    for a, b in zip(tiers, tiers[1:]):
        wide, narrow = tier_spec(universal, a), tier_spec(universal, b)
        half = len(wide.layers) // 2
        layers = wide.layers[:half] + narrow.layers[half:]
        specs.append(mix_spec(universal, f"mix{a}-{b}", [g.ffn_width for g in layers], [g.q_heads for g in layers]))
        middle = [(w + n.ffn_width) // 2 for w, n in zip(wide.ffn_widths, narrow.layers)]
        specs.append(mix_spec(universal, f"mid{a}-{b}", middle, list(narrow.q_heads)))
    return specs


@dataclass(frozen=True)
class Regression:
    """A spec whose latest held-out loss is above its best earlier one by more than REGRESSION_MARGIN."""

    name: str
    best: float
    best_step: int
    latest: float
    latest_step: int

    def message(self) -> str:
        return (f"{self.name} got worse: held-out loss {self.latest:.4f} at step {self.latest_step}, its best was "
                f"{self.best:.4f} at step {self.best_step}. A width no client holds drifts as the wider tiers move "
                f"it: train.objective = \"sampled\" trains every exported tier")


def regressions(val_history: Sequence[dict[str, Any]]) -> list[Regression]:
    """The specs of `val_history` ([{epoch, step, val_loss: {name: loss}}], oldest first) that got worse."""
    found = []
    names = sorted({n for h in val_history for n in (h.get("val_loss") or {})})
    for name in names:
        points = [(h["step"], h["val_loss"][name]) for h in val_history
                  if (h.get("val_loss") or {}).get(name) is not None]
        if len(points) < 2:
            continue
        best_step, best = min(points[:-1], key=lambda p: p[1])
        latest_step, latest = points[-1]
        if latest > best * (1.0 + REGRESSION_MARGIN):
            found.append(Regression(name, best, best_step, latest, latest_step))
    return found
