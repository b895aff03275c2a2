"""train.precision: the client's forward/backward under torch.autocast (bf16, fp16 with a dynamic loss scale) while
the weights, the update rule and the replica stay fp32. Real tiny models and real training steps on the CPU
(bf16 and fp16 autocast both run there)."""

from __future__ import annotations

import pytest
import torch

from aftermath.model import build_model, preset_config, tier_spec
from aftermath.round.replica import Replica, resolve_precision
from aftermath.runconfig import RunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")
SPEC = tier_spec(CFG, 0)
# Relative error of a low-precision gradient against the fp32 one at the same weights (norm of the difference
# over the norm of the fp32 gradient). Measured on this batch: bf16 0.6% over all parameters, 1.0% for the
# worst one; fp16 0.07% / 0.12%. The bounds leave about 4x of room.
TOLERANCE = {"bf16": (0.025, 0.05), "fp16": (0.003, 0.006)}  # (all parameters, worst single parameter)


def replica(precision: str, optimizer: str = "adamw") -> Replica:
    run = RunConfig().with_overrides({"train.precision": precision, "optimizer.name": optimizer,
                                      "optimizer.lr": 3e-3, "optimizer.warmup_steps": 0})
    return Replica.build(build_model(CFG, seed=0), CFG, SPEC, run)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (4, 33), generator=torch.Generator().manual_seed(seed))


def relative_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    diff = torch.cat([(grads[n] - g).flatten() for n, g in reference.items()])
    overall = (diff.norm() / torch.cat([g.flatten() for g in reference.values()]).norm()).item()
    worst = max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())
    return overall, worst


def test_auto_is_fp32_on_the_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_gradients_are_close_to_fp32_and_not_equal(precision):
    reference = replica("fp32").train(batch(), micro_batch_size=2, step=0, client_id="me").grads
    result = replica(precision).train(batch(), micro_batch_size=2, step=0, client_id="me")
    assert all(g.dtype == torch.float32 for g in result.grads.values())  # fp32 gradients of fp32 weights
    overall, worst = relative_errors(result.grads, reference)
    bound_overall, bound_worst = TOLERANCE[precision]
    assert overall < bound_overall and worst < bound_worst, (overall, worst)
    assert overall > 1e-5  # the forward really ran in low precision


def test_bf16_training_lowers_the_loss_and_keeps_fp32_weights():
    r = replica("bf16")
    data = batch()
    losses = []
    for step in range(6):  # a lone client's rounds on one batch: train, encode, decode, apply
        result = r.train(data, micro_batch_size=2, step=step, client_id="me")
        losses.append(result.loss)
        own = r.decode(r.encode(result.grads, step, "me"), step, "me", SPEC)
        r.apply([own], step)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float32 for p in r.model.parameters())
    assert all(t.dtype == torch.float32 for t in r.state_dict().values() if t.is_floating_point())


def test_fp16_overflow_is_computed_again_at_a_lower_scale():
    r = replica("fp16")
    r.loss_scale.scale = 2.0 ** 40  # fp16's largest number is 65504: the backward overflows at this scale
    result = r.train(batch(), micro_batch_size=2, step=0, client_id="me")
    assert result.retries > 0 and r.loss_scale.scale < 2.0 ** 40
    reference = replica("fp32").train(batch(), micro_batch_size=2, step=0, client_id="me").grads
    overall, worst = relative_errors(result.grads, reference)  # the gradient of the batch, unscaled
    assert overall < TOLERANCE["fp16"][0] and worst < TOLERANCE["fp16"][1], (overall, worst)


def test_fp16_that_overflows_in_forward_sends_a_valid_zero_payload():
    r = replica("fp16", optimizer="distro")
    r.loss_scale.scale = 4.0  # a few halvings to reach 1
    with torch.no_grad():  # FFN activations beyond fp16's range: no loss scale can help
        for layer in r.model.model.layers:
            layer.mlp.up_proj.weight.mul_(1e3)
            layer.mlp.gate_proj.weight.mul_(1e3)
    result = r.train(batch(), micro_batch_size=2, step=0, client_id="me")
    assert result.retries == 2 and r.loss_scale.scale == 1.0
    assert all(torch.count_nonzero(g) == 0 for g in result.grads.values())
    payload = r.decode(r.encode(result.grads, 0, "me"), 0, "me", SPEC)  # a valid payload
    assert payload.step == 0 and payload.client_id == "me"
