"""Every exported tier trained (aftermath.round.objective): the per-sequence split of a wide client's batch, the
gradient Replica.train takes under it, the Mix'n'Match specs evaluated between tiers, and the regression check."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.round.objective import mix_specs_between, narrower_exported, regressions, split_batch
from aftermath.round.replica import Replica
from aftermath.runconfig import RunConfig

CFG = preset_config("tiny")


def _split(n: int, step: int, client: str = "c1", share: float = 0.5, tier: int = 0):
    own = tier_spec(CFG, tier)
    return split_batch("sampled", share, own, narrower_exported(CFG, own, [0, 1, 2]), n, 0, "run", step, client)


def test_narrower_exported_tiers_are_those_strictly_inside_the_client():
    assert [s.name for s in narrower_exported(CFG, tier_spec(CFG, 0), [0, 1, 2])] == ["tier1", "tier2"]
    assert [s.name for s in narrower_exported(CFG, tier_spec(CFG, 1), [2, 0, 1])] == ["tier2"]
    assert narrower_exported(CFG, tier_spec(CFG, 2), [0, 1, 2]) == []
    assert narrower_exported(CFG, tier_spec(CFG, 0), [0]) == []


@pytest.mark.parametrize("n", [1, 2, 3, 8, 13])
def test_every_row_is_trained_once_and_the_own_share_is_within_one_sequence(n):
    for step in range(20):
        groups = _split(n, step)
        rows = [r for g in groups for r in g.rows]
        assert sorted(rows) == list(range(n))
        own = sum(len(g.rows) for g in groups if g.spec.name == "tier0")
        assert abs(own - 0.5 * n) <= 1


def test_the_split_is_a_function_of_seed_run_step_and_client_and_shares_hold_over_steps():
    assert _split(8, 3) == _split(8, 3)
    assert len({tuple(g.rows for g in _split(8, s)) for s in range(10)}) > 1
    assert _split(8, 3, "c1") != _split(8, 3, "c2") or _split(8, 4, "c1") != _split(8, 4, "c2")
    counts: Counter[str] = Counter()
    for step in range(400):
        for g in _split(1, step, share=0.6):
            counts[g.spec.name] += len(g.rows)
    # one sequence per step: 60% own, the rest evenly over tiers 1 and 2 (binomial spread ~2.5%)
    assert abs(counts["tier0"] / 400 - 0.6) < 0.08
    assert abs(counts["tier1"] / 400 - 0.2) < 0.07 and abs(counts["tier2"] / 400 - 0.2) < 0.07


def test_objective_own_and_share_one_keep_every_row_at_the_own_tier():
    own = tier_spec(CFG, 0)
    narrower = narrower_exported(CFG, own, [0, 1, 2])
    for objective, share in (("own", 0.5), ("sampled", 1.0)):
        groups = split_batch(objective, share, own, narrower, 5, 0, "run", 0, "c")
        assert [(g.spec.name, g.rows) for g in groups] == [("tier0", (0, 1, 2, 3, 4))]


def _replica(objective: str, tier: int = 0, **extra) -> Replica:
    run = RunConfig().with_overrides({"train.objective": objective, "optimizer.name": "adamw", **extra})
    universal = build_model(CFG, seed=3)
    model = universal if tier == 0 else sliced_model(universal, tier_spec(CFG, tier))
    return Replica.build(model, CFG, tier_spec(CFG, tier), run)


def _batch(n: int = 6) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n, 17), generator=torch.Generator().manual_seed(7))


def test_the_sampled_gradient_is_each_sequence_at_its_own_tier(one_torch_thread):
    replica = _replica("sampled")
    batch = _batch()
    groups = replica.sequence_groups(batch.shape[0], 5, "c7")
    assert len(groups) >= 2  # the check below means something only if the batch is split
    result = replica.train(batch, 2, step=5, client_id="c7")
    # the same loss written out by hand: the mean over sequences, each at the tier it was given
    model = build_model(CFG, seed=3)
    total = sum(model.loss(batch[list(g.rows), :-1], batch[list(g.rows), 1:], g.spec) * len(g.rows)
                for g in groups) / batch.shape[0]
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    own = next(g for g in groups if g.spec.name == "tier0")
    with torch.no_grad():
        own_loss = model.loss(batch[list(own.rows), :-1], batch[list(own.rows), 1:]).item()
    assert result.loss == pytest.approx(own_loss, rel=1e-5)  # the loss reported is the own tier's


def test_sampled_training_differs_from_own_and_the_narrowest_client_is_unchanged(one_torch_thread):
    batch = _batch()
    own = _replica("own").train(batch, 3, step=1, client_id="c").grads
    sampled = _replica("sampled").train(batch, 3, step=1, client_id="c").grads
    assert not torch.equal(own["model.layers.0.mlp.down_proj.weight"], sampled["model.layers.0.mlp.down_proj.weight"])
    narrow_own = _replica("own", tier=2).train(batch, 3, step=1, client_id="c").grads
    narrow_sampled = _replica("sampled", tier=2).train(batch, 3, step=1, client_id="c").grads
    assert all(torch.equal(narrow_own[n], narrow_sampled[n]) for n in narrow_own)


def test_mix_specs_lie_between_the_tiers_they_join():
    specs = {s.name: s for s in mix_specs_between(CFG, [0, 1, 2])}
    assert sorted(specs) == ["mid0-1", "mid1-2", "mix0-1", "mix1-2"]
    for a, b in ((0, 1), (1, 2)):
        wide, narrow = tier_spec(CFG, a), tier_spec(CFG, b)
        for name in (f"mix{a}-{b}", f"mid{a}-{b}"):
            spec = specs[name]
            assert spec.fits_within(wide) and narrow.fits_within(spec)
            assert spec.layers not in (wide.layers, narrow.layers)
    assert mix_specs_between(CFG, [0]) == []


def _history(*losses: float) -> list[dict]:
    return [{"epoch": i - 1, "step": 10 * i, "val_loss": {"tier2": v, "tier1": 5.0 - 0.1 * i}}
            for i, v in enumerate(losses)]


def test_a_tier_that_got_worse_than_its_best_is_reported():
    found = regressions(_history(8.3, 6.04, 6.1, 6.26))
    assert [(r.name, r.best, r.best_step, r.latest, r.latest_step) for r in found] == [("tier2", 6.04, 10, 6.26, 30)]
    assert "tier2 got worse" in found[0].message() and "train.objective" in found[0].message()
    assert regressions(_history(8.3, 6.04, 6.0)) == []  # still falling
    assert regressions(_history(8.3, 6.04, 6.08)) == []  # within the 1% margin
    assert regressions(_history(8.3)) == []  # one checkpoint: nothing to compare


def test_the_dashboard_history_warns_of_a_tier_that_got_worse():
    from aftermath.dashboard.history import RunHistory

    h = RunHistory().add_all([{"event": "checkpoint", "epoch": e, "step": 10 * (e + 1), "val_loss": v}
                              for e, v in enumerate([{"tier0": 8.3, "tier2": 8.3}, {"tier0": 6.0, "tier2": 6.04},
                                                     {"tier0": 5.5, "tier2": 6.26}])])
    warnings = h.regressions()
    assert len(warnings) == 1 and warnings[0].startswith("tier2 got worse: held-out loss 6.2600 at step 30")


def test_the_sum_objective_weights_every_sequence_at_every_tier(one_torch_thread):
    replica = _replica("sum", **{"train.own_share": 0.6})
    batch = _batch()
    groups = replica.sequence_groups(batch.shape[0], 0, "c")
    assert [(g.spec.name, len(g.rows), g.weight) for g in groups] == [
        ("tier0", 6, 0.6), ("tier1", 6, pytest.approx(0.2)), ("tier2", 6, pytest.approx(0.2))]
    result = replica.train(batch, 4, step=0, client_id="c")
    model = build_model(CFG, seed=3)
    ids, targets = batch[:, :-1], batch[:, 1:]
    (0.6 * model.loss(ids, targets) + 0.2 * model.loss(ids, targets, tier_spec(CFG, 1))
     + 0.2 * model.loss(ids, targets, tier_spec(CFG, 2))).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
