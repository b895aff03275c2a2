"""Heterogeneous aggregation: the formulas on hand-made payloads, order independence, no zero-votes, and
bit-identical universal and sliced replicas (DisTrO, AdamW, Muon)."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aftermath.errors import ConfigError, PayloadError
from aftermath.model import build_model, mix_spec, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.model.geometry import param_shapes, region_slices
from aftermath.optim import (ChunkPlan, DenseConfig, DenseOptimizer, DistroConfig, DistroOptimizer, Payload,
                             SparseCoefficients, aggregate, dct_chunks, decode_payload, idct_chunks)

CFG = preset_config("tiny", vocab_size=256)
PLAN = ChunkPlan(CFG)
T0, T1, T2 = (tier_spec(CFG, t) for t in range(3))
MIX = mix_spec(CFG, "mix", [512, 192, 64, 320])


# ------------------------------------------------------------------------------------ hand-made payloads
def hand_payload(client, spec, entries, k=2):
    """Every chunk of every parameter selects indices 0..k-1 with value 0, except `entries`:
    {param: {chunk id in the TIER's grid: [(index, value), ...k]}}."""
    params = {}
    for name, shape in param_shapes(CFG, spec).items():
        pc = PLAN.params[name]
        n = pc.n_chunks(shape)
        idx = torch.arange(k).repeat(n, 1)
        val = torch.zeros(n, k)
        for chunk_id, pairs in entries.get(name, {}).items():
            idx[chunk_id] = torch.tensor([i for i, _ in pairs])
            val[chunk_id] = torch.tensor([v for _, v in pairs])
        params[name] = SparseCoefficients(shape=tuple(shape), indices=idx, values=val)
    return Payload("distro", "run", 0, client, spec, params)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def coefficients(update, name):
    pc = PLAN.params[name]
    return dct_chunks(update[name].double(), pc.chunk)


GATE0 = "model.layers.0.mlp.gate_proj.weight"  # 512 x 128, chunks 64 x 64: grid 8 x 2, ids = row * 2 + col
DOWN0 = "model.layers.0.mlp.down_proj.weight"  # 128 x 512: grid 2 x 8 (tier 1: 2 x 4)
Q0 = "model.layers.0.self_attn.q_proj.weight"  # 128 x 128, chunks 32 x 64: grid 4 x 2 (tier 1 rows 64, tier 2 rows 32)
O0 = "model.layers.0.self_attn.o_proj.weight"  # 128 x 128, chunks 64 x 32: grid 2 x 4 (tier 1: 2 x 2)
GATE1 = "model.layers.1.mlp.gate_proj.weight"  # MIX holds 192 rows of layer 1: universal chunks 0..5


def hand_set():
    a = hand_payload("a", T0, {
        GATE0: {**{c: [(0, 1.0), (1, 2.0)] for c in range(16)}, 0: [(0, 4.0), (5, -2.0)]},
        DOWN0: {8: [(0, 1.0), (7, 1.0)], 14: [(0, 9.0), (1, 0.0)]},
        Q0: {3: [(0, 2.0), (1, 0.0)], 6: [(2, -5.0), (3, 0.0)]},
        O0: {4: [(7, 1.0), (0, 0.0)], 6: [(7, 9.0), (0, 0.0)]},
        GATE1: {5: [(0, 1.0), (1, 0.0)], 7: [(0, 1.0), (1, 0.0)]},
    })
    b = hand_payload("b", T1, {
        GATE0: {c: [(0, 3.0), (3, 1.0)] for c in range(8)},
        DOWN0: {4: [(0, 3.0), (7, 5.0)]},  # tier-1 chunk (1, 0) = universal chunk 8
        Q0: {3: [(0, 4.0), (1, 0.0)]},
        O0: {2: [(7, 5.0), (0, 0.0)]},  # tier-1 chunk (1, 0) = universal chunk 4
    })
    c = hand_payload("c", T2, {GATE0: {c: [(0, -1.0), (1, 6.0)] for c in range(4)}})
    m = hand_payload("m", MIX, {GATE1: {5: [(0, 7.0), (1, 0.0)]}})
    return [a, b, c, m]


# (param, universal chunk, index) -> (mean over selecting peers, mean over covering peers). Every chunk not listed
# in hand_set selects indices 0 and 1 with value 0: those zeros count as selections.
EXPECTED = {
    # GATE0 chunk 0: a (0:4, 5:-2), b (0:3, 3:1), c (0:-1, 1:6), m (0:0, 1:0); 4 covering peers
    (GATE0, 0, 0): (6 / 4, 6 / 4), (GATE0, 0, 5): (-2.0, -2 / 4), (GATE0, 0, 3): (1.0, 1 / 4),
    (GATE0, 0, 1): (6 / 2, 6 / 4),
    # chunk 2: a (0:1, 1:2), b (0:3, 3:1), c (0:-1, 1:6), m zeros
    (GATE0, 2, 0): (3 / 4, 3 / 4), (GATE0, 2, 1): (8 / 3, 8 / 4), (GATE0, 2, 3): (1.0, 1 / 4),
    # chunk 5 (rows 128..192): a, b, m cover it; c (128 rows) does not
    (GATE0, 5, 0): (4 / 3, 4 / 3), (GATE0, 5, 1): (2 / 2, 2 / 3), (GATE0, 5, 3): (1.0, 1 / 3),
    # chunk 12 (rows 384..448, the suffix): a and m (layer 0 of MIX is 512 wide) only
    (GATE0, 12, 0): (1 / 2, 1 / 2), (GATE0, 12, 1): (2 / 2, 2 / 2),
    # DOWN0 chunk 8 = (1, 0): a (0:1, 7:1), b's own chunk 4 (0:3, 7:5), c's own chunk 2 (zeros), m (zeros)
    (DOWN0, 8, 0): (4 / 4, 4 / 4), (DOWN0, 8, 7): (6 / 2, 6 / 4),
    (DOWN0, 14, 0): (9 / 2, 9 / 2),  # columns 384..448: a and m only
    # Q0 (head tiers) chunk 3 = rows 32..64: a, b, m (c keeps 32 rows); chunk 6 = rows 96..128: a, m
    (Q0, 3, 0): (6 / 3, 6 / 3), (Q0, 6, 2): (-5.0, -5 / 2),
    # O0 chunk 4 = (1, 0): a (7:1), b's own chunk 2 (7:5), c's own chunk 1 (zeros), m; chunk 6 = (1, 2): a, m
    (O0, 4, 7): (6 / 2, 6 / 4), (O0, 6, 7): (9 / 1, 9 / 2),
    # GATE1 (MIX keeps 192 rows in layer 1): chunk 5 = rows 128..192: a, b, m; chunk 7 = rows 192..256: a, b
    (GATE1, 5, 0): (8 / 3, 8 / 3), (GATE1, 7, 0): (1 / 2, 1 / 2),
}


@pytest.mark.parametrize("mode", ["selected", "covering"])
def test_formula_on_hand_made_payloads(mode):
    update = aggregate(hand_set(), PLAN, average_over=mode)
    for (name, chunk, index), values in EXPECTED.items():
        got = coefficients(update, name)[chunk, index].item()
        assert got == pytest.approx(values[mode == "covering"], abs=1e-5), (name, chunk, index)
    # nothing else appears: the chunk-0 coefficients of GATE0 other than 0, 1, 3, 5 are zero
    coeffs = coefficients(update, GATE0)
    others = torch.ones(coeffs.shape[1], dtype=torch.bool)
    others[[0, 1, 3, 5]] = False
    assert coeffs[0][others].abs().max() < 1e-5


def reference_aggregate(payloads, mode):
    """Decode every peer to a dense universal coefficient array with masks, then average."""
    out = {}
    for name, pc in PLAN.params.items():
        n = pc.n_chunks(pc.universal_shape)
        total = torch.zeros(n, pc.chunk_numel, dtype=torch.float64)
        selected = torch.zeros(n, pc.chunk_numel, dtype=torch.float64)
        covering = torch.zeros(n, 1, dtype=torch.float64)
        for p in payloads:
            item = p.params[name]
            grid = pc.grid(item.shape)
            ugrid = pc.grid(pc.universal_shape)
            for t in range(pc.n_chunks(item.shape)):
                u = t if len(grid) == 1 else (t // grid[1]) * ugrid[1] + t % grid[1]
                total[u, item.indices[t]] += item.values[t].double()
                selected[u, item.indices[t]] += 1
                covering[u] += 1
        mean = total / (selected if mode == "selected" else covering).clamp(min=1)
        out[name] = idct_chunks(mean, pc.universal_shape, pc.chunk).float()
    return out


SPARSE_TOPK, DENSE_TOPK = 8, 32  # 5 peers x 8 = 40 terms per chunk: the sparse inverse; x 32 = 160: the dense one


@functools.lru_cache(maxsize=None)
def real_payloads(one_bit=False, topk=SPARSE_TOPK):
    """Decoded payloads of real optimizers: two tier-0, a tier-1, a tier-2 and a Mix'n'Match client."""
    out = []
    for i, (client, spec) in enumerate([("p0", T0), ("p1", T0), ("q", T1), ("r", T2), ("s", MIX)]):
        params = {n: p.detach() for n, p in build_model(CFG, seed=0).named_parameters()}
        opt = DistroOptimizer(DistroConfig(topk=topk, one_bit=one_bit), CFG, spec, params)
        gen = torch.Generator().manual_seed(i)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        data = opt.encode(grads, 0, "run", client)
        out.append(decode_payload(data, opt.expectation("run", 0, client_id=client, spec=spec)))
    return tuple(out)


@pytest.mark.parametrize("topk", [SPARSE_TOPK, DENSE_TOPK])
@pytest.mark.parametrize("mode", ["selected", "covering"])
def test_real_payloads_match_the_reference_formula(mode, topk):
    payloads = real_payloads(topk=topk)
    got = aggregate(payloads, PLAN, average_over=mode)
    want = reference_aggregate(payloads, mode)
    for name in PLAN.params:
        assert torch.allclose(got[name], want[name], atol=1e-5), name


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(range(5)), one_bit=st.booleans())
def test_any_arrival_order_gives_the_same_bits(order, one_bit):
    payloads = real_payloads(one_bit)
    baseline = aggregate(payloads, PLAN)
    shuffled = aggregate([payloads[i] for i in order], PLAN)
    assert all(torch.equal(baseline[n], shuffled[n]) for n in baseline)


def suffix_mask(name, spec):
    mask = torch.ones(PLAN.params[name].universal_shape, dtype=torch.bool)
    mask[region_slices(param_shapes(CFG, spec)[name])] = False
    return mask


def test_no_zero_votes_from_small_tiers():
    payloads = real_payloads(one_bit=True)
    small = [p for p in payloads if p.spec in (T1, T2)]
    wide = [p for p in payloads if p.spec == T0]
    only_small = aggregate(small, PLAN)
    with_wide = aggregate(small + wide, PLAN)
    wide_only = aggregate(wide, PLAN)
    cut = 0
    for name in PLAN.params:
        mask = suffix_mask(name, T1)
        cut += int(mask.sum())
        # tier-1/2 peers alone leave the universal suffix exactly untouched ...
        assert torch.count_nonzero(only_small[name][mask]) == 0, name
        # ... and with tier-0 peers the suffix is the tier-0-only aggregate, bit for bit
        assert torch.equal(with_wide[name][mask], wide_only[name][mask]), name
    assert cut > 0
    # and a replica applying the tier-1-only update leaves the suffix weights unchanged
    params = {n: p.detach().clone() for n, p in build_model(CFG, seed=0).named_parameters()}
    before = {n: p.clone() for n, p in params.items()}
    opt = DistroOptimizer(DistroConfig(one_bit=True), CFG, T0, params)
    opt.apply(only_small, 0)
    for name in params:
        mask = suffix_mask(name, T1)
        assert torch.equal(params[name][mask], before[name][mask])


def test_aggregate_rejects_duplicates_and_mixed_steps():
    a, b, *_ = hand_set()
    with pytest.raises(PayloadError, match="same client"):
        aggregate([a, a], PLAN)
    b.step = 1
    with pytest.raises(PayloadError, match="step"):
        aggregate([a, b], PLAN)


# ------------------------------------------------------------------------------ replicas stay identical
def run_replicas(make_opt, steps=3, universal_tier=0, fused=False):
    """A universal replica (client 'u', tier 0), a sliced tier-1 replica (client 's'), and a tier-2 peer that
    holds no replica under test. Each step every client encodes random gradients; both replicas decode all
    payloads, aggregate and apply (`fused`: streamed, aggregate_and_apply); their shared region must be
    bit-identical."""
    model = build_model(CFG, seed=0)
    universal = {n: p.detach().clone() for n, p in model.named_parameters()}
    sliced = {n: p.detach().clone() for n, p in sliced_model(model, T1).named_parameters()}
    peer = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = {"u": make_opt(T0, universal), "s": make_opt(T1, sliced), "t": make_opt(T2, peer)}
    for step in range(steps):
        blobs = []
        for i, (client, opt) in enumerate(opts.items()):
            gen = torch.Generator().manual_seed(100 * step + i)
            grads = {n: torch.randn(p.shape, generator=gen) for n, p in opt.params.items()}
            blobs.append(opt.encode(grads, step, "run", client))
        for client in ("u", "s"):
            opt = opts[client]
            arrived = blobs if client == "s" else blobs[::-1]  # different arrival orders on the two replicas
            payloads = [decode_payload(b, opt.expectation("run", step)) for b in arrived]
            if fused:
                opt.aggregate_and_apply(payloads, step)
            else:
                opt.apply(opt.aggregate(payloads), step)
        for name, small in sliced.items():
            assert torch.equal(universal[name][region_slices(tuple(small.shape))], small), (step, name)
        moved = sum(int((universal[n] != model.state_dict()[n]).sum()) for n in universal)
        assert moved > 0
    return universal, sliced


RAW = {"apply_mode": "raw", "weight_decay": 0.1, "value_dtype": "bfloat16", "average_over": "covering"}


@pytest.mark.parametrize("kw, fused", [
    ({}, False), (RAW, False), ({"one_bit": False, "schedule": "cosine", "warmup_steps": 1, "total_steps": 3}, False),
    (RAW, True),  # streamed, one block of 4 chunk rows per band
    ({"topk": 64}, False), ({"topk": 64, **RAW}, True),  # 3 peers x 64 terms: the dense inverse DCT
])
def test_sliced_and_universal_distro_replicas_stay_bit_identical(kw, fused):
    tile = {"tile_bytes": 1} if fused else {}
    run_replicas(lambda spec, params: DistroOptimizer(DistroConfig(**{"lr": 0.01, "topk": 8, **kw}), CFG, spec, params,
                                                      **tile), fused=fused)


@pytest.mark.parametrize("algorithm,orthogonalizer,dtype", [
    ("adamw", "newton_schulz", "float32"), ("muon", "newton_schulz", "float32"),
    ("muon", "polar_express", "float32"), ("muon", "polar_express", "bfloat16")])
def test_sliced_and_universal_dense_replicas_stay_bit_identical(algorithm, orthogonalizer, dtype):
    cfg = DenseConfig(algorithm=algorithm, lr=1e-3, weight_decay=0.1, orthogonalizer=orthogonalizer,
                      ortho_dtype=dtype)
    run_replicas(lambda spec, params: DenseOptimizer(cfg, CFG, spec, params), steps=2)


def test_dense_mean_is_region_normalised():
    specs = {"a": T0, "b": T1}
    payloads = []
    for client, spec in specs.items():
        params = {n: torch.full(s, 1.0 if client == "a" else 3.0) for n, s in param_shapes(CFG, spec).items()}
        payloads.append(Payload("dense", "run", 0, client, spec, params))
    mean = aggregate(payloads, PLAN)
    for name, shape in param_shapes(CFG, T1).items():
        shared = torch.zeros(PLAN.params[name].universal_shape, dtype=torch.bool)
        shared[region_slices(shape)] = True
        assert torch.all(mean[name][shared] == 2.0)
        assert torch.all(mean[name][~shared] == 1.0)  # the suffix only from tier 0
    mean1 = aggregate(payloads[1:], PLAN)
    assert torch.all(mean1[GATE0][256:] == 0.0)  # nobody covered it


def test_adamw_matches_torch_adamw_for_one_client():
    params = {n: p.detach().clone() for n, p in build_model(CFG, seed=0).named_parameters()}
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    cfg = DenseConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = DenseOptimizer(cfg, CFG, T0, params)
    decay = [p for n, p in ref.items() if p.dim() >= 2]
    plain = [p for n, p in ref.items() if p.dim() < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        data = opt.encode(grads, step, "run", "solo")
        opt.apply(opt.aggregate([decode_payload(data, opt.expectation("run", step))]), step)
        for n, p in ref.items():
            p.grad = grads[n].clone()
        torch_opt.step()
    for n in params:
        assert torch.allclose(params[n], ref[n].detach(), atol=1e-6), n


def test_muon_orthogonalises_bands_and_rejects_off_band_specs():
    params = {n: p.detach().clone() for n, p in build_model(CFG, seed=0).named_parameters()}
    opt = DenseOptimizer(DenseConfig(algorithm="muon"), CFG, T0, params)
    assert opt.bands[GATE0] == (0, (64, 128, 256, 512))
    assert opt.bands[DOWN0] == (1, (64, 128, 256, 512))
    assert "model.embed_tokens.weight" not in opt.bands
    off_band = {n: p[region_slices(s)].clone() for (n, p), s in zip(params.items(), param_shapes(CFG, MIX).values())}
    with pytest.raises(ConfigError, match="band"):
        DenseOptimizer(DenseConfig(algorithm="muon"), CFG, MIX, off_band)


def test_whole_matrix_muon_runs_on_the_full_model_only():
    model = build_model(CFG, seed=0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = DenseConfig(algorithm="muon", muon_bands="whole", orthogonalizer="polar_express")
    opt = DenseOptimizer(whole, CFG, T0, params)
    assert opt.bands[GATE0] == (0, (512,)) and opt.bands[DOWN0] == (1, (512,))
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in params.items()}
    before = params[GATE0].clone()
    opt.apply(grads, 0)
    # one step from zero momentum: the gradient's nesterov term (1 + momentum) g, orthogonalised whole, times lr
    expected = before - whole.muon_lr * whole.orthogonalize()(grads[GATE0] * (1 + whole.muon_momentum)) * 2.0
    assert torch.allclose(params[GATE0], expected, atol=1e-6)
    sliced = {n: p.detach().clone() for n, p in sliced_model(model, T1).named_parameters()}
    with pytest.raises(ConfigError, match="muon_bands = 'nested'"):
        DenseOptimizer(whole, CFG, T1, sliced)


@pytest.mark.parametrize("topk", [SPARSE_TOPK, DENSE_TOPK])
@pytest.mark.parametrize("spec", [T1, T2, MIX])
def test_region_aggregate_equals_the_universal_one_bit_for_bit(spec, topk):
    payloads = real_payloads(topk=topk)
    full = aggregate(payloads, PLAN)
    part = aggregate(payloads, PLAN, region=spec)
    for name, shape in param_shapes(CFG, spec).items():
        assert part[name].shape == shape
        assert torch.equal(part[name], full[name][region_slices(shape)]), name


@pytest.mark.parametrize("tier", [0, 1])
def test_an_empty_accepted_set_is_a_zero_update(tier):
    # a round nobody committed to in time (e.g. right after a coordinator restart) is applied as no change
    model = build_model(CFG, seed=0)
    source = model if tier == 0 else sliced_model(model, T1)
    params = {n: p.detach().clone() for n, p in source.named_parameters()}
    before = {n: p.clone() for n, p in params.items()}
    opt = DistroOptimizer(DistroConfig(lr=1e-3), CFG, tier_spec(CFG, tier), params)
    opt.aggregate_and_apply([], 0)
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert all(not u.any() for u in opt.aggregate([]).values())
