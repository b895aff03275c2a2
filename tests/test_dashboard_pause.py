"""Pause and resume in the pure state machine: the current round finishes, no new round starts until resume."""

from __future__ import annotations

from aftermath.coordinator import ClientInfo, Commit, Phase, RunStateMachine
from aftermath.runconfig import ScheduleSection


def machine(**kw) -> RunStateMachine:
    base = dict(min_clients=1, init_min_clients=2, waiting_for_members_extra_time=0.0, warmup_time=10.0,
                max_round_train_time=5.0, round_witness_time=5.0, cooldown_time=5.0, rounds_per_epoch=3,
                global_batch_size=12, total_steps=6, heartbeat_interval=1.0, heartbeat_timeout=100.0)
    base.update(kw)
    return RunStateMachine(ScheduleSection(**base), 0.0, run_id="t")


def to_first_round(m: RunStateMachine, now: float) -> float:
    for i, cid in enumerate(("a", "b")):
        m.join(cid, ClientInfo(tier=i, spec=f"tier{i}"), now)
    now += 0.1
    m.tick(now)
    assert m.phase == Phase.WARMUP
    for mem in m.active():
        m.ready(mem.id, m.epoch, now)
    return now


def train_and_apply(m: RunStateMachine, now: float) -> float:
    rnd = m.round
    for cid, rng in rnd.assignments.items():
        mem = m.members[cid]
        m.commit(Commit(cid, rnd.step, "ab" * 32, mem.info.tier, mem.info.spec, rng.size, 0.5, 3.0), now)
    now += 0.1
    m.tick(now)
    assert m.phase == Phase.ROUND_WITNESS
    for mem in m.active():
        m.applied(mem.id, rnd.step, now)
    return now


def test_pause_holds_the_next_round_and_resume_starts_it():
    m = machine()
    now = to_first_round(m, 0.0)
    m.tick(now + 0.1)
    assert m.phase == Phase.ROUND_TRAIN and m.round.step == 0
    m.pause(now)
    assert m.paused and m.snapshot(now)["paused"] is True
    now = train_and_apply(m, now + 0.2)  # the round in flight still completes
    for _ in range(5):  # however long the pause, no new round starts, and nobody is deferred
        now += 3.0
        for cid in ("a", "b"):
            m.heartbeat(cid, now)
        events = m.tick(now)
        assert not [e for e in events if e.kind in ("round_started", "deferred")]
    assert m.step == 1 and m.round is None and m.phase == Phase.ROUND_WITNESS
    assert m.snapshot(now)["round"]["step"] == 0  # the last round stays visible
    m.resume(now)
    events = m.tick(now + 0.1)
    kinds = [e.kind for e in events]
    assert "resumed" in kinds and "round_started" in kinds
    assert m.phase == Phase.ROUND_TRAIN and m.round.step == 1 and not m.paused


def test_pause_in_warmup_waits_before_the_first_round():
    m = machine()
    m.pause(0.0)
    now = to_first_round(m, 0.0)
    m.tick(now + 0.1)
    assert m.phase == Phase.WARMUP and m.round is None
    m.resume(now + 0.2)
    m.tick(now + 0.3)
    assert m.phase == Phase.ROUND_TRAIN and m.round.step == 0


def test_pause_and_resume_emit_events_once_and_bump_the_version():
    m = machine()
    v = m.version
    m.pause(1.0)
    m.pause(2.0)  # already paused: nothing new
    m.resume(3.0)
    m.resume(4.0)
    kinds = [e.kind for e in m.tick(5.0)]
    assert kinds.count("paused") == 1 and kinds.count("resumed") == 1
    assert m.version > v


def test_members_lost_during_a_pause_end_the_epoch_on_resume():
    m = machine(min_clients=2)
    now = to_first_round(m, 0.0)
    m.tick(now + 0.1)
    m.pause(now)
    now = train_and_apply(m, now + 0.2)
    m.tick(now + 0.1)
    assert m.round is None
    m.leave("b", now + 0.2)
    m.resume(now + 0.3)
    m.tick(now + 0.4)
    assert m.phase == Phase.COOLDOWN
