"""The orthonormal DCT-II over fixed chunks, for 1-D chunks (vectors) and 2-D chunks (matrices).

Basis: B[k, i] = s_k cos(pi (2i + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n) for k > 0. B is orthogonal,
so the inverse is the transpose. A 2-D chunk X (c0 x c1) transforms as Y = B0 X B1^T and back as X = B0^T Y B1.
A chunked tensor is handled as a batch of chunks in row-major chunk order (chunk (i, j) of a grid with G1
chunk columns has id i * G1 + j); coefficients of a chunk are flattened row-major. `idct_sparse` inverts
chunks that hold only a few coefficients (a payload's top-k, an aggregate of a few peers) without the dense
transform.
"""

from __future__ import annotations

import math

import torch


def dct_basis(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix B (rows are frequencies k, columns positions i)."""
    i = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] = math.sqrt(1.0 / n)
    return basis.to(dtype)


def to_chunks(x: torch.Tensor, chunk: tuple[int, ...]) -> torch.Tensor:
    """(n_chunks, *chunk) view-copy of `x`, chunks in row-major grid order."""
    if x.dim() == 1:
        return x.reshape(-1, chunk[0])
    rows, cols = x.shape
    c0, c1 = chunk
    return x.reshape(rows // c0, c0, cols // c1, c1).permute(0, 2, 1, 3).reshape(-1, c0, c1)


def from_chunks(blocks: torch.Tensor, shape: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_chunks`."""
    if len(shape) == 1:
        return blocks.reshape(shape)
    rows, cols = shape
    c0, c1 = chunk
    return blocks.reshape(rows // c0, cols // c1, c0, c1).permute(0, 2, 1, 3).reshape(rows, cols)


class Bases:
    """A cache of DCT bases by (size, dtype), owned by whoever transforms many tensors (no global state)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        key = (n, dtype)
        if key not in self._cache:
            self._cache[key] = dct_basis(n, dtype)
        return self._cache[key]


def _left(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m @ block for every block of (N, a, b), as one 2-D matrix product."""
    n, a, b = blocks.shape
    return (blocks.transpose(1, 2).reshape(n * b, a) @ m.T).reshape(n, b, -1).transpose(1, 2)


def _right(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """block @ m for every block of (N, a, b), as one 2-D matrix product."""
    n, a, b = blocks.shape
    return (blocks.reshape(n * a, b) @ m).reshape(n, a, -1)


def dct_chunks(x: torch.Tensor, chunk: tuple[int, ...], dtype: torch.dtype | None = None,
               bases: Bases | None = None) -> torch.Tensor:
    """DCT-II coefficients of every chunk of `x`: shape (n_chunks, prod(chunk)), in `dtype` (default x's)."""
    dtype = dtype or x.dtype
    bases = bases or Bases()
    x = x.to(dtype)
    if x.dim() == 1:
        return to_chunks(x, chunk) @ bases.get(chunk[0], dtype).T
    # both transforms in the tensor's own layout (no copy into chunk order first), then one copy into chunk order
    rows, cols = x.shape
    c0, c1 = chunk
    right = x.reshape(rows * cols // c1, c1) @ bases.get(c1, dtype).T  # every chunk row times B1^T
    both = torch.matmul(bases.get(c0, dtype), right.reshape(rows // c0, c0, cols))  # B0 times every chunk column
    return both.reshape(rows // c0, c0, cols // c1, c1).permute(0, 2, 1, 3).reshape(-1, c0 * c1)


def idct_chunks(coeffs: torch.Tensor, shape: tuple[int, ...], chunk: tuple[int, ...],
                bases: Bases | None = None) -> torch.Tensor:
    """The tensor of `shape` whose chunk coefficients are `coeffs` (n_chunks, prod(chunk)); same dtype."""
    dtype = coeffs.dtype
    bases = bases or Bases()
    if len(shape) == 1:
        return from_chunks(coeffs @ bases.get(chunk[0], dtype), shape, chunk)
    b0, b1 = bases.get(chunk[0], dtype), bases.get(chunk[1], dtype)
    blocks = _left(_right(coeffs.reshape(-1, chunk[0], chunk[1]), b1), b0.T)
    return from_chunks(blocks, shape, chunk)


def idct_sparse(indices: torch.Tensor, coeffs: torch.Tensor, chunk: tuple[int, ...],
                bases: Bases | None = None) -> torch.Tensor:
    """The chunks (n_chunks, *chunk) whose only nonzero coefficients are `coeffs` (n_chunks, T) at `indices`
    (n_chunks, T; row-major positions inside a chunk; a position may repeat, its terms add up).

    A chunk is the sum of T rank-one patterns, coeffs[t] * outer(B0[u_t], B1[v_t]): T * c0 * c1 multiply-adds
    instead of the dense transform's (c0 + c1) * c0 * c1, as one batched matrix product whose every item is the
    same small product for the same inputs, so a chunk's bits do not depend on which other chunks share the call.
    """
    bases = bases or Bases()
    dtype = coeffs.dtype
    if len(chunk) == 1:
        rows = bases.get(chunk[0], dtype)[indices]  # (n, T, c)
        return torch.bmm(coeffs[:, None, :], rows)[:, 0, :]
    c0, c1 = chunk
    left = bases.get(c0, dtype)[indices // c1] * coeffs[..., None]  # (n, T, c0)
    right = bases.get(c1, dtype)[indices % c1]  # (n, T, c1)
    return torch.bmm(left.transpose(1, 2), right)
