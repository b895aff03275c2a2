"""DisTrO's compress and aggregate + apply paths work in bounded bands of chunk rows: no temporary the size of a
whole parameter, and the bands change no bit of the result.

Memory is counted exactly, not timed: a torch dispatch mode sees every tensor an operation creates and, through
a finalizer on its storage, when it is freed, so it knows the bytes alive at every moment of the call.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aftermath.errors import PayloadError
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.optim.chunks import BYTES_PER_ELEMENT
from aftermath.optim import (DistroConfig, DistroOptimizer, aggregate_distro, decode_payload, iter_distro_tiles)

BIG = preset_config("tiny", vocab_size=32768)  # the embedding (32768 x 128, 16 MiB) dwarfs every other parameter
SMALL = preset_config("tiny", vocab_size=1024)  # for the bit checks: 4 blocks of 4 chunk rows in the embedding
EMBED = "model.embed_tokens.weight"
TILE = 2**20


def bound(plan, tile_bytes):
    """What a band may hold: the budget, or one whole block of 4 chunk rows where that is more (a block is the
    smallest unit of the inverse DCT), at BYTES_PER_ELEMENT per element; 10% for the indices and small tensors."""
    block = max(4 * (pc.chunk_numel * (pc.universal_shape[1] // pc.chunk[1] if len(pc.chunk) == 2 else 1))
                for pc in plan.params.values())
    return 1.1 * max(tile_bytes, BYTES_PER_ELEMENT * block)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tensors_in(value):
    """The tensors in an operation's arguments or results (nested in lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive; `peak` is their maximum. A result
    that shares storage with an input (a view, an in-place op) allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tensors_in((args, kwargs))}
        for t in tensors_in(out):
            storage = t.untyped_storage()  # torch keeps one Python object per live storage
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.largest = max(self.largest, storage.nbytes())
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def make_opts(config, tile_bytes=TILE, **kw):
    """A universal replica (tier 0) and a sliced tier-1 replica."""
    model = build_model(config, seed=0)
    universal = {n: p.detach().clone() for n, p in model.named_parameters()}
    sliced = {n: p.detach().clone() for n, p in sliced_model(model, tier_spec(config, 1)).named_parameters()}
    cfg = DistroConfig(lr=0.01, topk=8, **kw)
    return (DistroOptimizer(cfg, config, tier_spec(config, 0), universal, tile_bytes=tile_bytes),
            DistroOptimizer(cfg, config, tier_spec(config, 1), sliced, tile_bytes=tile_bytes))


def round_payloads(opts, step=0):
    blobs = []
    for i, opt in enumerate(opts):
        gen = torch.Generator().manual_seed(10 * step + i)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in opt.params.items()}
        blobs.append(opt.encode(grads, step, "run", f"c{i}"))
    return [decode_payload(b, opts[0].expectation("run", step)) for b in blobs]


def test_aggregate_and_apply_never_holds_a_parameter_sized_temporary():
    universal, sliced = make_opts(BIG)
    payloads = round_payloads([universal, sliced])
    embed32 = universal.params[EMBED].numel() * 4  # 16 MiB; float64 buffers of it would be 32 MiB each
    for opt in (universal, sliced):
        with LiveBytes() as fused:
            opt.aggregate_and_apply(payloads, 0)
        assert fused.peak <= bound(opt.plan, TILE), (fused.peak, bound(opt.plan, TILE))
        assert fused.largest < embed32 / 4
        assert embed32 > 4 * fused.peak
    # the counter sees what the unstreamed path holds: the whole update, at least the embedding's
    with LiveBytes() as whole:
        universal.apply(universal.aggregate(payloads), 0)
    assert whole.peak > embed32


def test_compress_never_holds_a_parameter_sized_temporary():
    universal, _ = make_opts(BIG)
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in universal.params.items()}
    with LiveBytes() as live:
        sent = universal.compress(grads, 0)
    kept = sum(s.indices.numel() * s.indices.element_size() + s.values.numel() * 4 for s in sent.values())
    assert live.peak <= bound(universal.plan, TILE) + 2 * kept, (live.peak, kept)
    assert live.largest < universal.params[EMBED].numel() * 4 / 4


@pytest.mark.parametrize("kw", [{}, {"average_over": "covering", "one_bit": True}])
def test_bands_change_no_bit(kw):
    """One block of 4 chunk rows per band, or whole parameters in one band: the same update."""
    universal, sliced = make_opts(SMALL, **kw)
    payloads = round_payloads([universal, sliced])
    for region in (None, tier_spec(SMALL, 1)):
        whole = aggregate_distro(payloads, universal.plan, average_over=universal.config.average_over,
                                 region=region, tile_bytes=2**40)
        banded = aggregate_distro(payloads, universal.plan, average_over=universal.config.average_over,
                                  region=region, tile_bytes=1)
        assert all(torch.equal(whole[n], banded[n]) for n in whole)
        bands = [t for t in iter_distro_tiles(payloads, universal.plan, region=region, tile_bytes=1) if t.name == EMBED]
        assert len(bands) == SMALL.vocab_size // 64 // 4  # 64-row chunks, 4 chunk rows per block


@pytest.mark.parametrize("kw", [{}, {"apply_mode": "raw", "weight_decay": 0.1, "value_dtype": "bfloat16"}])
def test_aggregate_and_apply_equals_apply_of_aggregate(kw):
    a, b = make_opts(SMALL, tile_bytes=1, **kw)
    c, d = make_opts(SMALL, **kw)
    for step in range(2):
        payloads = round_payloads([a, b], step)
        assert [p.client_id for p in payloads] == [p.client_id for p in round_payloads([c, d], step)]
        for streamed, whole in ((a, c), (b, d)):
            streamed.aggregate_and_apply(payloads[::-1], step)
            whole.apply(whole.aggregate(payloads), step)
            assert all(torch.equal(streamed.params[n], whole.params[n]) for n in whole.params)


def test_a_bad_payload_is_rejected_before_anything_is_applied():
    universal, sliced = make_opts(SMALL)
    payloads = round_payloads([universal, sliced])
    before = {n: p.clone() for n, p in universal.params.items()}
    last = list(universal.params)[-1]
    payloads[1].params[last].indices[0, 0] = 10**6
    with pytest.raises(PayloadError, match="outside"):
        universal.aggregate_and_apply(payloads, 0)
    assert all(torch.equal(before[n], p) for n, p in universal.params.items())
