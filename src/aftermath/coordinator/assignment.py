"""Batch assignment: which global sequences each client trains in a round. Pure and deterministic.

Global step `s` covers B global sequences of the data stream, from [s*B, (s+1)*B) in a run that never changed
its batch size B (the state machine says where a step starts). They are split among the
round's clients so that every client's round takes the same time: client i needs o_i + s_i / r_i seconds for
s_i sequences, where r_i is its training throughput (sequences per second: declared at join, then measured)
and o_i its fixed cost per round (data, encode, upload, and the apply it cannot hide), so
    s_i = r_i * (T - o_i),   T = (B + sum_i r_i o_i) / sum_i r_i
(a client whose fixed cost alone exceeds T gets the minimum share, and T is solved again without it). With no
fixed costs this is the split in proportion to throughput. Given (step, members sorted by id, throughputs,
overheads) the result is always the same: every client and the coordinator can recompute it.
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


def balanced_weights(total: int, rates: list[float], overheads: list[float]) -> list[float]:
    """Weights r_i * (T - o_i) that give every client the same round time (module doc); a vanishing weight (the
    minimum share) for a client whose fixed cost alone exceeds the balanced round time."""
    clean = lambda x: x if x == x and 0 < x < float("inf") else 0.0  # noqa: E731
    rs, os_ = [clean(r) for r in rates], [clean(o) for o in overheads]
    if not any(rs):
        return rs
    floor_r = min(r for r in rs if r > 0)
    rs = [r or floor_r for r in rs]
    active = list(range(len(rs)))
    while True:
        t = (total + sum(rs[i] * os_[i] for i in active)) / sum(rs[i] for i in active)
        slow = {i for i in active if os_[i] >= t}
        if not slow or len(slow) == len(active):
            break
        active = [i for i in active if i not in slow]
    kept = set(active)  # sets: the split stays linear in the number of clients
    return [rs[i] * (t - os_[i]) if i in kept and t > os_[i] else 1e-9 for i in range(len(rs))]


def assign_batches(first: int, global_batch_size: int, throughputs: dict[str, float],
                   overheads: dict[str, float] | None = None) -> dict[str, BatchRange]:
    """Assign a step's global sequences [first, first + global_batch_size) to clients, contiguous ranges in
    client-id order, balancing round times (module doc; `overheads` absent: in proportion to throughput).

    A client whose share is zero (more clients than sequences) gets no range and sends no result.
    """
    members = sorted(throughputs)
    if first < 0 or global_batch_size < 1:
        raise ConfigError(f"first sequence {first} must be >= 0 and global_batch_size {global_batch_size} >= 1")
    whole = BatchRange(first, first + global_batch_size)
    rates = [throughputs[m] for m in members]
    weights = rates if not overheads else balanced_weights(global_batch_size, rates,
                                                           [overheads.get(m, 0.0) for m in members])
    shares = proportional_shares(global_batch_size, weights)
    out: dict[str, BatchRange] = {}
    cursor = whole.start
    for member, share in zip(members, shares):
        if share > 0:
            out[member] = BatchRange(cursor, cursor + share)
            cursor += share
    assert cursor == whole.end
    return out
