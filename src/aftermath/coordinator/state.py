"""The run's state machine: epochs and rounds, as in Psyche's coordinator. Pure: no sockets, no files, no clock.

Phases:

    WaitingForMembers -> Warmup -> RoundTrain -> RoundWitness -> RoundTrain -> ... -> Cooldown
        -> WaitingForMembers (next epoch) ... -> Finished

- WaitingForMembers: clients join. When the quorum is there (`init_min_clients` for the first epoch,
  `min_clients` later) the machine waits `waiting_for_members_extra_time` more, then starts the warmup.
- Warmup: every member fetches the current model and says it is ready. Ends when all are ready, or at
  `warmup_time`: members not ready then are deferred, and the round starts with the ready ones if they are
  the quorum. Falling below the quorum (at that point, or when a member is lost) returns the run to
  WaitingForMembers, where the deferred and the clients that joined during the warmup try again.
- RoundTrain: the round's global batch is split among the members; each trains its range and commits a
  result (a blob). Ends when every assigned result is in, else at `max_round_train_time`.
- Screening (`screen`, aftermath.coordinator.trust): when a round's training ends, the results that came in are
  screened; a flagged one is left out of the accepted set and is a strike on its member, and a member with
  `trust.strikes` strikes within `trust.strike_rounds` rounds is excluded from the run: it is gone, with the
  reason, and may not join again.
- RoundWitness: the accepted set (the results that came in and passed the screen, sorted by client id) is
  published; every member
  applies exactly that set and says so. Ends when all have applied, else at `round_witness_time` (members
  that have not applied are out of sync: they leave the epoch and resynchronise at the next one).
- Overlapped rounds (`schedule.overlap`): when a round's accepted set is fixed and the epoch goes on, the next
  RoundTrain opens at once, and the members apply the set while they train the next step (their gradient is
  one step stale). A member must still say it applied each step within `round_witness_time` of its accepted
  set, or it leaves the epoch. The epoch's last round (and a round the operator pauses after) ends in a
  RoundWitness, so the checkpoint and the hashes are taken with every step applied.
- Cooldown: the epoch's checkpoint is written (the service says when: `checkpoint_done`) and members report
  their replica hash. Ends when the checkpoint is done and every member has reported (or `cooldown_time`).

The owner calls `tick(now)` often; every call returns the events that happened, for the service to act on
(write a checkpoint, apply a round, log). Clients that join after WaitingForMembers wait for the next epoch
("pending"). A member silent for `heartbeat_timeout` is dropped; a round never waits for a dropped member.

Invariant: in WaitingForMembers every client that is not gone is a member. WaitingForMembers is the start of
the next try at an epoch, which is what a pending client waits for, so entering it (from Cooldown, or back from
a Warmup below the quorum) admits every pending client. Hence live clients never wait for an epoch that cannot
start, and enough live clients always get to a round within the timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from aftermath.coordinator.assignment import BatchRange, assign_batches
from aftermath.errors import AftermathError
from aftermath.runconfig import ScheduleSection, TrustSection


class Phase(str, Enum):
    WAITING_FOR_MEMBERS = "WaitingForMembers"
    WARMUP = "Warmup"
    ROUND_TRAIN = "RoundTrain"
    ROUND_WITNESS = "RoundWitness"
    COOLDOWN = "Cooldown"
    FINISHED = "Finished"


class Rejected(AftermathError):
    """A client's call does not fit the run's current state (the reason says why); nothing changed."""


@dataclass
class ClientInfo:
    """What a client declares when it joins."""

    tier: int | None
    spec: str  # the tier's or Mix'n'Match spec's name, e.g. "tier1"
    device: str = "cpu"
    memory_bytes: int = 0
    throughput: float = 1.0  # sequences per second it expects to train
    public_key: str = ""  # ed25519, hex: every commitment of this client must verify with it (aftermath.crypto)


@dataclass
class Member:
    id: str
    info: ClientInfo
    joined_at: float
    last_seen: float
    status: str = "pending"  # pending (waits for an epoch), member (in the epoch), gone
    excluded: str = ""  # why the screen excluded it from the run (then it is gone for good)
    strikes: list[int] = field(default_factory=list)  # the steps at which the screen flagged its result
    throughput: float = 1.0  # sequences/s: declared at join, then measured (moving average)
    overhead: float = 0.0  # seconds per round outside training that it cannot hide (moving average)
    ready_epoch: int = -1  # the epoch this member said it is ready for
    rounds_contributed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # last reported loss, bytes, tokens/s ...
    resync_epoch: int = -1  # the epoch at whose end its replica hash was found to differ (it must reload)
    applied_step: int = -1  # the last step whose accepted set this member said it applied

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tier": self.info.tier, "spec": self.info.spec, "device": self.info.device,
                "memory_bytes": self.info.memory_bytes, "status": self.status,
                "throughput": round(self.throughput, 4), "ready_epoch": self.ready_epoch,
                "rounds_contributed": self.rounds_contributed, "last_seen": self.last_seen, "stats": self.stats,
                "public_key": self.info.public_key, "resync_epoch": self.resync_epoch, "excluded": self.excluded,
                "strikes": len(self.strikes)}


@dataclass
class Commit:
    """A client's result for a round: the blob holding its payload, and how it was made."""

    client_id: str
    step: int
    blob: str  # sha256 of the payload blob
    tier: int | None
    spec: str
    sequences: int
    train_seconds: float
    loss: float
    signature: str = ""  # the client's ed25519 signature of the commitment (aftermath.crypto)
    overhead_seconds: float = 0.0  # its last round's time outside training on its critical path
    payload_bytes: int = 0  # the size of its blob

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "step": self.step, "blob": self.blob, "tier": self.tier,
                "spec": self.spec, "sequences": self.sequences, "train_seconds": self.train_seconds,
                "loss": self.loss, "signature": self.signature}


@dataclass
class Round:
    step: int
    epoch: int
    started_at: float
    assignments: dict[str, BatchRange]
    commits: dict[str, Commit] = field(default_factory=dict)
    accepted: list[Commit] | None = None  # published when the round's training ends
    screened: dict[str, str] = field(default_factory=dict)  # client -> why its result was left out of `accepted`
    accepted_at: float | None = None
    applied: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "started_at": self.started_at,
                "assignments": {k: v.to_json() for k, v in sorted(self.assignments.items())},
                "committed": sorted(self.commits),
                "commits": {cid: {"blob": c.blob, "tier": c.tier, "spec": c.spec, "signature": c.signature}
                            for cid, c in sorted(self.commits.items())},
                "accepted": None if self.accepted is None else [c.to_json() for c in self.accepted],
                "screened": dict(sorted(self.screened.items())), "applied": sorted(self.applied)}


@dataclass
class HashReport:
    client_id: str
    tier: int | None
    spec: str
    epoch: int
    step: int
    weights_sha256: str


# ------------------------------------------------------------------------------------------ events
# what changes a client's view: phases, rounds, accepted sets, a member's status. Not joins, commits, applied
# calls, heartbeats or hash reports, so a round's N commits do not wake N long-polling clients N times.
KEEP_EARLIER_ROUNDS = 2  # rounds kept before the last one: a member that fell behind applies them from here
VIEW_EVENTS = frozenset({"phase", "round_started", "round_accepted", "deferred", "dropped", "diverged", "paused",
                         "resumed", "finished", "epoch_ended", "excluded"})
Screen = Callable[["Round"], dict[str, str]]  # a round's commits -> the flagged clients and why


@dataclass(frozen=True)
class Event:
    kind: str  # phase, round_started, round_accepted, epoch_ended, dropped, joined, finished, screened, excluded
    data: dict[str, Any]


class RunStateMachine:
    """The run, as a pure state machine. `now` is injected into every call (seconds, any monotonic clock)."""

    def __init__(self, schedule: ScheduleSection, now: float, *, run_id: str = "run", step: int = 0, epoch: int = 0,
                 data_position: int | None = None, sequences_per_round: int | None = None,
                 trust: TrustSection | None = None, screen: Screen | None = None,
                 exclusions: dict[str, tuple[int, str]] | None = None) -> None:
        self.schedule = schedule
        self.trust = trust or TrustSection()
        self.screen = screen  # None: every result that came in is accepted
        # client -> (step, reason) of every member the screen excluded, this process or before a restart
        self.exclusions: dict[str, tuple[int, str]] = dict(exclusions or {})
        self.run_id = run_id
        # a round's sequences: the global batch, times the inner steps of a local-steps run (RunConfig)
        self.sequences_per_round = sequences_per_round or schedule.global_batch_size
        # the first global sequence of `step` (a resumed run goes on where its data stopped, even when the
        # round's size changed): step s reads from origin + (s - step) * sequences_per_round
        self._data_origin = (step, step * self.sequences_per_round if data_position is None else data_position)
        self.phase = Phase.WAITING_FOR_MEMBERS
        self.phase_started = now
        self.quorum_since: float | None = None
        self.step = step  # steps completed = the step the next round trains
        self.epoch = epoch
        self.epoch_started = now
        self.epoch_start_step = step
        self.members: dict[str, Member] = {}
        self.round: Round | None = None
        self.last_round: Round | None = None
        self.earlier_rounds: list[Round] = []  # the few rounds before last_round, for members catching up
        self.checkpoint_epoch = epoch - 1  # the last epoch whose checkpoint is written (-1: the initial one)
        self.checkpoint_step = step
        self.hash_reports: dict[int, dict[str, HashReport]] = {}  # epoch -> client -> report
        self.version = 0  # bumps on every change, for watchers
        self.view_version = 0  # bumps only on what a client acts on (see VIEW_EVENTS): its view's version
        self.paused = False  # set by the operator (dashboard): no new round starts while paused
        self._events: list[Event] = []

    # ------------------------------------------------------------------------------ helpers
    def data_position(self, step: int) -> int:
        """The first global sequence step `step` trains."""
        origin_step, origin = self._data_origin
        return origin + (step - origin_step) * self.sequences_per_round

    def _emit(self, kind: str, **data: Any) -> None:
        self._events.append(Event(kind, data))
        self.version += 1
        if kind in VIEW_EVENTS:
            self.view_version += 1

    def _set_phase(self, phase: Phase, now: float) -> None:
        old = self.phase
        self.phase = phase
        self.phase_started = now
        self._emit("phase", old=old.value, new=phase.value, step=self.step, epoch=self.epoch)

    def active(self) -> list[Member]:
        """Members of the current epoch, sorted by id."""
        return [m for _, m in sorted(self.members.items()) if m.status == "member"]

    def _quorum(self) -> int:
        return self.schedule.init_min_clients if self.epoch == 0 and self.step == 0 else self.schedule.min_clients

    def deadline(self) -> float | None:
        s = self.schedule
        return {
            Phase.WARMUP: self.phase_started + s.warmup_time,
            Phase.ROUND_TRAIN: self.phase_started + s.max_round_train_time,
            Phase.ROUND_WITNESS: self.phase_started + s.round_witness_time,
            Phase.COOLDOWN: self.phase_started + s.cooldown_time,
        }.get(self.phase)

    def round_at(self, step: int) -> Round | None:
        """The round of `step`, while it is the current or the last one."""
        return next((r for r in (self.round, self.last_round, *self.earlier_rounds)
                     if r is not None and r.step == step), None)

    def _member(self, client_id: str) -> Member:
        member = self.members.get(client_id)
        if member is None or member.status == "gone":
            raise Rejected(f"client {client_id!r} is not in the run (dropped or never joined); join again")
        return member

    # ------------------------------------------------------------------------------ client calls
    def join(self, client_id: str, info: ClientInfo, now: float) -> Member:
        """Admit a client: into the current epoch while WaitingForMembers, else for the next epoch."""
        if self.phase == Phase.FINISHED:
            raise Rejected("the run has finished; nothing left to train")
        if client_id in self.exclusions:
            raise Rejected(f"client {client_id!r} was excluded from this run: {self.exclusions[client_id][1]}")
        old = self.members.get(client_id)
        if old is not None and old.status != "gone":
            raise Rejected(f"client id {client_id!r} is already in the run")
        status = "member" if self.phase == Phase.WAITING_FOR_MEMBERS else "pending"
        member = Member(id=client_id, info=info, joined_at=now, last_seen=now, status=status,
                        throughput=info.throughput if info.throughput > 0 else 1.0)
        self.members[client_id] = member
        # (every client ever seen bounds the members: below the quorum, no need to count them)
        if status == "member" and self.quorum_since is None and len(self.members) >= self._quorum() \
                and len(self.active()) >= self._quorum():
            self.quorum_since = now  # the extra waiting time counts from the moment the quorum was reached
        self._emit("joined", client_id=client_id, status=status, tier=info.tier, spec=info.spec)
        return member

    def leave(self, client_id: str, now: float, reason: str = "left") -> None:
        member = self.members.get(client_id)
        if member is None or member.status == "gone":
            return
        was_member = member.status == "member"
        member.status = "gone"
        self._emit("dropped", client_id=client_id, reason=reason, step=self.step)
        if was_member:
            self._after_member_lost(now)

    def heartbeat(self, client_id: str, now: float, stats: dict[str, Any] | None = None) -> Member:
        member = self._member(client_id)
        member.last_seen = now
        if stats:
            member.stats.update(stats)
        return member

    def ready(self, client_id: str, epoch: int, now: float) -> None:
        member = self.heartbeat(client_id, now)
        if epoch != self.epoch:
            raise Rejected(f"ready for epoch {epoch}, but the run is in epoch {self.epoch}")
        if member.status != "member":
            raise Rejected(f"client {client_id!r} is {member.status}: it waits for the next epoch")
        if member.ready_epoch != epoch:
            member.ready_epoch = epoch
            member.applied_step = self.step - 1  # it loaded the model at the epoch's first step
            self.version += 1

    def commit(self, commit: Commit, now: float) -> None:
        """Record a client's result for the current round."""
        member = self.heartbeat(commit.client_id, now)
        rnd = self.round
        if self.phase != Phase.ROUND_TRAIN or rnd is None:
            raise Rejected(f"results are taken in RoundTrain; the run is in {self.phase.value}")
        if commit.step != rnd.step:
            raise Rejected(f"result for step {commit.step}, but the round trains step {rnd.step}")
        if commit.client_id not in rnd.assignments:
            raise Rejected(f"client {commit.client_id!r} has no batch in step {rnd.step}")
        if commit.client_id in rnd.commits:
            raise Rejected(f"client {commit.client_id!r} already committed step {rnd.step}")
        if commit.sequences != rnd.assignments[commit.client_id].size:
            raise Rejected(f"result covers {commit.sequences} sequences, the assignment "
                           f"{rnd.assignments[commit.client_id].size}")
        if commit.spec != member.info.spec:
            raise Rejected(f"result is for {commit.spec}, the client joined as {member.info.spec}")
        rnd.commits[commit.client_id] = commit
        if commit.train_seconds > 0:  # measured throughput, smoothed
            measured = commit.sequences / commit.train_seconds
            member.throughput = 0.5 * member.throughput + 0.5 * measured
            member.overhead = 0.5 * member.overhead + 0.5 * commit.overhead_seconds
        self.version += 1

    def applied(self, client_id: str, step: int, now: float) -> None:
        """`client_id` applied the accepted set of `step`, a step of this epoch whose set is published."""
        member = self.heartbeat(client_id, now)
        accepted = [r for r in (self.round, self.last_round) if r is not None and r.accepted is not None]
        latest = max((r.step for r in accepted), default=-1)
        # with overlapped rounds the slowest member's word on step t comes after step t + 1 closed
        if not self.epoch_start_step <= step <= latest:
            raise Rejected(f"step {step} is not being witnessed (phase {self.phase.value}, the last accepted "
                           f"step of epoch {self.epoch} is {latest if latest >= self.epoch_start_step else None})")
        if member.status != "member":
            raise Rejected(f"client {client_id!r} is {member.status}, not in this epoch")
        if step > member.applied_step:
            member.applied_step = step
            self.version += 1
        for rnd in accepted:
            if rnd.step == step:
                rnd.applied.add(client_id)

    def report_hash(self, client_id: str, epoch: int, step: int, weights_sha256: str, now: float) -> None:
        member = self.heartbeat(client_id, now)
        if step != self.step:
            raise Rejected(f"hash reported for step {step}, but the run is at step {self.step}")
        self.hash_reports.setdefault(epoch, {})[client_id] = HashReport(
            client_id, member.info.tier, member.info.spec, epoch, step, weights_sha256)
        self.version += 1

    def diverged(self, client_id: str, epoch: int, now: float) -> None:
        """The replica hash `client_id` reported at the end of `epoch` differs from the reference: it leaves the
        epoch (its results stop counting) and reloads the checkpoint before it trains again. Before the epoch's
        first round it stays a member and must say ready again, after its reload."""
        member = self.members.get(client_id)
        if member is None or member.resync_epoch >= epoch:
            return
        member.resync_epoch = epoch
        member.ready_epoch = -1  # a ready said before the reload does not count
        if member.status == "member" and self.phase not in (Phase.WAITING_FOR_MEMBERS, Phase.WARMUP):
            member.status = "pending"
        self._emit("diverged", client_id=client_id, epoch=epoch, step=self.step)

    def checkpoint_done(self, epoch: int, step: int, now: float) -> None:
        """The service wrote the checkpoint of `epoch` (the model after `step` steps)."""
        self.checkpoint_epoch = epoch
        self.checkpoint_step = step
        self.version += 1
        self.view_version += 1

    def pause(self, now: float) -> None:
        """The operator pauses the run: the current round finishes, the next one waits for `resume`."""
        if not self.paused and self.phase != Phase.FINISHED:
            self.paused = True
            self._emit("paused", step=self.step, phase=self.phase.value)

    def resume(self, now: float) -> None:
        if self.paused:
            self.paused = False
            self._emit("resumed", step=self.step, phase=self.phase.value)

    # ------------------------------------------------------------------------------ ticking
    def tick(self, now: float) -> list[Event]:
        """Advance by the clock: timeouts, drops, phase changes. Returns the events since the last tick."""
        for member in self.active() + [m for m in self.members.values() if m.status == "pending"]:
            if now - member.last_seen > self.schedule.heartbeat_timeout:
                self.leave(member.id, now, reason=f"no heartbeat for {now - member.last_seen:.1f}s")
        for _ in range(8):  # a few transitions may chain within one tick
            if not self._advance(now):
                break
        events, self._events = self._events, []
        return events

    def _advance(self, now: float) -> bool:
        s = self.schedule
        phase = self.phase
        if phase == Phase.WAITING_FOR_MEMBERS:
            if len(self.active()) >= self._quorum():
                if self.quorum_since is None:
                    self.quorum_since = now
                if now - self.quorum_since >= s.waiting_for_members_extra_time:
                    self.quorum_since = None
                    self._set_phase(Phase.WARMUP, now)
                    return True
            else:
                self.quorum_since = None
            return False
        if phase == Phase.WARMUP:
            members = self.active()
            if all(m.ready_epoch == self.epoch for m in members) or now >= self.deadline():
                for m in members:
                    if m.ready_epoch != self.epoch:  # too slow to load: try again next epoch
                        m.status = "pending"
                        self._emit("deferred", client_id=m.id, reason="not ready by the end of warmup")
                if len(self.active()) < self._quorum():
                    self._wait_for_members(now)
                    return True
                if self.paused:
                    return False
                self._start_round(now)
                return True
            return False
        if phase == Phase.ROUND_TRAIN:
            rnd = self.round
            assert rnd is not None
            if self._defer_late_appliers(self.last_round, now):
                return True
            live = {m.id for m in self.active()}
            waiting = [cid for cid in rnd.assignments if cid in live and cid not in rnd.commits]
            if not waiting or now >= self.deadline():
                rnd.screened = self.screen(rnd) if self.screen is not None and rnd.commits else {}
                rnd.accepted = [rnd.commits[cid] for cid in sorted(rnd.commits) if cid not in rnd.screened]
                rnd.accepted_at = now
                for c in rnd.accepted:
                    self.members[c.client_id].rounds_contributed += 1
                self._emit("round_accepted", step=rnd.step, accepted=[c.to_json() for c in rnd.accepted],
                           missing=sorted(set(rnd.assignments) - set(rnd.commits)), screened=rnd.screened)
                for cid, reason in sorted(rnd.screened.items()):
                    self._strike(cid, rnd.step, reason, now)
                if s.overlap and not self.paused and not self._epoch_over(rnd.step + 1, now):
                    # the next step trains while this one is applied
                    self.step = rnd.step + 1
                    self._retire(rnd)
                    self._start_round(now)
                else:
                    self._set_phase(Phase.ROUND_WITNESS, now)
                return True
            return False
        if phase == Phase.ROUND_WITNESS:
            if self.round is None:  # paused between two rounds: the last one is applied, the next waits
                if self.paused:
                    return False
                if len(self.active()) < s.min_clients:  # members were lost during the pause
                    self._set_phase(Phase.COOLDOWN, now)
                    self._emit("epoch_ended", epoch=self.epoch, step=self.step)
                else:
                    self._start_round(now)
                return True
            rnd = self.round
            assert rnd is not None
            members = self.active()
            if all(m.applied_step >= rnd.step for m in members) or now >= self.deadline():
                for m in members:
                    if m.applied_step < rnd.step:  # out of sync: resynchronise from the next checkpoint
                        m.status = "pending"
                        self._emit("deferred", client_id=m.id, reason=f"did not apply step {rnd.step} in time")
                self.step = rnd.step + 1
                self._retire(rnd)
                if self._epoch_over(self.step, now):
                    self._set_phase(Phase.COOLDOWN, now)
                    self._emit("epoch_ended", epoch=self.epoch, step=self.step)
                elif not self.paused:
                    self._start_round(now)
                return True
            return False
        if phase == Phase.COOLDOWN:
            if self.checkpoint_epoch < self.epoch:
                return False  # never leave before the epoch's checkpoint exists: joiners need it
            reports = self.hash_reports.get(self.epoch, {})
            if all(m.id in reports for m in self.active()) or now >= self.deadline():
                if self.step >= s.total_steps:
                    self._set_phase(Phase.FINISHED, now)
                    self._emit("finished", step=self.step, epoch=self.epoch)
                    return True
                self.epoch += 1
                self.epoch_start_step = self.step
                self._wait_for_members(now)
                self.epoch_started = now
                return True
            return False
        return False

    def _strike(self, client_id: str, step: int, reason: str, now: float) -> None:
        """The screen left `client_id`'s result of `step` out; at `trust.strikes` strikes within
        `trust.strike_rounds` rounds it is excluded from the run."""
        member = self.members[client_id]
        member.strikes = [s for s in member.strikes if s > step - self.trust.strike_rounds] + [step]
        self._emit("screened", client_id=client_id, step=step, reason=reason, strikes=len(member.strikes))
        if len(member.strikes) >= self.trust.strikes and not member.excluded:
            member.excluded = (f"{len(member.strikes)} results flagged in {self.trust.strike_rounds} rounds, the "
                               f"last at step {step}: {reason}")
            self.exclusions[client_id] = (step, member.excluded)
            self._emit("excluded", client_id=client_id, step=step, reason=member.excluded)
            self.leave(client_id, now, reason=f"excluded: {reason}")

    def _epoch_over(self, step: int, now: float) -> bool:
        """Whether the epoch ends before `step` (the next step to train)."""
        s = self.schedule
        return (step - self.epoch_start_step >= s.rounds_per_epoch or step >= s.total_steps
                or (s.epoch_time > 0 and now - self.epoch_started >= s.epoch_time)
                or len(self.active()) < s.min_clients)

    def _defer_late_appliers(self, rnd: Round | None, now: float) -> bool:
        """Overlapped rounds: members that have not applied `rnd` (the round before the one in training) within
        `round_witness_time` of its accepted set leave the epoch, as a late member leaves a RoundWitness."""
        if rnd is None or rnd.accepted_at is None or now < rnd.accepted_at + self.schedule.round_witness_time:
            return False
        late = [m for m in self.active() if m.applied_step < rnd.step]
        for m in late:
            m.status = "pending"
            self._emit("deferred", client_id=m.id, reason=f"did not apply step {rnd.step} in time")
        if late:
            self.version += 1
        return bool(late)

    def _retire(self, rnd: Round) -> None:
        """`rnd`'s accepted set is fixed and the step moves on: it becomes the last round."""
        if self.last_round is not None:
            self.earlier_rounds = [self.last_round, *self.earlier_rounds][:KEEP_EARLIER_ROUNDS]
        self.last_round, self.round = rnd, None

    def _start_round(self, now: float) -> None:
        members = self.active()
        if self.phase == Phase.WARMUP:
            self.epoch_started = now
        assignments = assign_batches(self.data_position(self.step), self.sequences_per_round,
                                     {m.id: m.throughput for m in members}, {m.id: m.overhead for m in members})
        self.round = Round(step=self.step, epoch=self.epoch,
                           started_at=now, assignments=assignments)
        self._set_phase(Phase.ROUND_TRAIN, now)
        self._emit("round_started", step=self.step, assignments={k: v.to_json() for k, v in assignments.items()})

    def _wait_for_members(self, now: float) -> None:
        """(Re)start an epoch: every pending client is admitted (the invariant of the module docstring)."""
        for m in self.members.values():
            if m.status == "pending":
                m.status = "member"
        # the extra waiting time counts from the moment the quorum was reached, as in `join`
        self.quorum_since = now if len(self.active()) >= self._quorum() else None
        self._set_phase(Phase.WAITING_FOR_MEMBERS, now)

    def _after_member_lost(self, now: float) -> None:
        # Warmup below quorum goes back to waiting; rounds simply stop waiting for the lost member (tick).
        if self.phase == Phase.WARMUP and len(self.active()) < self._quorum():
            self._wait_for_members(now)

    # ------------------------------------------------------------------------------ views
    def snapshot(self, now: float) -> dict[str, Any]:
        rnd = self.round or self.last_round
        deadline = self.deadline()
        return {
            "version": self.version, "run_id": self.run_id, "phase": self.phase.value, "paused": self.paused,
            "phase_started": self.phase_started, "deadline": deadline,
            "seconds_left": None if deadline is None else max(0.0, deadline - now),
            "epoch": self.epoch, "step": self.step, "total_steps": self.schedule.total_steps,
            "rounds_per_epoch": self.schedule.rounds_per_epoch,
            "global_batch_size": self.schedule.global_batch_size,
            "sequences_per_round": self.sequences_per_round,
            "round": None if rnd is None else rnd.to_json(),
            # overlapped rounds: the accepted set members apply while they train `round`
            "previous_round": None if self.round is None or self.last_round is None else self.last_round.to_json(),
            "checkpoint": {"epoch": self.checkpoint_epoch, "step": self.checkpoint_step},
            "members": [m.to_json() for _, m in sorted(self.members.items())],
        }
