"""Progress of the state machine under random joins, kills, partial work and clock jumps (hypothesis, stateful).

The property: whatever happened before, once at least the quorum of live clients all do their part promptly,
the run trains a step (or finishes) within the sum of the configured timeouts. Clients are pure calls on the
machine with a fake clock; the service's part (the epoch's checkpoint after `epoch_ended`) is emulated.
"""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aftermath.coordinator import ClientInfo, Commit, Phase, RunStateMachine
from aftermath.runconfig import ScheduleSection

MAX_CLIENTS = 6
DRIVE_DT = 0.25  # the drive's clock step: well under heartbeat_interval, so live clients are never dropped


class RunProgress(RuleBasedStateMachine):
    @initialize(init_min=st.integers(1, 3), min_clients=st.integers(1, 2), rounds_per_epoch=st.integers(1, 3),
                total_steps=st.integers(2, 8), warmup=st.sampled_from([2.0, 6.0]),
                train=st.sampled_from([1.0, 3.0]), heartbeat_timeout=st.sampled_from([2.5, 4.0]))
    def setup(self, init_min: int, min_clients: int, rounds_per_epoch: int, total_steps: int, warmup: float,
              train: float, heartbeat_timeout: float) -> None:
        self.schedule = ScheduleSection(
            init_min_clients=init_min, min_clients=min_clients, waiting_for_members_extra_time=0.5,
            warmup_time=warmup, max_round_train_time=train, round_witness_time=2.0, cooldown_time=2.0,
            rounds_per_epoch=rounds_per_epoch, global_batch_size=12, total_steps=total_steps,
            heartbeat_interval=1.0, heartbeat_timeout=heartbeat_timeout)
        self.now = 0.0
        self.m = RunStateMachine(self.schedule, self.now, run_id="p")
        self.live: set[str] = set()  # clients that heartbeat (killed ones are silent, the machine drops them)
        self.next_id = 0

    # ------------------------------------------------------------------ helpers: one client's prompt part
    def _alive_in_machine(self, cid: str) -> bool:
        mem = self.m.members.get(cid)
        return mem is not None and mem.status != "gone"

    def _beat(self) -> None:
        for cid in sorted(self.live):
            if self._alive_in_machine(cid):
                self.m.heartbeat(cid, self.now)
            elif self.m.phase != Phase.FINISHED:  # dropped (gone): the client loop joins again
                self.m.join(cid, self._info(cid), self.now)

    @staticmethod
    def _info(cid: str) -> ClientInfo:
        tier = int(cid[1:]) % 3
        return ClientInfo(tier=tier, spec=f"tier{tier}")

    def _do_part(self, cid: str) -> None:
        """What a well-behaved client does for the current phase (nothing if it has nothing to do)."""
        m = self.m
        mem = m.members.get(cid)
        if mem is None or mem.status != "member":
            return
        rnd = m.round
        if m.phase == Phase.WARMUP and mem.ready_epoch != m.epoch:
            m.ready(cid, m.epoch, self.now)
        elif m.phase == Phase.ROUND_TRAIN and rnd is not None and cid in rnd.assignments \
                and cid not in rnd.commits:
            size = rnd.assignments[cid].size
            m.commit(Commit(cid, rnd.step, "ab" * 32, mem.info.tier, mem.info.spec, size, 0.1, 3.0), self.now)
        elif m.phase == Phase.ROUND_WITNESS and rnd is not None and rnd.accepted is not None \
                and cid not in rnd.applied:
            m.applied(cid, rnd.step, self.now)
        elif m.phase == Phase.COOLDOWN and cid not in m.hash_reports.get(m.epoch, {}):
            m.report_hash(cid, m.epoch, m.step, "00" * 32, self.now)

    def _service(self) -> None:
        # the service writes the epoch's checkpoint after `epoch_ended`, then calls checkpoint_done
        if self.m.phase == Phase.COOLDOWN and self.m.checkpoint_epoch < self.m.epoch:
            self.m.checkpoint_done(self.m.epoch, self.m.step, self.now)

    def _bound(self) -> float:
        s = self.schedule
        # a client killed just before is dropped within heartbeat_timeout; then each phase runs at most once
        # more (a warmup twice: the one under way, which may fall below the quorum, and the next)
        return (s.heartbeat_timeout + s.waiting_for_members_extra_time + 2 * s.warmup_time
                + s.max_round_train_time + s.round_witness_time + s.cooldown_time + 2.0)

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.next_id < MAX_CLIENTS)
    @rule()
    def join(self) -> None:
        if self.m.phase == Phase.FINISHED:
            return
        cid = f"c{self.next_id}"
        self.next_id += 1
        self.m.join(cid, self._info(cid), self.now)
        self.live.add(cid)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        self.live.discard(data.draw(st.sampled_from(sorted(self.live))))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.live)))
        self.live.discard(cid)
        self.m.leave(cid, self.now, reason="shut down")

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def one_client_acts(self, data: st.DataObject) -> None:
        # ready in Warmup, commit in RoundTrain, apply in RoundWitness, report the hash in Cooldown
        self._do_part(data.draw(st.sampled_from(sorted(self.live))))

    @rule()
    def service_checkpoint(self) -> None:
        self._service()

    @rule(dt=st.floats(0.0, 3.0))
    def advance_time(self, dt: float) -> None:
        self.now += dt
        self._beat()  # live clients heartbeat every heartbeat_interval: their last one is recent

    @rule()
    def tick(self) -> None:
        self.m.tick(self.now)

    @rule()
    def everybody_does_their_part(self) -> None:
        self._check_progress()

    @invariant()
    def members_in_waiting(self) -> None:
        # the module's invariant: WaitingForMembers admits every client that is not gone
        if self.m.phase == Phase.WAITING_FOR_MEMBERS:
            assert all(mem.status != "pending" for mem in self.m.members.values())

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self._check_progress()

    # ------------------------------------------------------------------ the property
    def _check_progress(self) -> None:
        """Drive the machine itself: only the live clients act, all promptly; the step must advance in time."""
        m = self.m
        self._beat()
        quorum = max(self.schedule.init_min_clients, self.schedule.min_clients)
        if m.phase == Phase.FINISHED or len(self.live) < quorum:
            return
        start_step, start, deadline = m.step, self.now, self.now + self._bound()
        while self.now < deadline:
            self.now += DRIVE_DT
            self._beat()
            for cid in sorted(self.live):
                self._do_part(cid)
            self._service()
            m.tick(self.now)
            if m.step > start_step or m.phase == Phase.FINISHED:
                return
        raise AssertionError(f"no progress in {self.now - start:.1f}s with {len(self.live)} live clients: "
                             f"phase {m.phase.value}, step {m.step}, epoch {m.epoch}, members "
                             f"{[(x.id, x.status, x.ready_epoch) for x in m.members.values()]}")


RunProgress.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_run_always_progresses_with_enough_live_clients = RunProgress.TestCase
