"""The pure state machine, with Psyche's scenarios, ticked by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from aftermath.coordinator import (ClientInfo, Commit, Phase, Rejected, RunStateMachine, assign_batches,
                                   proportional_shares)
from aftermath.runconfig import ScheduleSection


def schedule(**kw) -> ScheduleSection:
    base = dict(min_clients=1, init_min_clients=2, waiting_for_members_extra_time=1.0, warmup_time=10.0,
                max_round_train_time=5.0, round_witness_time=5.0, cooldown_time=5.0, rounds_per_epoch=3,
                global_batch_size=12, total_steps=6, heartbeat_interval=1.0, heartbeat_timeout=4.0, overlap=False)
    base.update(kw)
    return ScheduleSection(**base)


def info(tier: int, throughput: float = 1.0) -> ClientInfo:
    return ClientInfo(tier=tier, spec=f"tier{tier}", throughput=throughput)


class Run:
    """The machine plus a clock, with helpers that act as well-behaved clients."""

    def __init__(self, **kw) -> None:
        self.now = 0.0
        self.m = RunStateMachine(schedule(**kw), self.now, run_id="t")
        self.events: list = []

    def tick(self, dt: float = 0.1):
        self.now += dt
        evs = self.m.tick(self.now)
        self.events += evs
        return evs

    def beat(self, *ids: str) -> None:
        for cid in ids:
            self.m.heartbeat(cid, self.now)

    def ready_all(self) -> None:
        for mem in self.m.active():
            self.m.ready(mem.id, self.m.epoch, self.now)

    def commit(self, cid: str) -> None:
        rnd = self.m.round
        rng = rnd.assignments[cid]
        mem = self.m.members[cid]
        self.m.commit(Commit(cid, rnd.step, "ab" * 32, mem.info.tier, mem.info.spec, rng.size, 0.5, 3.0), self.now)

    def apply_all(self) -> None:
        for mem in self.m.active():
            self.m.applied(mem.id, self.m.round.step, self.now)

    def full_round(self) -> None:
        assert self.m.phase == Phase.ROUND_TRAIN
        for cid in list(self.m.round.assignments):
            self.commit(cid)
        self.tick()
        assert self.m.phase == Phase.ROUND_WITNESS
        self.apply_all()
        self.tick()

    def finish_cooldown(self) -> None:
        assert self.m.phase == Phase.COOLDOWN
        self.m.checkpoint_done(self.m.epoch, self.m.step, self.now)
        for mem in self.m.active():
            self.m.report_hash(mem.id, self.m.epoch, self.m.step, "00" * 32, self.now)
        self.tick()

    def start(self, *ids: str, tiers=None) -> None:
        for i, cid in enumerate(ids):
            self.m.join(cid, info(tiers[i] if tiers else i), self.now)
        self.tick(1.1)
        assert self.m.phase == Phase.WARMUP
        self.ready_all()
        self.tick()
        assert self.m.phase == Phase.ROUND_TRAIN


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def test_clients_connect_and_warmup_starts_at_init_min_clients():
    r = Run()
    r.m.join("a", info(0), r.now)
    for _ in range(5):
        r.beat("a")
        r.tick(1.0)
    assert r.m.phase == Phase.WAITING_FOR_MEMBERS  # one client, init_min_clients=2
    r.m.join("b", info(1), r.now)
    r.tick(0.5)
    assert r.m.phase == Phase.WAITING_FOR_MEMBERS  # quorum, but the extra time has not passed
    r.tick(0.6)
    assert r.m.phase == Phase.WARMUP
    r.ready_all()
    r.tick()
    assert r.m.phase == Phase.ROUND_TRAIN and r.m.round.step == 0


def test_warmup_waits_for_the_slow_loader_until_its_timeout():
    r = Run()
    r.m.join("a", info(0), r.now)
    r.m.join("b", info(1), r.now)
    r.m.join("c", info(2), r.now)
    r.tick(1.1)
    r.m.ready("a", 0, r.now)
    r.m.ready("b", 0, r.now)
    r.tick(1.0)
    assert r.m.phase == Phase.WARMUP
    for _ in range(10):
        r.beat("a", "b", "c")
        r.tick(1.0)
    assert r.m.phase == Phase.ROUND_TRAIN
    assert r.m.members["c"].status == "pending"  # it will load the model for the next epoch
    assert sorted(r.m.round.assignments) == ["a", "b"]


def test_client_lost_in_warmup_returns_to_waiting_for_members():
    r = Run()
    r.m.join("a", info(0), r.now)
    r.m.join("b", info(1), r.now)
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.m.ready("a", 0, r.now)
    for _ in range(5):  # b stops sending heartbeats
        r.beat("a")
        r.tick(1.0)
    assert r.m.phase == Phase.WAITING_FOR_MEMBERS
    assert r.m.members["b"].status == "gone"
    assert "dropped" in kinds(r.events)


def test_rounds_advance_with_proportional_assignment():
    r = Run()
    r.m.join("a", info(0, throughput=1.0), r.now)
    r.m.join("b", info(2, throughput=3.0), r.now)
    r.tick(1.1)
    r.ready_all()
    r.tick()
    rnd = r.m.round
    assert rnd.assignments["a"].to_json() == [0, 4] and rnd.assignments["b"].to_json() == [4, 12]  # 1 + 10/4, 1 + 30/4
    r.full_round()
    assert r.m.phase == Phase.ROUND_TRAIN and r.m.step == 1
    assert r.m.round.assignments["a"].start == 12  # step 1 covers [12, 24)
    accepted = [e for e in r.events if e.kind == "round_accepted"]
    assert [c["client_id"] for c in accepted[0].data["accepted"]] == ["a", "b"]


def test_round_waits_for_its_timeout_and_skips_the_missing_result():
    r = Run()
    r.start("a", "b")
    r.commit("a")
    r.tick(1.0)
    assert r.m.phase == Phase.ROUND_TRAIN  # b is late but alive
    for _ in range(5):
        r.beat("a", "b")
        r.tick(1.0)
    assert r.m.phase == Phase.ROUND_WITNESS
    assert [c.client_id for c in r.m.round.accepted] == ["a"]
    with pytest.raises(Rejected):
        r.commit("b")  # too late: the accepted set is published and closed


def test_epoch_ends_with_a_checkpoint_and_the_hash_reports():
    r = Run()
    r.start("a", "b")
    for _ in range(3):
        r.full_round()
    assert r.m.phase == Phase.COOLDOWN and r.m.step == 3
    assert any(e.kind == "epoch_ended" and e.data == {"epoch": 0, "step": 3} for e in r.events)
    r.tick(1.0)
    assert r.m.phase == Phase.COOLDOWN  # no checkpoint yet
    r.m.checkpoint_done(0, 3, r.now)
    r.m.report_hash("a", 0, 3, "11" * 32, r.now)
    r.tick()
    assert r.m.phase == Phase.COOLDOWN  # b has not reported
    r.m.report_hash("b", 0, 3, "11" * 32, r.now)
    r.tick()
    assert r.m.epoch == 1 and r.m.phase in (Phase.WAITING_FOR_MEMBERS, Phase.WARMUP)


def test_client_joining_mid_epoch_is_admitted_next_epoch_with_the_current_model():
    r = Run()
    r.start("a", "b")
    r.full_round()
    r.m.join("c", info(1), r.now)
    assert r.m.members["c"].status == "pending"
    with pytest.raises(Rejected):
        r.m.ready("c", 0, r.now)
    r.full_round()
    assert "c" not in r.m.round.assignments
    r.full_round()
    r.finish_cooldown()
    assert r.m.members["c"].status == "member"
    snap = r.m.snapshot(r.now)
    assert snap["checkpoint"] == {"epoch": 0, "step": 3}  # what c loads in warmup
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.ready_all()
    r.tick()
    assert sorted(r.m.round.assignments) == ["a", "b", "c"] and r.m.round.step == 3


def test_client_lost_mid_round_leaves_the_others_in_sync():
    r = Run()
    r.start("a", "b", "c")
    r.commit("a")
    r.commit("b")
    for _ in range(5):  # c is killed before its result
        r.beat("a", "b")
        r.tick(1.0)
        if r.m.phase != Phase.ROUND_TRAIN:
            break
    assert r.m.members["c"].status == "gone"
    assert r.m.phase == Phase.ROUND_WITNESS
    published = r.m.snapshot(r.now)["round"]["accepted"]
    assert [c["client_id"] for c in published] == ["a", "b"]  # the one set everybody applies
    r.apply_all()
    r.tick()
    assert r.m.phase == Phase.ROUND_TRAIN and sorted(r.m.round.assignments) == ["a", "b"]
    assert sum(b.size for b in r.m.round.assignments.values()) == 12


def test_member_that_does_not_apply_is_deferred_to_the_next_epoch():
    r = Run()
    r.start("a", "b")
    r.commit("a")
    r.commit("b")
    r.tick()
    r.m.applied("a", 0, r.now)
    for _ in range(6):
        r.beat("a", "b")
        r.tick(1.0)
    assert r.m.phase == Phase.ROUND_TRAIN and r.m.step == 1
    assert r.m.members["b"].status == "pending"
    assert list(r.m.round.assignments) == ["a"]


def test_run_finishes():
    r = Run()
    r.start("a", "b")
    for epoch in range(2):
        for _ in range(3):
            r.full_round()
        r.finish_cooldown()
        if epoch == 0:
            r.tick(1.1)
            r.ready_all()
            r.tick()
    assert r.m.phase == Phase.FINISHED and r.m.step == 6
    assert "finished" in kinds(r.events)
    with pytest.raises(Rejected):
        r.m.join("late", info(0), r.now)


def test_commit_rejections_name_the_reason():
    r = Run()
    r.start("a", "b")
    step = r.m.round.step
    with pytest.raises(Rejected, match="step 5"):
        r.m.commit(Commit("a", 5, "ab" * 32, 0, "tier0", 6, 1.0, 1.0), r.now)
    with pytest.raises(Rejected, match="covers 2 sequences"):
        r.m.commit(Commit("a", step, "ab" * 32, 0, "tier0", 2, 1.0, 1.0), r.now)
    with pytest.raises(Rejected, match="tier3"):
        r.m.commit(Commit("a", step, "ab" * 32, 3, "tier3", 6, 1.0, 1.0), r.now)
    with pytest.raises(Rejected, match="not in the run"):
        r.m.commit(Commit("zz", step, "ab" * 32, 0, "tier0", 6, 1.0, 1.0), r.now)
    r.commit("a")
    with pytest.raises(Rejected, match="already committed"):
        r.commit("a")
    with pytest.raises(Rejected):
        r.m.join("a", info(0), r.now)


def test_measured_throughput_moves_the_split():
    r = Run()
    r.start("a", "b")
    rnd = r.m.round
    # a trains 6 sequences in 0.5 s (12/s), b in 3.0 s (2/s)
    r.m.commit(Commit("a", 0, "ab" * 32, 0, "tier0", rnd.assignments["a"].size, 0.5, 3.0), r.now)
    r.m.commit(Commit("b", 0, "ab" * 32, 1, "tier1", rnd.assignments["b"].size, 3.0, 3.0), r.now)
    r.tick()
    r.apply_all()
    r.tick()
    sizes = {k: v.size for k, v in r.m.round.assignments.items()}
    assert sizes["a"] > sizes["b"] and sum(sizes.values()) == 12


@given(st.integers(0, 10_000), st.integers(1, 300),
       st.dictionaries(st.text("abcdef", min_size=1, max_size=4), st.floats(0, 1e6), min_size=1, max_size=8))
def test_assignment_covers_the_step_exactly_and_is_deterministic(step, batch, tps):
    a = assign_batches(step * batch, batch, tps)
    b = assign_batches(step * batch, batch, dict(reversed(list(tps.items()))))
    assert a == b
    ranges = sorted((r.start, r.end) for r in a.values())
    assert ranges[0][0] == step * batch and ranges[-1][1] == (step + 1) * batch
    assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))


def test_proportional_shares():
    assert proportional_shares(10, [1, 1, 1]) == [4, 3, 3]
    assert proportional_shares(14, [1, 3]) == [4, 10]
    assert proportional_shares(10, [1, 100]) == [1, 9]  # nobody starves
    assert proportional_shares(2, [1, 1, 5]) == [0, 0, 2]
    assert proportional_shares(5, [0, float("nan"), 2]) == [2, 2, 1]  # unknown = smallest known


# ------------------------------------------------------------------ progress: nobody waits for an epoch that never comes
def test_member_not_ready_at_warmup_end_gets_another_warmup_and_the_run_starts():
    r = Run(init_min_clients=2)
    r.m.join("a", info(0), r.now)
    r.m.join("b", info(1), r.now)
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.m.ready("a", 0, r.now)
    b_loaded_at = r.now + 12.0  # b needs longer than one warmup to load the model
    while r.now < 3 * 10.0 and r.m.phase != Phase.ROUND_TRAIN:
        r.beat("a", "b")
        if r.m.phase == Phase.WARMUP and r.now >= b_loaded_at and r.m.members["b"].status == "member":
            r.m.ready("b", 0, r.now)
        r.tick(0.5)
        if r.m.phase == Phase.WAITING_FOR_MEMBERS:  # the start of the next try: every live client is in it
            assert r.m.members["b"].status == "member"
    assert r.m.phase == Phase.ROUND_TRAIN
    assert sorted(r.m.round.assignments) == ["a", "b"] and r.m.round.step == 0
    assert "deferred" in kinds(r.events)


def test_only_member_dies_in_warmup_and_the_clients_that_joined_meanwhile_start_the_run():
    r = Run(init_min_clients=1)
    r.m.join("a", info(0), r.now)
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.m.join("b", info(1), r.now)
    r.m.join("c", info(2), r.now)
    assert r.m.members["b"].status == r.m.members["c"].status == "pending"
    for _ in range(6):  # a is killed: no more heartbeats
        r.beat("b", "c")
        r.tick(1.0)
    assert r.m.members["a"].status == "gone"
    assert r.m.members["b"].status == r.m.members["c"].status == "member"
    for _ in range(5):
        r.beat("b", "c")
        r.tick(0.5)
        if r.m.phase == Phase.WARMUP:
            r.ready_all()
    assert r.m.phase == Phase.ROUND_TRAIN
    assert sorted(r.m.round.assignments) == ["b", "c"] and r.m.round.step == 0


def test_node_dropped_in_warmup_is_replaced_by_a_pending_one():
    r = Run(init_min_clients=2)
    r.m.join("a", info(0), r.now)
    r.m.join("b", info(1), r.now)
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.m.ready("a", 0, r.now)
    r.m.join("c", info(2), r.now)  # waits for the next epoch
    r.m.leave("b", r.now, reason="shut down")
    assert r.m.phase == Phase.WAITING_FOR_MEMBERS  # below the quorum without b
    assert [m.id for m in r.m.active()] == ["a", "c"]  # c replaces b at once
    r.tick(1.1)
    assert r.m.phase == Phase.WARMUP
    r.m.ready("c", 0, r.now)
    r.tick()
    assert r.m.phase == Phase.ROUND_TRAIN
    assert sorted(r.m.round.assignments) == ["a", "c"] and r.m.round.step == 0


def test_replica_diverged_before_the_first_round_reloads_and_says_ready_again():
    r = Run(init_min_clients=2)
    r.m.join("a", info(0), r.now)
    r.m.join("b", info(1), r.now)
    r.tick(1.1)
    r.ready_all()
    r.m.diverged("b", 0, r.now)  # a late hash report: b must reload before it trains
    assert r.m.members["b"].status == "member" and r.m.members["b"].ready_epoch == -1
    r.tick()
    assert r.m.phase == Phase.WARMUP  # the round waits for b's reload
    r.m.ready("b", 0, r.now)
    r.tick()
    assert r.m.phase == Phase.ROUND_TRAIN and sorted(r.m.round.assignments) == ["a", "b"]


def test_a_resumed_machine_goes_on_from_its_data_position_whatever_the_batch_size():
    # state.json said step 10 starts at sequence 320 (batch 32 before); the run now has batch 16
    m = RunStateMachine(schedule(global_batch_size=16, total_steps=20), 0.0, run_id="t", step=10, epoch=1, data_position=320)
    assert m.data_position(10) == 320 and m.data_position(12) == 352
    m.join("a", ClientInfo(tier=0, spec="tier0"), 0.0)
    now = 0.0
    while m.phase != Phase.WARMUP:
        now += 1.0
        m.tick(now)
    m.ready("a", m.epoch, now)
    m.tick(now)
    assert m.round.assignments["a"].start == 320 and m.round.assignments["a"].end == 336


# ------------------------------------------------------------------------------ overlapped rounds
def test_overlapped_rounds_open_the_next_step_when_the_accepted_set_is_fixed():
    r = Run(overlap=True)
    r.start("a", "b")
    for step in range(2):  # the epoch's first two rounds: the next opens at once, no witness phase
        assert r.m.phase == Phase.ROUND_TRAIN and r.m.round.step == step
        for cid in ("a", "b"):
            r.commit(cid)
        r.tick()
        assert r.m.phase == Phase.ROUND_TRAIN and r.m.round.step == step + 1
        previous = r.m.snapshot(r.now)["previous_round"]
        assert previous["step"] == step and [c["client_id"] for c in previous["accepted"]] == ["a", "b"]
        for cid in ("a", "b"):  # applied while step + 1 trains
            r.m.applied(cid, step, r.now)
    # the epoch's last round ends in a witness: the checkpoint is taken with every step applied
    for cid in ("a", "b"):
        r.commit(cid)
    r.tick()
    assert r.m.phase == Phase.ROUND_WITNESS and r.m.round.step == 2
    r.m.applied("a", 2, r.now)
    r.tick()
    assert r.m.phase == Phase.ROUND_WITNESS  # b has not applied step 2 yet
    r.m.applied("b", 2, r.now)
    r.tick()
    assert r.m.phase == Phase.COOLDOWN and r.m.step == 3
    kinds = [e.kind for e in r.events]
    assert kinds.count("round_accepted") == 3 and kinds.count("round_started") == 3


def test_overlapped_round_defers_a_member_that_never_applies():
    r = Run(overlap=True, round_witness_time=2.0, max_round_train_time=30.0)
    r.start("a", "b")
    for cid in ("a", "b"):
        r.commit(cid)
    r.tick()
    assert r.m.round.step == 1
    r.m.applied("a", 0, r.now)  # b never says it applied step 0
    for _ in range(25):
        r.beat("a", "b")
        r.tick()
    assert r.m.members["b"].status == "pending" and r.m.members["a"].status == "member"
    assert any(e.kind == "deferred" and e.data["client_id"] == "b" for e in r.events)
    r.commit("a")  # the round goes on without b
    r.tick()
    assert r.m.round.step == 2 and "b" not in r.m.round.assignments


def test_applied_is_refused_for_a_step_no_round_holds():
    r = Run(overlap=True)
    r.start("a", "b")
    with pytest.raises(Rejected, match="not being witnessed"):
        r.m.applied("a", 0, r.now)  # step 0 is still training
    for cid in ("a", "b"):
        r.commit(cid)
    r.tick()
    r.m.applied("a", 0, r.now)
    r.m.applied("a", 0, r.now)  # said twice: harmless
    with pytest.raises(Rejected, match="not being witnessed"):
        r.m.applied("a", 5, r.now)
    for cid in ("a", "b"):
        r.commit(cid)
    r.tick()
    assert r.m.round.step == 2
    r.m.applied("b", 0, r.now)  # the slowest member's word on step 0 comes after step 1 closed: still taken
    assert r.m.members["b"].applied_step == 0


def test_batch_split_balances_round_times_not_only_training_speed():
    rates, overheads = {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 0.0}  # a: slower and 2 s of fixed cost per round
    plain = assign_batches(0, 12, rates)
    balanced = assign_batches(0, 12, rates, overheads)
    assert [plain[c].size for c in "ab"] == [4, 8]  # by speed alone a's round takes 2 + 4 = 6 s, b's 4 s
    assert [balanced[c].size for c in "ab"] == [3, 9]  # a: 2 + 3 = 5 s, b: 4.5 s
    round_time = lambda split: max(overheads[c] + split[c].size / rates[c] for c in "ab")  # noqa: E731
    assert round_time(balanced) < round_time(plain)
    # a fixed cost above the balanced round time leaves that client its minimum share
    starved = assign_batches(0, 12, rates, {"a": 100.0, "b": 0.0})
    assert starved["a"].size == 1 and starved["b"].size == 11
    # no fixed costs: the split in proportion to throughput
    assert assign_batches(0, 12, rates, {"a": 0.0, "b": 0.0}) == plain
