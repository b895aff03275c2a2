"""Heterogeneous aggregation: every peer's payload, onto the universal parameter space, region by region.

DisTrO payloads. For a parameter, a universal chunk c and a coefficient position j inside it, let
P(c) be the peers whose tier region covers chunk c, and S(c, j) those of them that selected (c, j). Then

    average_over="selected" (default, as the issue states it):
        A[c, j] = sum_{p in S(c,j)} v_p[c, j] / |S(c,j)|          (0 when S(c,j) is empty)
    average_over="covering" (non-selecting covering peers count as zeros):
        A[c, j] = sum_{p in S(c,j)} v_p[c, j] / |P(c)|            (0 when P(c) is empty)

and the update of chunk c is the inverse DCT of A[c, :]. A chunk no peer covers gets exactly zero. Because a
tier's region is a union of whole chunks, a suffix chunk (outside a small tier) only ever hears from the tiers
wide enough to hold it: the shared prefix learns from every tier, a suffix only from the wide tiers, and a
small tier cannot vote on the suffix at all (it sends nothing there).

Dense payloads (AdamW / Muon runs): G[x] = sum_{p : x in region(p)} g_p[x] / |{p : x in region(p)}|, 0 where no
peer covers x.

Two ways to the same update, chosen per parameter from the payloads alone (so every replica takes the same):
- few terms per chunk (all peers' k together at most c0 + c1, e.g. up to 32 peers at top-4 of 64 x 64 chunks):
  each chunk of the target is the sparse inverse DCT (dct.idct_sparse) of its terms, every covering peer's
  coefficients in client-id order divided by its count, in float32. A chunk's result depends only on its own
  terms, so a replica that holds a region computes only its region's chunks;
- many terms: the coefficients are summed in client-id order in float64 and the dense inverse DCT runs in
  float64 over a fixed partition of the universal chunk grid into blocks of chunk rows, then is rounded to
  float32; a region replica computes the blocks that reach into its region (the universal replica's blocks,
  shapes and inputs) and keeps its region.
Either way payloads are taken in order of client id (duplicates are rejected), so the result is the same bits
whatever order they arrived in, and a region replica agrees bit for bit with the universal one on its region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from aftermath.errors import ConfigError, PayloadError
from aftermath.model.geometry import TierSpec, region_slices
from aftermath.optim.chunks import TILE_BYTES, ChunkPlan, ParamChunking, rows_per_tile
from aftermath.optim.dct import from_chunks, idct_chunks, idct_sparse
from aftermath.optim.payload import Payload, SparseCoefficients

AVERAGE_OVER = ("selected", "covering")


def _canonical(payloads: Iterable[Payload]) -> list[Payload]:
    ordered = sorted(payloads, key=lambda p: p.client_id)
    if not ordered:
        return ordered
    ids = [p.client_id for p in ordered]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PayloadError(f"two payloads come from the same client {dup[0]!r}; keep one per client per step")
    first = ordered[0]
    for p in ordered:
        if (p.kind, p.run_id, p.step) != (first.kind, first.run_id, first.step):
            raise PayloadError(
                f"payload of {p.client_id!r} is ({p.kind}, run {p.run_id!r}, step {p.step}); the others are "
                f"({first.kind}, run {first.run_id!r}, step {first.step}): aggregate one step of one run at a time"
            )
    return ordered


def aggregate(payloads: Iterable[Payload], plan: ChunkPlan, *, average_over: str = "selected",
              region: TierSpec | None = None) -> dict[str, torch.Tensor]:
    """The aggregated update (DisTrO: before sign) of every parameter, float32, in the universal shapes or,
    with `region`, in that spec's shapes. An empty payload list gives all zeros."""
    ordered = _canonical(payloads)
    kinds = {p.kind for p in ordered}
    if kinds == {"dense"}:
        return aggregate_dense(ordered, plan, region=region)
    return aggregate_distro(ordered, plan, average_over=average_over, region=region)


def _target_shapes(plan: ChunkPlan, region: TierSpec | None) -> dict[str, tuple[int, ...]]:
    if region is None:
        return {n: pc.universal_shape for n, pc in plan.params.items()}
    return plan.region_shapes(region)


BLOCK_CHUNK_ROWS = 4  # the inverse DCT runs over fixed blocks of this many chunk rows of the universal grid


@dataclass(frozen=True)
class UpdateTile:
    """A band of rows of one parameter's aggregated update: `update` (float32) holds rows `rows` (dimension 0)
    of the parameter's target region, all of its other dimensions."""

    name: str
    rows: slice
    update: torch.Tensor


def _coefficients(p: Payload, name: str, pc: ParamChunking,
                  checked: dict[tuple[int, ...], int]) -> SparseCoefficients:
    """`p`'s coefficients for `name`, their shapes checked (`checked`: the region shapes already found valid, with
    their chunk counts); `_groups` checks the index ranges, so that aggregating them cannot fail half-way."""
    item = p.params.get(name)
    if not isinstance(item, SparseCoefficients):
        raise PayloadError(f"payload of {p.client_id!r} holds no DisTrO coefficients for {name}")
    shape = tuple(item.shape)
    n = checked.get(shape)
    if n is None:
        try:
            pc.check_region(shape, f"payload of {p.client_id!r}")
        except ConfigError as exc:
            raise PayloadError(str(exc)) from exc
        n = checked[shape] = pc.n_chunks(shape)
    if item.indices.dim() != 2 or item.indices.shape[0] != n or item.values.shape != item.indices.shape:
        raise PayloadError(f"payload of {p.client_id!r}: {name} has indices {tuple(item.indices.shape)} and values "
                           f"{tuple(item.values.shape)}; its region {shape} needs ({n}, k) of both")
    return item


@dataclass(frozen=True)
class _Group:
    """The peers of one region shape for one parameter: their positions in the list of peers (client-id order)
    and their coefficients stacked, (peers, chunks, k)."""

    shape: tuple[int, ...]
    ranks: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor


def _groups(items: list[SparseCoefficients], name: str, pc: ParamChunking) -> list[_Group]:
    """`items` grouped by region shape (a few tiers, however many peers), each group's index range checked."""
    members: dict[tuple[int, ...], list[int]] = {}
    for rank, item in enumerate(items):
        members.setdefault((tuple(item.shape), item.indices.shape[1]), []).append(rank)
    groups = []
    for (shape, _), ranks in members.items():
        indices = torch.stack([items[r].indices for r in ranks])
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= pc.chunk_numel):
            raise PayloadError(f"a payload's index of {name} lies outside 0..{pc.chunk_numel - 1}")
        groups.append(_Group(shape, torch.tensor(ranks), indices, torch.stack([items[r].values for r in ranks])))
    return groups


def iter_distro_tiles(payloads: Iterable[Payload], plan: ChunkPlan, *, average_over: str = "selected",
                      region: TierSpec | None = None, tile_bytes: int = TILE_BYTES) -> Iterator[UpdateTile]:
    """The aggregated DisTrO update, parameter by parameter and, inside a parameter, band by band of chunk rows,
    so that the working set stays near `tile_bytes` whatever the parameter's size. Every payload is checked
    before the first tile is produced, so a consumer that applies tiles as they come never applies half a step.
    Joined together the tiles are `aggregate_distro`'s result, bit for bit, whatever `tile_bytes` is."""
    if average_over not in AVERAGE_OVER:
        raise PayloadError(f"average_over {average_over!r} is not known; use one of {AVERAGE_OVER}")
    ordered = _canonical(payloads)
    targets = _target_shapes(plan, region)
    items, groups = {}, {}
    for name in targets:
        checked: dict[tuple[int, ...], int] = {}
        items[name] = [_coefficients(p, name, plan.params[name], checked) for p in ordered]
        groups[name] = _groups(items[name], name, plan.params[name])
    for name, target in targets.items():
        yield from _param_tiles(name, items[name], groups[name], plan.params[name], target, plan, average_over,
                                tile_bytes)


def _param_tiles(name: str, items: list[SparseCoefficients], groups: list[_Group], pc: ParamChunking,
                 target: tuple[int, ...], plan: ChunkPlan, average_over: str,
                 tile_bytes: int) -> Iterator[UpdateTile]:
    grid = pc.grid(pc.universal_shape)
    per_row = grid[1] if len(grid) == 2 else 1  # chunks per chunk row
    terms = sum(item.indices.shape[1] for item in items)
    # few terms per chunk: invert only the coefficients present, chunk by chunk; many (dozens of peers): sum
    # them into dense coefficients and run the dense transform. Every replica sees the same payloads, so every
    # replica takes the same path for a parameter.
    sparse = terms <= sum(pc.chunk)
    rows_needed = -(-target[0] // pc.chunk[0])  # chunk rows the target reaches into
    # the dense path computes whole blocks of the universal grid (the last one may reach past the target)
    rows_end = rows_needed if sparse else min(-(-rows_needed // BLOCK_CHUNK_ROWS) * BLOCK_CHUNK_ROWS, grid[0])
    tile_rows = rows_per_tile(per_row * pc.chunk_numel, tile_bytes, BLOCK_CHUNK_ROWS)
    terms = None if sparse else _dense_terms(groups, pc, average_over)
    for r0 in range(0, rows_end, tile_rows):
        r1 = min(r0 + tile_rows, rows_end)  # chunk rows [r0, r1) of the universal grid
        first, last = r0 * pc.chunk[0], min(r1 * pc.chunk[0], target[0])  # the target's rows in this tile
        if sparse:
            out = _sparse_tile(items, pc, r0, r1, target, plan, average_over)
        else:
            out = _dense_tile(terms, pc, r0, r1, target, plan, average_over, first, last)
        yield UpdateTile(name, slice(first, last), out)
        del out  # the consumer holds the tile as long as it needs it


def _sparse_tile(items: list[SparseCoefficients], pc: ParamChunking, r0: int, r1: int, target: tuple[int, ...],
                 plan: ChunkPlan, average_over: str) -> torch.Tensor:
    """The target's chunk rows [r0, r1): each chunk of the target is the sparse inverse DCT of its terms, every
    covering peer's k coefficients in client-id order (a peer that does not cover the chunk holds zeros there)
    divided by the count of `average_over`. A chunk's terms depend only on the chunk, so a region replica that
    computes only its own chunks gets the universal replica's bits."""
    shape = ((r1 - r0) * pc.chunk[0],) + tuple(target[1:])
    rows_in_target = min(shape[0], target[0] - r0 * pc.chunk[0])
    if not items:  # an empty accepted set (nobody committed in time): the update is zero
        return torch.zeros((rows_in_target,) + tuple(target[1:]), dtype=torch.float32)
    cols = target[1] // pc.chunk[1] if len(target) == 2 else 1  # the target's chunks per chunk row
    rows = torch.arange(r0, r1)[:, None].expand(-1, cols).reshape(-1)
    colj = torch.arange(cols)[None, :].expand(r1 - r0, -1).reshape(-1)
    indices, values, covered, present = [], [], [], []
    for item in items:  # in client-id order
        tier_grid = pc.grid(tuple(item.shape))
        tier_cols = tier_grid[1] if len(tier_grid) == 2 else 1
        inside = (rows < tier_grid[0]) & (colj < tier_cols)
        ids = torch.where(inside, rows * tier_cols + colj, 0)
        indices.append(torch.where(inside[:, None], item.indices[ids], 0))
        values.append(torch.where(inside[:, None], item.values[ids], 0.0))
        covered.append(inside)
        present.append(inside[:, None].expand(-1, item.indices.shape[1]))
    idx = torch.cat(indices, dim=1)  # (chunks, terms)
    val = torch.cat(values, dim=1)
    if average_over == "selected":  # how many peers selected each term's coefficient
        same = (idx[:, :, None] == idx[:, None, :]) & torch.cat(present, dim=1)[:, None, :]
        counts = same.sum(dim=2)
    else:  # how many peers cover each chunk
        counts = torch.stack(covered, dim=1).sum(dim=1, keepdim=True)
    coeffs = val / counts.clamp(min=1).to(torch.float32)
    blocks = idct_sparse(idx, coeffs, pc.chunk, plan.bases)
    return from_chunks(blocks, shape, pc.chunk)[:rows_in_target]


@dataclass(frozen=True)
class _DenseTerms:
    """Every peer's coefficients of one parameter at their positions in the universal coefficient grid (chunk id
    * chunk size + index), peer after peer in client-id order, with their values in float64; and, averaging over
    the covering peers, how many peers cover each universal chunk."""

    positions: torch.Tensor
    values: torch.Tensor
    chunk_counts: torch.Tensor | None


def _dense_terms(groups: list[_Group], pc: ParamChunking, average_over: str) -> _DenseTerms:
    grid = pc.grid(pc.universal_shape)
    per_row = grid[1] if len(grid) == 2 else 1
    positions, values, ranks = [], [], []
    chunk_counts = torch.zeros(math.prod(grid), dtype=torch.float64) if average_over == "covering" else None
    for g in groups:
        tier_grid = pc.grid(g.shape)
        tier_cols = tier_grid[1] if len(tier_grid) == 2 else 1
        # the universal chunk id of each of this region's chunks, in the payload's chunk order
        chunk_ids = (torch.arange(tier_grid[0])[:, None] * per_row + torch.arange(tier_cols)[None, :]).reshape(-1)
        pos = (chunk_ids[None, :, None] * pc.chunk_numel + g.indices).reshape(len(g.ranks), -1)
        positions.append(pos.reshape(-1))
        values.append(g.values.reshape(-1).to(torch.float64))
        ranks.append(g.ranks[:, None].expand(-1, pos.shape[1]).reshape(-1))
        if chunk_counts is not None:
            chunk_counts[chunk_ids] += float(len(g.ranks))
    # peer after peer in client-id order (a stable sort keeps each peer's terms in its own order), so every
    # coefficient's float64 sum is taken in the same order on every replica
    order = torch.sort(torch.cat(ranks), stable=True).indices if len(groups) > 1 else None
    pos, val = torch.cat(positions), torch.cat(values)
    if order is not None:
        pos, val = pos[order], val[order]
    return _DenseTerms(pos, val, chunk_counts)


def _dense_tile(terms: _DenseTerms, pc: ParamChunking, r0: int, r1: int, target: tuple[int, ...],
                plan: ChunkPlan, average_over: str, first: int, last: int) -> torch.Tensor:
    """Chunk rows [r0, r1) (whole blocks): sums of every peer's coefficients in float64, the dense inverse DCT of
    fixed blocks of BLOCK_CHUNK_ROWS universal chunk rows, cut to the target's rows [first, last)."""
    grid = pc.grid(pc.universal_shape)
    per_row = grid[1] if len(grid) == 2 else 1
    cn = pc.chunk_numel
    n_tile = (r1 - r0) * per_row
    lo = r0 * per_row * cn
    inside = (terms.positions >= lo) & (terms.positions < lo + n_tile * cn)
    positions = terms.positions[inside] - lo
    sums = torch.zeros(n_tile * cn, dtype=torch.float64)
    sums.index_add_(0, positions, terms.values[inside])
    if average_over == "selected":  # how many peers selected each coefficient (exact small integers)
        counts = torch.bincount(positions, minlength=n_tile * cn).to(torch.float64)
    else:
        counts = terms.chunk_counts[r0 * per_row:r1 * per_row].repeat_interleave(cn)
    mean = (sums / counts.clamp(min=1.0)).reshape(n_tile, cn)
    del sums, counts
    out = torch.empty((last - first,) + tuple(target[1:]), dtype=torch.float32)
    for start in range(r0, r1, BLOCK_CHUNK_ROWS):
        stop = min(start + BLOCK_CHUNK_ROWS, grid[0])
        shape = ((stop - start) * pc.chunk[0],) + tuple(pc.universal_shape[1:])
        block = idct_chunks(mean[(start - r0) * per_row:(stop - r0) * per_row], shape, pc.chunk, plan.bases)
        b0 = start * pc.chunk[0] - first
        b1 = min(b0 + shape[0], out.shape[0])
        # rounding to float32 is elementwise: cutting the block to the target first changes no bit
        out[b0:b1] = block[region_slices((b1 - b0,) + tuple(target[1:]))]
        del block
    return out


def aggregate_distro(payloads: Iterable[Payload], plan: ChunkPlan, *, average_over: str = "selected",
                     region: TierSpec | None = None, tile_bytes: int = TILE_BYTES) -> dict[str, torch.Tensor]:
    """The whole aggregated update as float32 tensors in the target shapes (see `iter_distro_tiles`: a caller
    that applies the update at once should stream the tiles instead, and never hold the whole of it)."""
    out = {name: torch.zeros(target, dtype=torch.float32) for name, target in _target_shapes(plan, region).items()}
    for tile in iter_distro_tiles(payloads, plan, average_over=average_over, region=region, tile_bytes=tile_bytes):
        out[tile.name][tile.rows] = tile.update
    return out


def aggregate_dense(payloads: Iterable[Payload], plan: ChunkPlan, *,
                    region: TierSpec | None = None) -> dict[str, torch.Tensor]:
    ordered = _canonical(payloads)
    out: dict[str, torch.Tensor] = {}
    for name, target in _target_shapes(plan, region).items():
        sums = torch.zeros(target, dtype=torch.float64)
        counts = torch.zeros(target, dtype=torch.float64)
        for p in ordered:
            grad = p.params.get(name)
            if not isinstance(grad, torch.Tensor):
                raise PayloadError(f"payload of {p.client_id!r} holds no dense gradient for {name}")
            # the overlap of the sender's region and ours (both are prefixes)
            overlap = region_slices(tuple(min(a, b) for a, b in zip(grad.shape, target)))
            sums[overlap] += grad[overlap].to(torch.float64)
            counts[overlap] += 1.0
        out[name] = (sums / counts.clamp(min=1.0)).to(torch.float32)
    return out

