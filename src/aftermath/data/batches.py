"""Deterministic sequences: sequence `i` of a run is a fixed function of (data, seq_len, seed, i).

The split's tokens are cut into non-overlapping windows of `seq_len` tokens; window `j` is the
`seq_len + 1` tokens starting at `j * seq_len` (the extra token is the last target). One *pass* (epoch)
visits every window once, in an order given by a keyed permutation of the window indices: sequence `i` is
window `perm_e(i mod W)` of pass `e = i div W`, where W is the number of windows and `perm_e` is keyed by
(seed, e). Indices past one pass wrap into the next pass, with a new order.

The permutation is a Feistel network over the window indices (cycle-walking to stay below W) with BLAKE2b
as its round function: it needs no table of W entries, costs O(1) per sequence, and gives the same answer on
every machine and every numpy version (numpy's generators promise no stable stream across versions).

A step of the run covers sequences [step * B, (step + 1) * B) for a global batch of B sequences: `step_range`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aftermath.data.dataset import TokenData
from aftermath.errors import DataError

if TYPE_CHECKING:
    import torch

FEISTEL_ROUNDS = 6


def step_range(step: int, batch_size: int) -> tuple[int, int]:
    """The global sequence range [a, b) of step `step` when every step has `batch_size` sequences."""
    if step < 0 or batch_size < 1:
        raise DataError(f"step {step} / batch size {batch_size}: need step >= 0 and batch size >= 1")
    return step * batch_size, (step + 1) * batch_size


class WindowPermutation:
    """A keyed bijection of [0, n): a balanced Feistel network on 2h bits, cycle-walked into range."""

    def __init__(self, n: int, key: bytes) -> None:
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.keys = [hashlib.blake2b(key + bytes([r]), digest_size=16).digest() for r in range(FEISTEL_ROUNDS)]

    def _round(self, r: int, value: int) -> int:
        digest = hashlib.blake2b(value.to_bytes(8, "little"), key=self.keys[r], digest_size=8).digest()
        return int.from_bytes(digest, "little") & self.mask

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.mask
        for r in range(FEISTEL_ROUNDS):
            left, right = right, left ^ self._round(r, right)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        x = self._encrypt(index)
        while x >= self.n:  # the domain is at most 4n, so this loops fewer than 4 times on average
            x = self._encrypt(x)
        return x


class TokenStream:
    """The run's sequences of one split: `sequences(start, end)` -> LongTensor [end - start, seq_len + 1].

    `data` is a data directory (or an opened `TokenData`, to share memory maps between streams).
    `vocab_size` and `max_positions` are the model's; both are checked here, at open.
    `shuffle=False` visits windows in corpus order (every pass the same).
    """

    def __init__(self, data: str | Path | TokenData, seq_len: int, seed: int = 0, split: str = "train", *,
                 vocab_size: int | None = None, max_positions: int | None = None, shuffle: bool = True) -> None:
        self.data = data if isinstance(data, TokenData) else TokenData(data, split, vocab_size=vocab_size)
        if isinstance(data, TokenData) and vocab_size is not None:
            self.data.check_vocab(vocab_size)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise DataError(f"sequence length {seq_len!r} must be a positive integer, e.g. --seq-len 128")
        if max_positions is not None and seq_len > max_positions:
            raise DataError(f"sequence length {seq_len} is longer than the model allows (max_position_embeddings "
                            f"{max_positions}); use a sequence length <= {max_positions}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"shuffle seed {seed!r} must be a non-negative integer")
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (self.data.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"{self.data.dir} ({self.data.split}) has {self.data.num_tokens} tokens, too few for one sequence of "
                f"{seq_len} (+1) tokens; use --seq-len <= {max(self.data.num_tokens - 1, 0)} or more data"
            )
        self._perms: dict[int, WindowPermutation] = {}

    @property
    def split(self) -> str:
        return self.data.split

    @property
    def sequences_per_pass(self) -> int:
        """W: sequences in one pass over the split (sequence W is the first of the second pass)."""
        return self.num_windows

    def window_of(self, index: int) -> int:
        """The window (start token / seq_len) that sequence `index` reads."""
        if index < 0:
            raise DataError(f"sequence index {index} is negative; indices start at 0")
        epoch, k = divmod(index, self.num_windows)
        if not self.shuffle:
            return k
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 8:  # keep a few passes' keys; a run moves forward through passes
                self._perms.clear()
            key = f"aftermath-stream:{self.seed}:{epoch}".encode()
            perm = self._perms[epoch] = WindowPermutation(self.num_windows, key)
        return perm(k)

    def sequences(self, start: int, end: int) -> "torch.Tensor":
        """Sequences [start, end) as int64 [end - start, seq_len + 1]: inputs [:, :-1], targets [:, 1:]."""
        import torch  # here, not at the top: preparing and serving data needs no torch (a 3-5 s import)

        return torch.from_numpy(self.sequences_numpy(start, end))

    def sequences_numpy(self, start: int, end: int) -> np.ndarray:
        self.check_range(start, end)
        out = np.empty((end - start, self.seq_len + 1), dtype=np.int64)
        for row, index in enumerate(range(start, end)):
            out[row] = self.data.read(self.window_of(index) * self.seq_len, self.seq_len + 1)
        return out

    def batch(self, step: int, batch_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(inputs, targets) of step `step` with a global batch of `batch_size` sequences."""
        seqs = self.sequences(*step_range(step, batch_size))
        return seqs[:, :-1], seqs[:, 1:]

    def check_range(self, start: int, end: int) -> None:
        for name, value in (("start", start), ("end", end)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise DataError(f"sequence range {name} {value!r} must be an integer")
        if start < 0:
            raise DataError(f"sequence range [{start}, {end}) starts below 0; sequence indices start at 0")
        if end < start:
            raise DataError(f"sequence range [{start}, {end}) ends before it starts; give start <= end")
