"""The look-ahead of an overlapped round: the gradient is taken at the weights moved by the replica's own payload
of the step in flight, and the replica comes back bit for bit."""

import copy

import pytest
import torch

from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.round.replica import Replica
from aftermath.runconfig import RunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tier", [0, 1])
def test_lookahead_gradient_is_taken_at_the_moved_weights_and_the_replica_is_restored(tier):
    run = RunConfig().with_overrides({"model.preset": "tiny"})
    model = build_model(CFG, seed=0)
    if tier:
        model = sliced_model(model, tier_spec(CFG, tier))
    replica = Replica.build(model, CFG, tier_spec(CFG, tier), run)
    first = replica.train(batch(0), micro_batch_size=2, step=0, client_id="me")
    own = replica.decode(replica.encode(first.grads, 0, "me"), 0, "me", tier_spec(CFG, tier))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    looked = replica.train(batch(1), micro_batch_size=2, step=1, client_id="me", lookahead=own)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored bit for bit

    # the same gradient as training a copy that applied its own payload alone
    moved = copy.deepcopy(model)
    other = Replica.build(moved, CFG, tier_spec(CFG, tier), run)
    other.apply([own], 0)
    want = other.train(batch(1), micro_batch_size=2, step=1, client_id="me")
    stale = replica.train(batch(1), micro_batch_size=2, step=1, client_id="me")
    for name, grad in looked.grads.items():
        assert torch.equal(grad, want.grads[name]), name
    assert any(not torch.equal(looked.grads[n], stale.grads[n]) for n in looked.grads)
