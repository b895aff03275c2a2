"""The chunked cross-entropy: the same loss and gradients as the full-logits cross-entropy, in chunks."""

import pytest
import torch
import torch.nn.functional as F

from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.loss import chunked_cross_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20), generator=gen)
    full = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), targets.reshape(-1))
    want = torch.autograd.grad(full * 2.5, (hidden, weight))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=chunk)
    got = torch.autograd.grad(loss * 2.5, (hidden, weight))  # an upstream factor reaches both gradients
    assert torch.allclose(loss, full, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(hidden, weight, targets, chunk=chunk), full, atol=1e-6)


def test_the_model_loss_matches_cross_entropy_of_its_logits_at_a_tier():
    cfg = preset_config("tiny")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    spec = tier_spec(cfg, 1)
    loss = model.loss(ids[:, :-1], ids[:, 1:], spec)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids[:, :-1], spec)
    full = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    full.backward()
    assert torch.allclose(loss, full, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), n  # tied embedding included
