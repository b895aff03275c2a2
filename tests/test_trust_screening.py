"""Poisoned updates: the coordinator's screen on real DisTrO payloads of four replicas (tiers 0, 1, 1, 2), each
attack made by the test-only attacker hook itself (aftermath.client.hooks), and the state machine's strikes and
exclusion. The whole path over real processes is bench/stress.py --attacks and tests/test_trust_attacks.py (slow)."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aftermath.client.hooks import TestHooks
from aftermath.coordinator import ClientInfo, Commit, Phase, Rejected, RunStateMachine
from aftermath.coordinator.trust import PayloadScreen, Submitted, _SortedValues
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.optim import Payload
from aftermath.optim.screening import payload_stats
from aftermath.round.replica import Replica, build_codec
from aftermath.runconfig import RunConfig, ScheduleSection, TrustSection

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")
TIERS = {"c0": 0, "c1": 1, "c2": 1, "c3": 2}
RAW = {"optimizer.distro": {"one_bit": False, "apply_mode": "raw"}}


class Round:
    """Four replicas whose gradients share one direction (as gradients of one model on one distribution do)
    plus their own noise; each step encoded by the replica, tampered by the attacker's hooks, decoded by the
    coordinator's codec, and screened."""

    def __init__(self, attacker: str | None = None, attack: str | None = None, **overrides) -> None:
        self.run = RunConfig().with_overrides(overrides)
        model = build_model(CFG, seed=0)
        self.replicas = {cid: Replica.build(sliced_model(model, tier_spec(CFG, t)), CFG, tier_spec(CFG, t), self.run)
                         for cid, t in TIERS.items()}
        self.codec = build_codec(self.run, CFG)
        self.screen = PayloadScreen(self.run.trust, self.codec.plan, self.codec.wire.one_bit)
        self.hooks = TestHooks(None, None, attack=attack)
        self.attacker = attacker
        self.direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
                          for n, p in model.named_parameters()}
        self.applied: list = []  # the last round's accepted payloads (what a replaying attacker copies)
        self.payloads: dict = {}  # client -> its payload of the last step

    def step(self, step: int, losses: dict[str, float] | None = None):
        submitted = []
        for i, (cid, replica) in enumerate(self.replicas.items()):
            noise = torch.Generator().manual_seed(100 * step + i)
            grads = {n: (d + 0.7 * torch.randn(d.shape, generator=noise))[tuple(slice(0, s) for s in
                                                                               replica.rule.shapes[n])]
                     for n, d in self.direction.items()}
            blob = replica.encode(grads, step, cid)
            if cid == self.attacker:
                blob = self.hooks.tamper(step, blob, replica, cid, self.applied)
            payload = self.codec.decode(blob, self.run.run_id, step, cid, replica.spec)
            self.payloads[cid] = payload
            submitted.append(Submitted(cid, self.screen.prepare(payload, blob), (losses or {}).get(cid, 5.0)))
        self.submitted = submitted
        screened = self.screen.screen(step, submitted)
        self.applied = [self.payloads[s.client_id] for s in submitted if s.client_id not in screened.flagged]
        return screened


def test_honest_payloads_of_every_tier_agree_and_none_is_flagged():
    rnd = Round()
    for step in range(3):
        screened = rnd.step(step)
        assert screened.flagged == {}
        assert all(st.agreement > 0.5 and not st.worst_agreement < 0.3 for st in screened.stats), screened.stats


@pytest.mark.parametrize("attack", ["flip", "random", "region", "constant", "replay"])
def test_each_attack_is_flagged_and_no_honest_payload_is(attack):
    rnd = Round(attacker="c1", attack=attack)
    flagged = [rnd.step(step).flagged for step in range(3)]
    assert all(set(f) <= {"c1"} for f in flagged), flagged  # never an honest member
    # a repeat needs a round to repeat: from step 1 on; the others from step 0
    assert all("c1" in f for f in flagged[1 if attack in ("constant", "replay") else 0:]), flagged
    if attack in ("constant", "replay"):
        assert "repeats" in flagged[1]["c1"]
    if attack in ("flip", "region"):
        assert "signs" in flagged[0]["c1"] and "agree -" in flagged[0]["c1"]


def test_a_scaled_payload_is_flagged_by_its_size_under_raw_values():
    rnd = Round(attacker="c1", attack="scale", **RAW)
    flagged = rnd.step(0).flagged
    assert list(flagged) == ["c1"] and "times the round's median size" in flagged["c1"]


def test_a_scaled_one_bit_payload_is_the_honest_one():
    """A one-bit wire sends signs only: the attack cannot change what it sends (and nothing is flagged)."""
    rnd = Round(attacker="c1", attack="scale")
    assert rnd.step(0).flagged == {}


def test_a_copy_within_the_round_flags_the_later_commit_only():
    rnd = Round()
    rnd.step(0)
    c1 = rnd.payloads["c1"]
    original, copy = (Payload(c1.kind, c1.run_id, 1, cid, c1.spec, c1.params) for cid in ("c1", "c2"))
    screen = PayloadScreen(rnd.run.trust, rnd.codec.plan, one_bit=True)
    flagged = screen.screen(1, [Submitted(p.client_id, screen.prepare(p, rnd.codec.encode(p)), 5.0)
                                for p in (original, copy)]).flagged
    assert flagged == {"c2": "its payload copies c1's of this step"}


def test_a_reported_loss_far_from_the_rounds_is_flagged():
    rnd = Round()
    flagged = rnd.step(0, losses={"c0": 5.1, "c1": 9.0, "c2": 5.0, "c3": 5.3}).flagged
    assert list(flagged) == ["c1"] and "reported loss 9" in flagged["c1"]
    assert list(rnd.step(1, losses={"c0": 5.0, "c1": 5.0, "c2": float("nan"), "c3": 5.2}).flagged) == ["c2"]


def test_dense_payloads_are_sized_and_fingerprinted_but_claim_no_agreement():
    rnd = Round(**{"optimizer.name": "adamw"})
    screened = rnd.step(0)
    assert screened.flagged == {}
    assert all(st.rms > 0 and st.agreement != st.agreement for st in screened.stats)  # nan: DisTrO-only
    assert len({st.fingerprint for st in screened.stats}) == 4


def test_stats_of_a_lone_payload_claim_no_agreement():
    rnd = Round()
    replica = rnd.replicas["c0"]
    blob = replica.encode(dict(rnd.direction), 0, "c0")
    payload = rnd.codec.decode(blob, rnd.run.run_id, 0, "c0", replica.spec)
    (stats,) = payload_stats([rnd.screen.prepare(payload, blob)], rnd.screen.index.names)
    assert stats.agreement != stats.agreement and stats.worst_param is None  # nan: nothing to agree with


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=9).map(lambda xs: [x / 2 for x in xs]), st.data())
def test_the_median_of_the_others_is_the_median_without_its_own_value(values, data):
    mine = data.draw(st.sampled_from(values))
    rest = list(values)
    rest.remove(mine)
    others = _SortedValues(values).others(mine)
    assert others.count == len(rest)
    assert others.median == statistics.median(rest) if rest else others.median != others.median


# ------------------------------------------------------------------------------------------ strikes
def machine(**trust) -> tuple[RunStateMachine, list]:
    flags: dict[int, dict[str, str]] = {}
    schedule = ScheduleSection(min_clients=1, init_min_clients=3, waiting_for_members_extra_time=0.0,
                               warmup_time=10.0, max_round_train_time=5.0, round_witness_time=5.0,
                               cooldown_time=5.0, rounds_per_epoch=20, global_batch_size=6, total_steps=20,
                               heartbeat_interval=1.0, heartbeat_timeout=100.0, overlap=False)
    m = RunStateMachine(schedule, 0.0, trust=TrustSection(**trust), screen=lambda rnd: flags.get(rnd.step, {}))
    for cid in ("a", "b", "c"):
        m.join(cid, ClientInfo(tier=0, spec="tier0"), 0.0)
    m.tick(0.1)
    for mem in m.active():
        m.ready(mem.id, 0, 0.2)
    m.tick(0.3)
    assert m.phase == Phase.ROUND_TRAIN
    return m, flags


def play_round(m: RunStateMachine, now: float) -> list:
    rnd = m.round
    for cid, rng in rnd.assignments.items():
        m.commit(Commit(cid, rnd.step, f"{ord(cid):064x}", 0, "tier0", rng.size, 0.5, 3.0), now)
    events = m.tick(now)
    for mem in m.active():
        m.applied(mem.id, rnd.step, now)
    return events + m.tick(now + 0.01)


def test_flagged_results_are_left_out_and_two_strikes_exclude_a_member_for_good():
    m, flags = machine(strikes=2, strike_rounds=3)
    flags.update({0: {"b": "its signs agree -0.90"}, 2: {"b": "its signs agree -0.80"}})
    events = play_round(m, 1.0)
    accepted = next(e for e in events if e.kind == "round_accepted")
    assert [c["client_id"] for c in accepted.data["accepted"]] == ["a", "c"]
    assert accepted.data["screened"] == {"b": "its signs agree -0.90"}
    assert m.members["b"].status == "member" and m.last_round.screened == {"b": "its signs agree -0.90"}
    play_round(m, 2.0)
    events = play_round(m, 3.0)
    excluded = [e for e in events if e.kind == "excluded"]
    assert [e.data["client_id"] for e in excluded] == ["b"]
    assert m.members["b"].status == "gone" and "2 results flagged in 3 rounds" in m.members["b"].excluded
    assert "b" not in m.round.assignments  # the next round is split among the others
    with pytest.raises(Rejected, match="was excluded from this run: 2 results flagged"):
        m.join("b", ClientInfo(tier=0, spec="tier0"), 4.0)


def test_strikes_older_than_the_window_do_not_count():
    m, flags = machine(strikes=2, strike_rounds=2)
    flags.update({0: {"b": "x"}, 2: {"b": "y"}})  # two rounds apart: the first has aged out
    for step in range(4):
        play_round(m, 1.0 + step)
    assert m.members["b"].status == "member" and not m.members["b"].excluded
