"""Screening a round's payloads before they are accepted: statistics that need no trust in any sender. Pure.

For each payload of a round, against the round's other payloads:
- `fingerprint`: sha256 of its bytes' body (coefficients and their indices, or dense values) and its spec, not of
  its header (run, step, client): a copy of another client's payload, a replay of an earlier one, or the same payload
  every round has the fingerprint of the original;
- `rms`: the root mean square of its values, comparable across tiers (a wider tier sends more of them). The
  DCT is orthonormal, so it is the size of the update it stands for; a one-bit payload's values are all +-1 and
  its rms says nothing;
- `agreement`: for each other payload it shares at least MIN_SHARED coefficients with (the same universal
  chunk and position, whatever the tiers), the share of those coefficients whose signs agree, mapped to [-1, 1]
  (1 all agree, 0 a coin, -1 all disagree; each coefficient one vote, whatever the size of a raw value); the median over those payloads, when they are MIN_PEERS or more.
  Honest payloads of one round point the same way (gradients of one model on one distribution); a flipped one
  scores near -1 against every honest one. The median keeps one attacker from dragging an honest payload down:
  an attacker is one of its peers, never their majority;
- `worst_param` / `worst_agreement`: the same, per parameter, for the parameter where it is lowest: an attack
  on one region (the embedding) hides in the total;
- `shared`: of its coefficients in chunks another payload covers, the share another payload also selected.
  Honest payloads select the large coefficients of similar momenta; random indices share at chance level.

Universal chunk ids make tiers comparable: a tier's chunk (row r, column c of its own grid) is the universal
chunk (r, c), as in aggregate.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from aftermath.optim.chunks import ChunkPlan
from aftermath.optim.payload import Payload, SparseCoefficients, payload_body

MIN_SHARED = 8  # coefficients two payloads must share (overall, or in a parameter) for their agreement to count
MIN_PEERS = 2  # payloads an agreement is the median over
AGREEMENT_GROUP = 32  # payloads measured against each other (a large round is split into groups this size)
AGREEMENT_SAMPLE = 128  # payloads whose agreement a round measures at most (a hashed sample, another each round)


@dataclass(frozen=True)
class PayloadStats:
    client_id: str
    fingerprint: str
    rms: float
    agreement: float  # nan: it shares no coefficient with another payload (alone in the round, or nothing shared)
    shared: float  # of its coefficients in chunks another payload covers, the share one also selected (nan: none)
    worst_param: str | None
    worst_agreement: float  # nan when no parameter shares MIN_SHARED coefficients


def body_fingerprint(payload: Payload, data: bytes) -> str:
    """sha256 of what a payload says (its kind, its spec and the body of its bytes `data`), without who sent it
    for which step (the header): the body is a function of the coefficients alone."""
    h = hashlib.sha256(payload.kind.encode())
    h.update(repr((payload.spec.ffn_widths, payload.spec.q_heads, payload.spec.kv_heads)).encode())
    h.update(payload_body(data))
    return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """What the screen needs of one payload, computed once when it arrives (`PayloadIndex.prepare`): its
    fingerprint and rms, and its coefficients over the whole model, one entry each: key (parameter, universal
    chunk, position), value, parameter id and chunk (parameter, universal chunk). A dense payload has its rms
    and fingerprint only."""

    client_id: str
    step: int
    fingerprint: str
    rms: float
    values: torch.Tensor
    keys: torch.Tensor | None = None
    param_ids: torch.Tensor | None = None
    chunks: torch.Tensor | None = None


class PayloadIndex:
    """Lays payloads of a run's chunk plan over one key space for the whole model; what it derives from a
    region's shape alone (universal chunk ids, keys up to the position) is kept per (parameter, shape, k)."""

    def __init__(self, plan: ChunkPlan) -> None:
        self.plan = plan
        self.names = list(plan.params)
        n_chunks = [pc.n_chunks(pc.universal_shape) for pc in plan.params.values()]
        sizes = [n * pc.chunk_numel for n, pc in zip(n_chunks, plan.params.values())]
        self.key_offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.chunk_offsets = [sum(n_chunks[:i]) for i in range(len(n_chunks))]
        # a region layout ((parameter id, shape, k), ...) -> (key without the position, chunk, parameter id) of
        # each of its coefficients, in the order of the layout
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _layout(self, layout: tuple[tuple[int, tuple[int, ...], int], ...]) -> tuple[torch.Tensor, ...]:
        cached = self._layouts.get(layout)
        if cached is None:
            keys, chunks, ids = [], [], []
            for pid, shape, k in layout:
                pc = self.plan.params[self.names[pid]]
                tier_grid, universal_grid = pc.grid(shape), pc.grid(pc.universal_shape)
                tier_cols = tier_grid[1] if len(tier_grid) == 2 else 1
                cols = universal_grid[1] if len(universal_grid) == 2 else 1
                chunk = torch.arange(math.prod(tier_grid))
                universal = ((chunk // tier_cols) * cols + chunk % tier_cols)[:, None].expand(-1, k).reshape(-1)
                keys.append(self.key_offsets[pid] + universal * pc.chunk_numel)
                chunks.append(self.chunk_offsets[pid] + universal)
                ids.append(torch.full((universal.numel(),), pid, dtype=torch.int64))
            cached = self._layouts[layout] = (torch.cat(keys), torch.cat(chunks), torch.cat(ids))
        return cached

    def prepare(self, payload: Payload, data: bytes) -> Prepared:
        """`payload` decoded from `data` (its bytes: the fingerprint is their body's)."""
        items = [(pid, payload.params[name]) for pid, name in enumerate(self.names) if name in payload.params]
        common = dict(client_id=payload.client_id, step=payload.step, fingerprint=body_fingerprint(payload, data))
        dense = [item.reshape(-1) for _, item in items if not isinstance(item, SparseCoefficients)]
        if not items or dense:  # the size of its region's weights: its rms (no temporary copy), nothing kept
            count = sum(t.numel() for t in dense)
            squares = sum(float(torch.dot(t, t)) for t in dense)
            return Prepared(**common, rms=math.sqrt(squares / count) if count else 0.0,
                            values=torch.zeros(0, dtype=torch.float64))
        values = torch.cat([item.values.reshape(-1) for _, item in items]).double()
        key_base, chunks, ids = self._layout(tuple((pid, tuple(item.shape), item.indices.shape[1])
                                                   for pid, item in items))
        indices = torch.cat([item.indices.reshape(-1) for _, item in items])
        return Prepared(**common, rms=float(values.pow(2).mean().sqrt()), values=values, keys=key_base + indices,
                        param_ids=ids, chunks=chunks)


def _median_agreements(agree: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(..., n, n) pairwise sums -> (..., n): each payload's median agreement (agree / count: agreeing minus
    disagreeing signs, over the coefficients both selected) with the payloads it shares MIN_SHARED coefficients
    with; nan when they are fewer than MIN_PEERS (one peer is no majority: it may be the attacker). Of an even
    count, the upper middle: an honest payload beside one attacker and one honest peer keeps the honest
    agreement."""
    n = agree.shape[-1]
    peers = (count >= MIN_SHARED) & ~torch.eye(n, dtype=torch.bool)
    ratios = torch.where(peers, agree / count.clamp(min=1), math.nan)
    upper = -torch.nanmedian(-ratios, dim=-1).values
    return torch.where(peers.sum(dim=-1) >= MIN_PEERS, upper, math.nan)


def _agreements(flats: list[Prepared], names: list[str]) -> list[tuple[float, float, tuple[float, str | None]]]:
    """(agreement, shared share, (worst agreement, its parameter)) of each of `flats` (sparse payloads, two or
    more), against each other. The shared share counts only its coefficients in chunks another payload covers.
    Only the coefficients two or more of them selected matter: the others are dropped first, and the pairwise
    sums run on a dense (payloads x shared coefficients) matrix."""
    keys = torch.cat([f.keys for f in flats])
    unique, cols = torch.unique(keys, return_inverse=True)
    # how many of them cover each chunk: a coefficient can only be shared in a chunk another payload covers
    coverers = torch.bincount(torch.cat([torch.unique(f.chunks) for f in flats]))
    selected = torch.bincount(cols, minlength=unique.numel())
    shared_cols = torch.nonzero(selected > 1).flatten()
    position = torch.full((unique.numel(),), -1, dtype=torch.int64)
    position[shared_cols] = torch.arange(shared_cols.numel())
    matrix = torch.zeros(len(flats), shared_cols.numel(), dtype=torch.float64)
    col_param = torch.zeros(shared_cols.numel(), dtype=torch.int64)
    start = 0
    shares = []
    for r, f in enumerate(flats):
        where = position[cols[start:start + f.keys.numel()]]
        start += f.keys.numel()
        mine = where >= 0
        matrix[r, where[mine]] = f.values[mine]
        col_param[where[mine]] = f.param_ids[mine]
        covered = int((coverers[f.chunks] > 1).sum())
        shares.append(float(mine.sum()) / covered if covered else math.nan)

    def pairwise(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signs = torch.sign(m)  # every shared coefficient one vote, whatever its size (raw values)
        present = signs.abs()
        return signs @ signs.T, present @ present.T

    overall = _median_agreements(*pairwise(matrix)).tolist()
    bounds = torch.searchsorted(col_param, torch.arange(len(names) + 1)).tolist()  # sorted keys: params contiguous
    measured = [pid for pid in range(len(names)) if bounds[pid + 1] - bounds[pid] >= MIN_SHARED]
    worst: list[tuple[float, str | None]] = [(math.nan, None)] * len(flats)
    if measured:
        sums = [pairwise(matrix[:, bounds[pid]:bounds[pid + 1]]) for pid in measured]
        per_param = _median_agreements(*(torch.stack(parts) for parts in zip(*sums)))  # (params, payloads)
        lowest = torch.where(per_param.isnan(), math.inf, per_param).min(dim=0)
        worst = [(float(v), names[measured[int(i)]]) if math.isfinite(float(v)) else (math.nan, None)
                 for v, i in zip(lowest.values, lowest.indices)]
    return [(overall[r], shares[r], worst[r]) for r in range(len(flats))]


def payload_stats(prepared: list[Prepared], names: list[str]) -> list[PayloadStats]:
    """The statistics of every payload of one round (in the order given; `names`: the plan's parameters, as
    PayloadIndex.names). Agreement is measured within groups of at most AGREEMENT_GROUP payloads (in a hashed
    order), so that its cost grows linearly with the round, and for AGREEMENT_SAMPLE payloads at most, so that
    it stays bounded: in a larger round the others have no agreement this round (nan), and a hash of the step
    picks another sample the next."""
    sparse = sorted((i for i, f in enumerate(prepared) if f.keys is not None),
                    key=lambda i: hashlib.sha256(f"{prepared[i].step}:{prepared[i].client_id}".encode()).digest())
    sparse = sparse[:AGREEMENT_SAMPLE]
    groups = [sparse[i:i + AGREEMENT_GROUP] for i in range(0, len(sparse), AGREEMENT_GROUP)]
    if len(groups) > 1 and len(groups[-1]) <= MIN_PEERS:  # too few to hold a majority of their own
        groups[-2:] = [groups[-2] + groups[-1]]
    found: dict[int, tuple[float, float, tuple[float, str | None]]] = {}
    for group in groups:
        if len(group) >= 2:
            found.update(zip(group, _agreements([prepared[i] for i in group], names)))
    none = (math.nan, math.nan, (math.nan, None))
    return [PayloadStats(client_id=f.client_id, fingerprint=f.fingerprint, rms=f.rms,
                         agreement=found.get(i, none)[0], shared=found.get(i, none)[1],
                         worst_param=found.get(i, none)[2][1], worst_agreement=found.get(i, none)[2][0])
            for i, f in enumerate(prepared)]
