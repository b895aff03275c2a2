"""Chunk geometry: fixed DCT chunks laid over the UNIVERSAL parameter shapes.

The rule (per dimension of every parameter):
- collect the sizes this dimension takes in the nested tiers 0 .. max_tier of the model (the universal size
  and every tier boundary); let g = gcd of those sizes;
- the effective chunk of the dimension is the largest divisor of g that is <= the configured chunk.
So every nested tier's region is a union of whole chunks by construction, and a dimension no tier cuts
(the hidden size, the vocabulary) gets the largest divisor of its size <= chunk. Matrices get 2-D chunks
(c0 x c1), vectors 1-D chunks. Examples with chunk 64: tiny's FFN 512/256/128/64 -> 64; its q_proj rows
128/64/32 -> 32; k/v rows 64/32/16 -> 16; small's q rows 384/192/96 -> 48; gpt2-124m's rows -> 64.

An effective chunk below `min_chunk` is a configuration error (the widths share no useful divisor). A
Mix'n'Match spec whose widths do not fall on the chunk grid is a configuration error too (`check_spec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aftermath.errors import ConfigError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec, max_tier, own_spec, param_shapes, tier_spec
from aftermath.optim.dct import Bases


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


TILE_BYTES = 32 * 2**20  # working set of one band of chunk rows when compressing or aggregating a parameter
BYTES_PER_ELEMENT = 40  # what one element of a band costs at the peak of either (~38 measured in test_optim_memory)


def rows_per_tile(chunk_row_numel: int, tile_bytes: int, multiple: int = 1) -> int:
    """Chunk rows per band (a multiple of `multiple`, at least one multiple) so that a band whose chunk rows
    hold `chunk_row_numel` elements each needs about `tile_bytes` at most."""
    return multiple * max(1, tile_bytes // (chunk_row_numel * multiple * BYTES_PER_ELEMENT))


@dataclass(frozen=True)
class ParamChunking:
    """How one parameter is chunked: its universal shape and its chunk shape (same rank)."""

    name: str
    universal_shape: tuple[int, ...]
    chunk: tuple[int, ...]

    @property
    def chunk_numel(self) -> int:
        return math.prod(self.chunk)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Chunks per dimension of a region of `shape` (which must be aligned)."""
        return tuple(s // c for s, c in zip(shape, self.chunk))

    def n_chunks(self, shape: tuple[int, ...]) -> int:
        return math.prod(self.grid(shape))

    def topk(self, topk: int) -> int:
        """Coefficients kept per chunk: the configured top-k, at most the chunk's size."""
        return min(topk, self.chunk_numel)

    def check_region(self, shape: tuple[int, ...], who: str) -> None:
        if len(shape) != len(self.universal_shape) or any(s > u for s, u in zip(shape, self.universal_shape)):
            raise ConfigError(f"{who}: {self.name} has shape {shape}, which does not fit in the universal "
                              f"shape {self.universal_shape}")
        bad = [(d, s) for d, (s, c) in enumerate(zip(shape, self.chunk)) if s % c]
        if bad:
            dim, size = bad[0]
            raise ConfigError(
                f"{who}: the region of {self.name} is {shape} (universal {self.universal_shape}), which is not a "
                f"union of whole {self.chunk} chunks: width {size} in dimension {dim} is not a multiple of "
                f"{self.chunk[dim]}. Use widths that are multiples of {self.chunk[dim]}, or a chunk that divides "
                f"{size}"
            )


class ChunkPlan:
    """The chunking of every parameter of a model, computed from the universal shapes (see module doc)."""

    def __init__(self, model_config: MatFormerConfig, chunk: int = 64, min_chunk: int = 8) -> None:
        if chunk < 1 or min_chunk < 1 or min_chunk > chunk:
            raise ConfigError(f"need 1 <= min_chunk ({min_chunk}) <= chunk ({chunk})")
        self.model_config = model_config.base()
        self.chunk = chunk
        self.min_chunk = min_chunk
        self.bases = Bases()  # DCT bases of every chunk size, built once
        universal = param_shapes(self.model_config, own_spec(self.model_config))
        tiers = [param_shapes(self.model_config, tier_spec(self.model_config, t))
                 for t in range(max_tier(self.model_config) + 1)]
        self.params: dict[str, ParamChunking] = {}
        for name, shape in universal.items():
            dims = []
            for d, size in enumerate(shape):
                sizes = sorted({shapes[name][d] for shapes in tiers})
                effective = _largest_divisor_at_most(math.gcd(*sizes), chunk)
                if effective < min_chunk:
                    raise ConfigError(
                        f"{name}: dimension {d} takes the sizes {sizes} across tiers 0..{len(tiers) - 1}; the "
                        f"largest chunk <= {chunk} dividing all of them is {effective}, below min_chunk {min_chunk}. "
                        f"Use tier widths with a common divisor >= {min_chunk} (e.g. raise "
                        f"matformer_min_intermediate_size to drop the smallest tier) or lower min_chunk"
                    )
                dims.append(effective)
            self.params[name] = ParamChunking(name, tuple(shape), tuple(dims))
        self.boundaries: dict[str, tuple[tuple[int, ...], ...]] = {
            name: tuple(tuple(sorted({shapes[name][d] for shapes in tiers})) for d in range(len(shape)))
            for name, shape in universal.items()
        }

    def region_shapes(self, spec: TierSpec) -> dict[str, tuple[int, ...]]:
        """The shapes (= regions) of `spec`, checked to be unions of whole chunks (ConfigError otherwise)."""
        self.check_spec(spec)
        return param_shapes(self.model_config, spec)

    def check_spec(self, spec: TierSpec) -> None:
        who = f"spec {spec.name!r}"
        if spec.head_dim != self.model_config.head_dim or not spec.fits_within(own_spec(self.model_config)):
            raise ConfigError(f"{who} (FFN widths {list(spec.ffn_widths)}, heads {list(spec.q_heads)}) does not "
                              f"fit within the universal model")
        for name, shape in param_shapes(self.model_config, spec).items():
            self.params[name].check_region(tuple(shape), who)

    def summary(self) -> dict[str, tuple[int, ...]]:
        return {name: pc.chunk for name, pc in self.params.items()}
