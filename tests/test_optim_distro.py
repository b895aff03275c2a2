"""The DisTrO optimizer of one replica: top-k, error feedback, and a full step against a hand-computed DeMo step."""

import math

import pytest
import torch

from aftermath.errors import ConfigError
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.optim import (DistroConfig, DistroOptimizer, aggregate, apply_distro_update, dct_chunks, decode_payload,
                             idct_chunks)

CFG = preset_config("tiny", vocab_size=256)
SPEC0 = tier_spec(CFG, 0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def fresh_params(seed=0):
    return {n: p.detach().clone() for n, p in build_model(CFG, seed=seed).named_parameters()}


def random_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}


def test_topk_per_chunk_keeps_the_largest_coefficients_of_every_chunk():
    params = fresh_params()
    opt = DistroOptimizer(DistroConfig(topk=5, momentum_decay=0.5, lr=0.1), CFG, SPEC0, params)
    grads = random_grads(params, 1)
    sent = opt.compress(grads, step=0)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        pc = opt.plan.params[name]
        coeffs = dct_chunks(grads[name] * 0.1, pc.chunk)  # first step: delta = lr * grad
        item = sent[name]
        assert item.indices.shape == (pc.n_chunks(pc.universal_shape), 5)
        for c in range(coeffs.shape[0]):
            idx = item.indices[c]
            assert torch.equal(idx, idx.sort().values)  # sorted within the chunk
            chosen = coeffs[c].abs()[idx]
            rest = torch.ones(coeffs.shape[1], dtype=torch.bool)
            rest[idx] = False
            assert chosen.min() >= coeffs[c].abs()[rest].max()
            assert torch.allclose(item.values[c], coeffs[c][idx], atol=1e-6)


def test_error_feedback_keeps_what_was_not_sent():
    params = fresh_params()
    opt = DistroOptimizer(DistroConfig(topk=3, lr=1.0), CFG, SPEC0, params)
    grads = random_grads(params, 2)
    sent = opt.compress(grads, step=0)
    for name in ("model.layers.2.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        pc = opt.plan.params[name]
        before = dct_chunks(grads[name], pc.chunk)
        after = dct_chunks(opt.momentum[name], pc.chunk)
        mask = torch.zeros_like(before, dtype=torch.bool).scatter_(1, sent[name].indices, True)
        assert after[mask].abs().max() < 1e-5  # what was sent is gone from the momentum
        assert torch.allclose(after[~mask], before[~mask], atol=1e-5)  # everything else stays
        # and the momentum plus what was sent is the whole momentum
        sparse = torch.zeros_like(before).scatter_(1, sent[name].indices, sent[name].values)
        total = opt.momentum[name] + idct_chunks(sparse, pc.universal_shape, pc.chunk)
        assert torch.allclose(total, grads[name], atol=1e-5)


def reference_basis(n):
    return torch.tensor([[(math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)) * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
                          for i in range(n)] for k in range(n)], dtype=torch.float64)


def reference_demo_update(delta, chunk, topk):
    """DeMo on a float64 tensor, written chunk by chunk: returns (update, new delta)."""
    update = torch.zeros_like(delta)
    new_delta = delta.clone()
    if delta.dim() == 1:
        chunk = (chunk[0], 1)
        delta2 = delta[:, None]
    else:
        delta2 = delta
    b0, b1 = reference_basis(chunk[0]), reference_basis(chunk[1])
    up2 = update.view(delta2.shape)
    nd2 = new_delta.view(delta2.shape)
    for r in range(0, delta2.shape[0], chunk[0]):
        for c in range(0, delta2.shape[1], chunk[1]):
            y = b0 @ delta2[r:r + chunk[0], c:c + chunk[1]] @ b1.T
            flat = y.reshape(-1)
            keep = flat.abs().argsort(descending=True)[:topk]
            sparse = torch.zeros_like(flat)
            sparse[keep] = flat[keep]
            x = b0.T @ sparse.reshape(y.shape) @ b1
            up2[r:r + chunk[0], c:c + chunk[1]] = x
            nd2[r:r + chunk[0], c:c + chunk[1]] -= x
    return update, new_delta


def test_single_client_step_equals_hand_computed_demo():
    lr, decay, topk, wd = 0.01, 0.9, 4, 0.1
    params = fresh_params()
    start = {n: p.clone() for n, p in params.items()}
    cfg = DistroConfig(lr=lr, momentum_decay=decay, topk=topk, one_bit=False, weight_decay=wd)
    opt = DistroOptimizer(cfg, CFG, SPEC0, params)
    names = ["model.norm.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    ref_p = {n: start[n].double() for n in names}
    ref_delta = {n: torch.zeros_like(ref_p[n]) for n in names}
    for step in range(3):
        grads = random_grads(params, 10 + step)
        data = opt.encode(grads, step, "run", "solo")
        update = aggregate([decode_payload(data, opt.expectation("run", step))], opt.plan)
        opt.apply(update, step)
        for n in names:
            chunk = opt.plan.params[n].chunk
            ref_delta[n] = decay * ref_delta[n] + lr * grads[n].double()
            ref_update, ref_delta[n] = reference_demo_update(ref_delta[n], chunk, min(topk, math.prod(chunk)))
            assert torch.allclose(update[n].double(), ref_update, atol=1e-6)
            if ref_p[n].dim() >= 2:
                ref_p[n] = ref_p[n] * (1 - lr * wd)
            ref_p[n] = ref_p[n] - lr * torch.sign(ref_update)
            clear = ref_update.abs() > 1e-5  # where the sign is not in doubt
            assert torch.allclose(params[n].double()[clear], ref_p[n][clear], atol=1e-5)
            assert torch.allclose(opt.momentum[n].double(), ref_delta[n], atol=1e-5)


def test_apply_modes_and_weight_decay_only_on_matrices():
    p = {"m": torch.ones(2, 2), "v": torch.ones(2)}
    u = {"m": torch.tensor([[0.5, -2.0], [0.0, 3.0]]), "v": torch.tensor([-0.25, 4.0])}
    apply_distro_update(p, u, 0.1, weight_decay=0.5, apply_mode="sign")
    assert torch.allclose(p["m"], torch.tensor([[0.95 - 0.1, 0.95 + 0.1], [0.95, 0.95 - 0.1]]))
    assert torch.allclose(p["v"], torch.tensor([1.1, 0.9]))
    q = {"v": torch.ones(2)}
    apply_distro_update(q, {"v": u["v"]}, 0.1, apply_mode="raw")
    assert torch.allclose(q["v"], torch.tensor([1.025, 0.6]))
    with pytest.raises(ConfigError):
        apply_distro_update(q, {"v": u["v"]}, 0.1, apply_mode="adam")


def test_optimizer_rejects_params_that_do_not_hold_the_region():
    params = fresh_params()
    spec1 = tier_spec(CFG, 1)
    small = dict(params)
    small["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 128)  # tier 1 needs 256 rows
    with pytest.raises(ConfigError, match="up_proj"):
        DistroOptimizer(DistroConfig(), CFG, spec1, small)
    with pytest.raises(ConfigError, match="apply_mode"):
        DistroConfig(apply_mode="nope")


def test_distro_replica_state_is_empty_and_refuses_another_optimizers_state():
    # DisTrO's apply reads no state: a replica rebuilt from a checkpoint needs none (its momentum is its own)
    params = fresh_params()
    opt = DistroOptimizer(DistroConfig(), CFG, SPEC0, params)
    opt.compress(random_grads(params, 3), 0)
    assert opt.state_dict() == {}
    opt.load_state_dict({})
    with pytest.raises(ConfigError, match="AdamW/Muon"):
        opt.load_state_dict({"t": torch.tensor(3)})
