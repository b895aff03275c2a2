"""Batch assignment: which global sequences each client trains in a round. Pure and deterministic.

Global step `s` covers B global sequences of the data stream, from [s*B, (s+1)*B) in a run that never changed
its batch size B (the state machine says where a step starts). They are split among the
round's clients in proportion to their throughput (sequences per second: declared at join, then measured),
so that a round is not bound by its slowest client. Given (step, members sorted by id, throughputs) the
result is always the same: every client and the coordinator can recompute it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aftermath.errors import ConfigError


@dataclass(frozen=True)
class BatchRange:
    """Global sequences [start, end) of the data stream."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def to_json(self) -> list[int]:
        return [self.start, self.end]


def proportional_shares(total: int, weights: list[float]) -> list[int]:
    """Split `total` items into integer shares proportional to `weights` (largest remainder method).

    Ties in the remainders go to the earlier entry, so the split depends only on the order given.
    When there are at least as many items as weights, everyone gets at least one (a client that never
    trains is never measured, and would starve).
    Non-positive or non-finite weights count as the smallest positive weight present (a client whose
    throughput is unknown still gets work).
    """
    if not weights:
        return []
    finite = [w for w in weights if w > 0 and w == w and w != float("inf")]
    floor_w = min(finite) if finite else 1.0
    ws = [w if (w > 0 and w == w and w != float("inf")) else floor_w for w in weights]
    base = 1 if total >= len(ws) else 0
    rest = total - base * len(ws)
    norm = sum(ws)
    exact = [rest * w / norm for w in ws]
    shares = [int(e) for e in exact]
    left = rest - sum(shares)
    order = sorted(range(len(ws)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return [share + base for share in shares]


def assign_batches(first: int, global_batch_size: int, throughputs: dict[str, float]) -> dict[str, BatchRange]:
    """Assign a step's global sequences [first, first + global_batch_size) to clients, contiguous ranges in
    client-id order.

    A client whose share is zero (more clients than sequences) gets no range and sends no result.
    """
    members = sorted(throughputs)
    if first < 0 or global_batch_size < 1:
        raise ConfigError(f"first sequence {first} must be >= 0 and global_batch_size {global_batch_size} >= 1")
    whole = BatchRange(first, first + global_batch_size)
    shares = proportional_shares(global_batch_size, [throughputs[m] for m in members])
    out: dict[str, BatchRange] = {}
    cursor = whole.start
    for member, share in zip(members, shares):
        if share > 0:
            out[member] = BatchRange(cursor, cursor + share)
            cursor += share
    assert cursor == whole.end
    return out
