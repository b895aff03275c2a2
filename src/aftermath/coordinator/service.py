"""The coordinator's aiohttp service: a thin shell around the pure state machine and the model keeper.

Routes (JSON in and out, except blob and checkpoint file bodies; errors are `{"error": "..."}` with a 4xx;
every body and answer is a model of aftermath.round.protocol):

    GET  /health                      liveness, phase and step                         -> HealthAnswer
    GET  /run                         the run config (without the token), model config  -> RunInfo
    POST /join                        JoinRequest                                       -> JoinAnswer
    GET  /state[?after=V&wait=S]      the whole run's state (dashboard, tools); with `after`, waits up to S s
                                      for a version > V                                  -> StateSnapshot
    GET  /view[?after=V&wait=S]       what the calling client needs, O(1) in the number of clients; with
                                      `after`, waits for a view version > V     (session) -> ClientView
    GET  /ws                          WebSocket: the StateSnapshot, pushed on every change
    POST /heartbeat                   HeartbeatRequest                     (session)    -> HeartbeatAnswer
    POST /ready                       ReadyRequest: the member holds the current model (session)
    PUT  /blobs/{sha256}              payload bytes, hash checked, size capped   (session)
    GET  /blobs/{sha256}              payload bytes                              (session)
    POST /commit                      CommitRequest (its blob PUT before), or packed with its blob
                                      (protocol.COMMIT_WITH_BLOB): one request   (session)
    POST /applied                     AppliedRequest: the member applied the round's accepted set (session)
    GET  /rounds/{step}               a round's whole accepted set, keys and ranges  (session) -> RoundDetail
    POST /witness                     WitnessRequest: a witness's verdict on a round's update (session)
    POST /hash                        HashRequest                          (session)    -> HashAnswer
    GET  /checkpoint                  the current checkpoint                            -> CheckpointAnswer
    GET  /checkpoint/files/{path}     one file of it
    GET  /summary                     summary.json once the run has finished            -> RunSummary
    GET  /data/...                    token batches (aftermath.data.server), when data.source = "coordinator"
    GET  /openapi.json                an OpenAPI 3 description of every route (aftermath.coordinator.openapi)

Calls after join carry `Authorization: Bearer SESSION` (sessions.py). Trust: the join sends the client's
ed25519 public key, bound to its session; a commit must carry the client's signature of (run, step, client,
blob, ASSIGNED range) (aftermath.crypto), and its payload must decode with the run's codec. Every client (or
address, before it joins) has a token-bucket rate limit (429 + Retry-After); JSON bodies and blobs are size-capped;
blob storage is bounded and old rounds' blobs are collected (blobs.BlobLedger). A signed, well-formed payload can
still be poisoned: each round's results are screened before the accepted set is fixed (trust.py), and a member
flagged too often is excluded. Everything that changes the run
goes through the state machine; slow work (applying rounds, checkpoints, exports) runs in one worker thread, in
order. Resuming is resume.py, replica checks replicas.py, the summary summary.py, how an accepted set reaches
the clients (payloads, or one published update and its witnesses) distribution.py.

Scale: a client polls its own view, which changes only with what it acts on; long-pollers are woken once per
tick (20 ms) at most, however many calls changed the run in it; the full state is for the dashboard.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ValidationError

from aftermath.checkpoint.manifest import read_manifest
from aftermath.coordinator.blobs import BlobLedger, BlobStore, BlobTooLarge, StorageFull, is_sha256
from aftermath.coordinator.distribution import RoundDistribution, distribute
from aftermath.coordinator.keeper import CHECKPOINT_DIR, INFO_FILE, MODEL_DIR, ModelKeeper
from aftermath.coordinator.persist import save_state, write_json_atomic
from aftermath.coordinator.ratelimit import RateLimiter
from aftermath.coordinator.replicas import ReplicaChecks
from aftermath.coordinator.resume import ResumePoint, resume_point
from aftermath.coordinator.sessions import Sessions, Unauthorized
from aftermath.coordinator.state import ClientInfo, Commit, Event, HashReport, Rejected, Round, RunStateMachine
from aftermath.coordinator.summary import build_summary
from aftermath.coordinator.trust import PayloadScreen, Submitted
from aftermath.crypto import (COORDINATOR_KEY_FILE, SignatureError, Signer, assignment_message, checkpoint_message,
                              round_message, verify_commitment)
from aftermath.errors import AftermathError, ConfigError
from aftermath.metrics import MetricsWriter
from aftermath.model import MatFormerConfig, TierSpec, parse_spec, tier_spec
from aftermath.model.geometry import max_tier
from aftermath.optim import Payload
from aftermath.optim.screening import Prepared
from aftermath.optim.update import accepted_digest, expected_update_bytes
from aftermath.round.protocol import (COMMIT_WITH_BLOB, AcceptedResult, AppliedRequest, CheckpointAnswer,
                                      ClientView, CommitRequest, HashAnswer, HashRequest, HealthAnswer,
                                      HeartbeatAnswer, HeartbeatRequest, JoinAnswer, JoinRequest, OkAnswer,
                                      ReadyRequest, RoundDetail, RunInfo, RunSummary, ScreenedResult, StateSnapshot,
                                      UpdateView, WitnessRequest, unpack_commit)
from aftermath.round.objective import regressions
from aftermath.round.replica import build_codec
from aftermath.runconfig import RunConfig

log = logging.getLogger("aftermath.coordinator")

SUMMARY_FILE = "summary.json"
MAX_JSON_BYTES = 256 * 1024
MAX_PATH_CHARS = 1024  # a checkpoint file path; each part is also held to the file system's 255
STATE_MAX_AGE = 0.5  # seconds a serialised state is served for unchanged (its clock fields age that much at most)
TICK_SECONDS = 0.02  # the state machine's clock tick; long-pollers are woken at most once per tick
KEEP_DISTRIBUTIONS = 4  # rounds whose distribution (plane, witnesses, update) is kept
MAX_SCREENED = 1000  # screened results listed in the summary (a run that flags more says so in its metrics)
INLINE_DECODE_BYTES = 64 * 1024  # payloads up to this size are validated on the event loop (see commit)


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _answer(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(by_alias=True), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure becomes a JSON error with a 4xx; an unexpected exception is logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return _json_error(exc.status, exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason)
    except Unauthorized as exc:
        return _json_error(401, str(exc))
    except Rejected as exc:
        return _json_error(409, str(exc))
    except BlobTooLarge as exc:
        return _json_error(413, str(exc))
    except StorageFull as exc:
        return _json_error(507, str(exc))
    except SignatureError as exc:
        return _json_error(403, str(exc))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        return _json_error(400, f"invalid request: {problems}")
    except AftermathError as exc:
        return _json_error(400, str(exc))
    except Exception:  # a bug: answer, log, keep running
        log.exception("internal error on %s %s", request.method, request.path)
        return _json_error(500, "internal error (logged by the coordinator)")


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_JSON_BYTES, actual_size=request.content_length)
    raw = await request.read()
    if len(raw) > MAX_JSON_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_JSON_BYTES, actual_size=len(raw))
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # thousands of nested brackets
        raise web.HTTPBadRequest(text="the body nests too deeply; send a flat JSON object") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text=f"the body must be a JSON object, got {type(data).__name__}")
    return model.model_validate(data)


class CoordinatorService:
    def __init__(self, run: RunConfig, run_dir: str | Path, *, token: str, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, linger: float = 3.0, admin_token: str = "",
                 force_resume: bool = False) -> None:
        if not token:
            raise ConfigError("the coordinator needs a run token (--token or network.token)")
        self.run = run
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.clock = clock
        self.linger = linger
        self.data_dir = data_dir
        self.keeper = ModelKeeper(run, self.run_dir, data_dir)
        self.identity = Signer.load_or_create(self.run_dir / COORDINATOR_KEY_FILE)  # signs what clients act on
        repaired = self.keeper.recover()
        if repaired:
            log.warning("%s: %s", self.run_dir, repaired)
        self.resume: ResumePoint | None = resume_point(run, self.run_dir, self.keeper.checkpoint_info(),
                                                       force=force_resume)
        self.checks = ReplicaChecks()
        self.codec = build_codec(run, self.keeper.config)  # checks every commit's payload before it is accepted
        self.screen = PayloadScreen(run.trust, self.codec.plan, self.codec.wire.one_bit)
        screening = dict(trust=run.trust, screen=self._screen if run.trust.screen else None)
        if self.resume is None:
            self.machine = RunStateMachine(run.schedule, clock(), run_id=run.run_id,
                                           sequences_per_round=run.sequences_per_round, **screening)
        else:
            self.machine = RunStateMachine(run.schedule, clock(), run_id=run.run_id, step=self.resume.step,
                                           epoch=self.resume.epoch + 1, data_position=self.resume.data_position,
                                           sequences_per_round=run.sequences_per_round,
                                           exclusions=self.resume.exclusions, **screening)
            self._restore_history(self.resume)
        self.blobs = BlobStore(run.network.max_blob_bytes)  # the rounds in flight, in memory
        self.ledger = BlobLedger(self.blobs)
        self.mirror = None  # [storage] backend "s3": the bucket clients download blobs from
        if run.storage.backend == "s3":
            from aftermath.coordinator.objectstore import S3BlobStore

            # the coordinator's own blobs (a round's update) may be larger than a client's
            self.mirror = S3BlobStore.from_section(run.storage, max_bytes=2**40)
        self.mirrored: set[str] = set()  # blobs in the bucket: GET /blobs redirects there
        self._mirroring: set[asyncio.Task] = set()
        self.limiter = RateLimiter(run.network.rate_limit, run.network.rate_burst)
        self.rejected = 0  # commits refused (bad payload, bad signature, not assigned ...)
        self.bytes_out = 0  # answer bodies and blobs this process sent (the dashboard's WebSocket aside)
        self.metrics = MetricsWriter(self.run_dir / "metrics" / "coordinator.jsonl")
        if self.resume is not None:  # where this process takes the run up again (the steps after it are redone)
            self.metrics.write(event="resumed", step=self.resume.step, epoch=self.resume.epoch)
        self.sessions = Sessions()
        self.events: list[dict[str, Any]] = []  # recent events, for watchers (bounded)
        self.decoded: dict[str, Payload] = {}  # blob sha -> payload decoded (validated) at commit, until applied
        self.prepared: dict[str, Prepared] = {}  # blob sha -> the payload as the screen needs it, until screened
        self.finished: asyncio.Event | None = None  # created on the loop in on_startup
        self.summary: RunSummary | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keeper")
        self._jobs: asyncio.Queue | None = None
        self._changed: asyncio.Event | None = None  # woken (once per tick) when the state changed
        self._view_changed: asyncio.Event | None = None  # woken (once per tick) when the clients' views changed
        self._dirty = False  # something changed since the last tick woke the pollers
        self._view_bumps = 0  # view changes of the service's own (updates published); see view_version
        self._state_cache: tuple[tuple[int, bool], float, bytes] | None = None  # see _state_body
        self._view_cache: tuple[tuple[int, bool], float, dict[str, Any]] | None = None  # see _view_shared
        self._round_entries: dict[int, Any] = {}  # step -> _round_shared of a round members catch up on
        self._detail_cache: dict[tuple[int, bool], bytes] = {}  # see round_detail
        self.distributions: dict[int, RoundDistribution] = {}  # step -> how its accepted set reaches the clients
        self._assignment_signatures: dict[tuple[int, str], str] = {}  # (step, client) -> signature, see client_view
        self.update_bytes = 0  # the expected size of a round's update blob (set at start-up)
        self.updates_published = 0
        self.update_disputes: list[dict[str, Any]] = []  # witnesses that found a published update wrong
        self.screened: list[ScreenedResult] = []  # results the screen left out (the first MAX_SCREENED)
        self.updates_witnessed = 0  # witness verdicts that agreed
        self._tasks: list[asyncio.Task] = []
        self._websockets: set[web.WebSocketResponse] = set()
        self._exporting: set[str] = set()  # Mix'n'Match specs queued for export into the current checkpoint
        self.admin_token = admin_token  # pauses and resumes the run from the dashboard; empty = disabled
        self.app = self._build_app()

    def _restore_history(self, point: ResumePoint) -> None:
        """What the run knew before the restart: validation losses, reference hashes, reports, divergences."""
        self.keeper.val_history = list(point.val_history)
        self.checks.restore(point.reference_hashes, point.divergences, point.hash_reports)
        for r in point.hash_reports:
            self.machine.hash_reports.setdefault(r["epoch"], {})[r["client_id"]] = HashReport(
                r["client_id"], r["tier"], r["spec"], r["epoch"], r["step"], r["weights_sha256"])

    # ------------------------------------------------------------------ what the dashboard reads
    @property
    def model_config(self) -> MatFormerConfig:
        return self.keeper.config

    def state(self) -> StateSnapshot:
        return StateSnapshot.model_validate({**self.machine.snapshot(self.clock()), "finished": self.summary is not None})

    def _state_body(self) -> bytes:
        """GET /state's bytes, built once per state version (and at least every STATE_MAX_AGE s, for the clock
        fields): the long-pollers one change wakes all get the same bytes instead of each building and encoding
        the whole snapshot."""
        key = (self.machine.version, self.summary is not None)
        now = time.monotonic()
        if self._state_cache is None or self._state_cache[0] != key or now - self._state_cache[1] > STATE_MAX_AGE:
            self._state_cache = (key, now, self.state().model_dump_json(by_alias=True).encode())
        return self._state_cache[2]

    @property
    def view_version(self) -> int:
        return self.machine.view_version + self._view_bumps

    def _view_shared(self) -> dict[str, Any]:
        """The part of every client's view that is the same for all, built once per view version."""
        key = (self.view_version, self.summary is not None)
        now = time.monotonic()
        if self._view_cache is None or self._view_cache[0] != key or now - self._view_cache[1] > STATE_MAX_AGE:
            m = self.machine
            deadline = m.deadline()
            clock = self.clock()
            rnd = m.round or m.last_round
            self._round_entries = {}
            self._view_cache = (key, now, {
                "version": self.view_version, "run_id": m.run_id, "phase": m.phase.value, "paused": m.paused,
                "deadline": deadline, "seconds_left": None if deadline is None else max(0.0, deadline - clock),
                "epoch": m.epoch, "step": m.step, "total_steps": m.schedule.total_steps,
                "data_plane": self.run.network.data_plane,
                "checkpoint": {"epoch": m.checkpoint_epoch, "step": m.checkpoint_step},
                "finished": self.summary is not None,
                "rounds": [self._round_shared(r) for r in
                           (rnd, m.last_round if m.round is not None else None)]})
        return self._view_cache[2]

    def _round_shared(self, rnd: Any) -> tuple[Any, dict[str, Any], dict[str, Any] | None] | None:
        if rnd is None:
            return None
        base = {"step": rnd.step, "epoch": rnd.epoch, "started_at": rnd.started_at,
                "first": min((a.start for a in rnd.assignments.values()), default=0)}
        result = None
        if rnd.accepted is not None:
            dist = self.distributions.get(rnd.step)
            digest, signature = self._round_decision(rnd)
            result = {"accepted": len(rnd.accepted), "payload_bytes": sum(c.payload_bytes for c in rnd.accepted),
                      "plane": "payloads" if dist is None else dist.plane,
                      "update": None if dist is None or dist.update is None else dist.update.model_dump(),
                      "witnesses": dist.witnesses if dist is not None else [],
                      "accepted_digest": digest, "signature": signature}
        return rnd, base, result

    def _round_decision(self, rnd: Any) -> tuple[str, str]:
        """A round's accepted-set digest and the coordinator's signature of it (with the update blob, once
        published): made once per round in `_distribute`, made again here only for a round no longer held there."""
        dist = self.distributions.get(rnd.step)
        if dist is not None:
            return dist.accepted_digest, dist.signature
        digest = accepted_digest((c.client_id, c.blob) for c in rnd.accepted)
        return digest, self.identity.sign(round_message(self.run.run_id, rnd.step, digest, None))

    def _assignment_signature(self, step: int, client_id: str, start: int, end: int) -> str:
        key = (step, client_id)
        if key not in self._assignment_signatures:
            self._assignment_signatures[key] = self.identity.sign(
                assignment_message(self.run.run_id, step, client_id, start, end))
        return self._assignment_signatures[key]

    def client_view(self, client_id: str) -> bytes:
        """GET /view's bytes for `client_id` (a ClientView): the shared part and this client's own."""
        shared = self._view_shared()
        member = self.machine.members[client_id]

        def own(entry: tuple[Any, dict[str, Any], dict[str, Any] | None] | None) -> dict[str, Any] | None:
            if entry is None:
                return None
            rnd, base, result = entry
            mine = rnd.assignments.get(client_id)
            return {**base, "assignment": None if mine is None else (mine.start, mine.end),
                    "assignment_signature": None if mine is None else self._assignment_signature(
                        rnd.step, client_id, mine.start, mine.end),
                    "committed": client_id in rnd.commits,
                    "result": None if result is None else {
                        "accepted": result["accepted"], "payload_bytes": result["payload_bytes"],
                        "plane": result["plane"], "update": result["update"],
                        "witness": client_id in result["witnesses"],
                        "accepted_digest": result["accepted_digest"], "signature": result["signature"]}}

        current, previous = shared["rounds"]
        view = {k: v for k, v in shared.items() if k != "rounds"}
        # a member that fell behind (its next step to apply is older than the previous round) catches up first
        behind, oldest = member.applied_step + 1, (previous or current or (None, {"step": -1}))[1]["step"]
        catch_up = None
        in_rounds = self.machine.phase.value in ("RoundTrain", "RoundWitness")
        if member.status == "member" and member.ready_epoch == self.machine.epoch and in_rounds and behind < oldest:
            if behind not in self._round_entries:
                self._round_entries[behind] = self._round_shared(self.machine.round_at(behind))
            catch_up = own(self._round_entries[behind])
        view.update(me=member.to_json(), round=own(current), previous_round=own(previous),
                    catch_up=catch_up if catch_up is not None and catch_up["result"] is not None else None)
        return json.dumps(view).encode()

    def round_detail(self, step: int) -> bytes:
        """GET /rounds/{step}'s bytes (a RoundDetail), built once per step (and once more with its update)."""
        rnd = self.machine.round_at(step)
        if rnd is None or rnd.accepted is None:
            raise web.HTTPNotFound(text=f"step {step}'s accepted set is not published, or no longer held (only the "
                                   f"round in training and the one before it are)")
        dist = self.distributions.get(step)
        key = (step, dist is not None and dist.update is not None)
        if key not in self._detail_cache:
            members = self.machine.members
            ids = [c.client_id for c in rnd.accepted]
            digest, signature = self._round_decision(rnd)
            detail = RoundDetail(
                step=rnd.step, epoch=rnd.epoch, accepted=[AcceptedResult(**c.to_json()) for c in rnd.accepted],
                assignments={cid: rnd.assignments[cid].to_json() for cid in ids},
                public_keys={cid: members[cid].info.public_key for cid in ids},
                update=None if dist is None else dist.update,
                accepted_digest=digest, signature=signature, witnesses=[] if dist is None else dist.witnesses,
                # the payloads already in the bucket are fetched there, not through the coordinator
                urls={c.blob: self.mirror.download_url(c.blob) for c in rnd.accepted if c.blob in self.mirrored})
            self._detail_cache = {k: v for k, v in self._detail_cache.items() if k[0] >= step - KEEP_DISTRIBUTIONS}
            self._detail_cache[key] = detail.model_dump_json().encode()
        return self._detail_cache[key]

    def spec_of(self, client_id: str) -> TierSpec | None:
        return self.sessions.specs.get(client_id)

    def now(self) -> float:
        return self.clock()

    def pause(self) -> None:
        self.machine.pause(self.clock())

    def resume_run(self) -> None:
        self.machine.resume(self.clock())

    # ------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._traffic_middleware, error_middleware, self._rate_limit_middleware],
                              client_max_size=self.run.network.max_blob_bytes + MAX_JSON_BYTES + 4096)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/run", self.run_info)
        r.add_post("/join", self.join)
        r.add_get("/state", self.get_state)
        r.add_get("/view", self.get_view)
        r.add_get("/rounds/{step}", self.get_round)
        r.add_post("/witness", self.witness)
        r.add_get("/ws", self.websocket)
        r.add_post("/heartbeat", self.heartbeat)
        r.add_post("/ready", self.ready)
        r.add_put("/blobs/{sha256}", self.put_blob)
        r.add_get("/blobs/{sha256}", self.get_blob)
        r.add_post("/commit", self.commit)
        r.add_post("/applied", self.applied)
        r.add_post("/hash", self.report_hash)
        r.add_get("/checkpoint", self.checkpoint)
        r.add_get("/checkpoint/files/{path:.+}", self.checkpoint_file)
        r.add_get("/summary", self.get_summary)
        if self.data_dir is not None and self.run.data.source == "coordinator":
            from aftermath.data.server import add_data_routes

            # one client's request is at most one round's sequences at the run's sequence length: nothing larger
            batch, seq_len = self.run.sequences_per_round, self.run.data.seq_len
            add_data_routes(app, self.data_dir, max_sequences=batch, max_seq_len=seq_len,
                            max_tokens=batch * (seq_len + 1))
        from aftermath.dashboard import add_dashboard_routes  # GET / (the page), /api/dashboard, pause/resume

        self.dashboard = add_dashboard_routes(app, self, self.admin_token)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()
        self._view_changed = asyncio.Event()
        self._jobs = asyncio.Queue()
        resume_step = self.resume.step if self.resume else None
        await loop.run_in_executor(self.executor, self.keeper.start, resume_step)
        if self.mirror is not None:  # as the disk store: blobs of an earlier process are not needed
            await loop.run_in_executor(None, self.mirror.clear)
        self.update_bytes = expected_update_bytes(self.codec.plan, self.keeper.replica.rule.update_kind)
        if self.resume is None:  # the initial model is checkpoint "-1": what the first warmup loads
            info = await loop.run_in_executor(self.executor, self.keeper.write_checkpoint, -1, 0)
            self.checks.set_reference(-1, info["weights_sha256"])
            self.metrics.write(event="checkpoint", epoch=-1, step=0, val_loss=info["val_loss"],
                               seconds=round(info["seconds"], 3), weights_sha256=info["weights_sha256"])
        self._tasks = [asyncio.create_task(self._ticker()), asyncio.create_task(self._worker())]

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for ws in list(self._websockets):
            await ws.close()
        self.executor.shutdown(wait=True)
        self.metrics.close()

    # ------------------------------------------------------------------ ticking and events
    def _notify(self) -> None:
        """Something changed: the pollers are woken at the next tick (once, however many changes came)."""
        self._dirty = True

    def _wake(self, changed: asyncio.Event, view: bool) -> None:
        changed.set()
        if view:
            self._view_changed = asyncio.Event()
        else:
            self._changed = asyncio.Event()

    async def _ticker(self) -> None:
        last_version, last_view = -1, -1
        while True:
            try:
                events = self.machine.tick(self.clock())
                for event in events:
                    self._on_event(event)
                if self.machine.version != last_version or self._dirty:
                    last_version, self._dirty = self.machine.version, False
                    self._wake(self._changed, view=False)
                    await self._push_ws()
                if self.view_version != last_view or self.summary is not None:
                    last_view = self.view_version
                    self._wake(self._view_changed, view=True)
            except Exception:  # a bug in an event handler must not stop the run's clock
                log.exception("tick failed")
            await asyncio.sleep(TICK_SECONDS)

    def _on_event(self, event: Event) -> None:
        record = {"kind": event.kind, **event.data}
        self.events.append({"time": time.time(), **record})
        del self.events[:-200]
        if event.kind in ("joined", "dropped", "deferred", "phase", "epoch_ended", "finished"):
            log.info("%s %s", event.kind, event.data)
        elif event.kind in ("screened", "excluded"):
            log.warning("%s %s", event.kind, event.data)
        if event.kind == "screened" and len(self.screened) < MAX_SCREENED:
            self.screened.append(ScreenedResult(step=event.data["step"], client_id=event.data["client_id"],
                                                reason=event.data["reason"]))
        if event.kind == "round_accepted":
            self._distribute(event.data["step"])
            self._jobs.put_nowait(("apply", event.data))
        elif event.kind == "epoch_ended":
            self._jobs.put_nowait(("checkpoint", event.data))
        elif event.kind == "finished":
            self._jobs.put_nowait(("finish", event.data))
        self.metrics.write(event=event.kind, **{k: v for k, v in event.data.items() if k != "accepted"},
                           **({"accepted": [c["client_id"] for c in event.data["accepted"]]}
                              if "accepted" in event.data else {}),
                           # what it sent so far: a round's traffic is the difference to the next round's start
                           **({"bytes_out": self.bytes_out} if event.kind == "round_started" else {}))

    async def _worker(self) -> None:
        """Runs the slow jobs in order, in one thread: apply rounds, write checkpoints, export specs, finish."""
        loop = asyncio.get_running_loop()
        while True:
            kind, data = await self._jobs.get()
            try:
                if kind == "apply":
                    await self._apply_job(loop, data)
                elif kind == "checkpoint":
                    await self._checkpoint_job(loop, data)
                elif kind == "export":
                    await self._export_job(loop, data)
                elif kind == "finish":
                    await self._finish_job()
            except Exception:
                log.exception("job %s failed", kind)
                self.events.append({"time": time.time(), "kind": "error", "job": kind})
                if kind == "checkpoint":  # do not hold the run in Cooldown forever; the old checkpoint stands
                    self.machine.checkpoint_done(data["epoch"], data["step"], self.clock())

    def _screen(self, rnd: Round) -> dict[str, str]:
        """The state machine's screen (aftermath.coordinator.trust): run on the round's payloads, decoded at commit;
        every payload's statistics go to the metrics, where the thresholds were chosen from."""
        started = time.perf_counter()
        submitted = [Submitted(c.client_id, self.prepared[c.blob], c.loss) for c in rnd.commits.values()
                     if c.blob in self.prepared]
        result = self.screen.screen(rnd.step, submitted)
        self.prepared = {sha: p for sha, p in self.prepared.items() if p.step > rnd.step}
        self.metrics.write(event="screen", step=rnd.step, seconds=round(time.perf_counter() - started, 5),
                           flagged=result.flagged, payloads={
                               st.client_id: {"agreement": _rounded(st.agreement), "worst": _rounded(st.worst_agreement),
                                              "worst_param": st.worst_param, "shared": _rounded(st.shared),
                                              "rms": round(st.rms, 6), "loss": rnd.commits[st.client_id].loss}
                               for st in result.stats})
        return result.flagged

    def _distribute(self, step: int) -> None:
        """Decide how step `step`'s accepted set reaches the clients (distribution.py)."""
        rnd = self.machine.round_at(step)
        if rnd is None or rnd.accepted is None:
            return
        net = self.run.network
        pairs = [(c.client_id, c.blob) for c in rnd.accepted]
        dist = distribute(
            self.run.run_id, step, [(c.client_id, c.blob, c.payload_bytes) for c in rnd.accepted], net.data_plane,
            self.update_bytes, net.witnesses, accepted_digest(pairs))
        dist.signature = self.identity.sign(round_message(self.run.run_id, step, dist.accepted_digest, None))
        self.distributions[step] = dist
        for old in [s for s in self.distributions if s < step - KEEP_DISTRIBUTIONS]:
            del self.distributions[old]
        self._assignment_signatures = {k: v for k, v in self._assignment_signatures.items() if k[0] >= step - 1}

    async def _apply_job(self, loop: asyncio.AbstractEventLoop, data: dict[str, Any]) -> None:
        step = data["step"]
        accepted = [AcceptedResult.model_validate(c) for c in data["accepted"]]
        dist = self.distributions.get(step)
        publish = dist is not None and dist.plane == "update"
        started = time.perf_counter()

        def work() -> tuple[int, bytes | None]:
            payloads = []
            for c in accepted:
                payload = self.decoded.pop(c.blob, None)
                if payload is None:
                    payload = self._decode(self.blobs.get(c.blob), step, c.client_id)
                payloads.append(payload)
            blob = self.keeper.apply_round(step, payloads, dist.accepted_digest if publish else None)
            return sum(self.blobs.size(c.blob) for c in accepted), blob

        total, blob = await loop.run_in_executor(self.executor, work)
        self.decoded = {sha: p for sha, p in self.decoded.items() if p.step > step}  # late, rejected commits
        update = None
        if blob is not None:  # the round's update, for every client to download instead of the payloads
            sha = hashlib.sha256(blob).hexdigest()
            self.blobs.put_own(sha, blob)
            self.ledger.uploaded(sha, step)
            url = None
            if self.mirror is not None and await self._mirror_now(sha, blob):  # published once in the bucket
                url = self.mirror.download_url(sha)
            update = UpdateView(blob=sha, bytes=len(blob), url=url)
            dist.update = update
            dist.signature = self.identity.sign(round_message(self.run.run_id, step, dist.accepted_digest, sha))
            self.updates_published += 1
            self._view_bumps += 1  # the clients waiting for it are woken at the next tick
        collected = self.ledger.applied(step, [c.blob for c in accepted] + ([update.blob] if update else []))
        self._unmirror(collected)
        self.metrics.write(event="applied", step=step, accepted=len(accepted), missing=len(data["missing"]),
                           payload_bytes=total, apply_seconds=round(time.perf_counter() - started, 4),
                           plane=dist.plane if dist else "payloads", update_bytes=update.bytes if update else None,
                           losses={c.client_id: c.loss for c in accepted})

    async def _checkpoint_job(self, loop: asyncio.AbstractEventLoop, data: dict[str, Any]) -> None:
        epoch, step = data["epoch"], data["step"]
        specs = list({s.name: s for s in self.sessions.specs.values()}.values())
        info = await loop.run_in_executor(self.executor, self.keeper.write_checkpoint, epoch, step, specs)
        self.checks.set_reference(epoch, info["weights_sha256"])
        self.machine.checkpoint_done(epoch, step, self.clock())
        for cid, report in list(self.machine.hash_reports.get(epoch, {}).items()):  # reports that came early
            self._check_replica(cid, epoch, report.spec, report.weights_sha256)
        save_state(self.run_dir, self._persisted(finished=False))
        self.metrics.write(event="checkpoint", epoch=epoch, step=step, val_loss=info["val_loss"],
                           seconds=round(info["seconds"], 3), weights_sha256=info["weights_sha256"])
        log.info("checkpoint of epoch %d (step %d) written in %.2fs; val loss %s", epoch, step, info["seconds"],
                 {k: round(v, 4) for k, v in info["val_loss"].items()})
        for worse in regressions(self.keeper.val_history):
            if worse.latest_step == step:
                log.warning("%s", worse.message())
                self.metrics.write(event="tier_regressed", epoch=epoch, step=step, spec=worse.name,
                                   val_loss=worse.latest, best_val_loss=worse.best, best_step=worse.best_step)

    async def _export_job(self, loop: asyncio.AbstractEventLoop, spec: TierSpec) -> None:
        """A Mix'n'Match client joined whose spec the current checkpoint lacks: export it there, so its warmup
        can load it (every later checkpoint exports the specs of the clients that joined)."""
        try:
            await loop.run_in_executor(self.executor, self.keeper.export_spec, spec)
        finally:
            self._exporting.discard(spec.name)

    async def _finish_job(self) -> None:
        # Hash reports of the last cooldown are in (or timed out): compare and write the summary.
        self.summary = build_summary(self.run.run_id, self.machine, self.checks, self.keeper.val_history,
                                     rejected=self.rejected, rate_limited=self.limiter.limited,
                                     checkpoint=str(self.run_dir / CHECKPOINT_DIR),
                                     updates_published=self.updates_published,
                                     updates_witnessed=self.updates_witnessed, update_disputes=self.update_disputes,
                                     local_steps=self.run.optimizer.local_steps, screened=self.screened)
        write_json_atomic(self.run_dir / SUMMARY_FILE, self.summary.model_dump(mode="json"))
        save_state(self.run_dir, self._persisted(finished=True))
        self.metrics.write(event="summary", replicas_consistent=self.summary.replicas_consistent,
                           unrecovered=[d.client_id for d in self.summary.unrecovered])
        self._notify()
        await asyncio.sleep(self.linger)  # let clients see Finished
        self.finished.set()

    def _persisted(self, finished: bool) -> dict[str, Any]:
        """state.json: where to resume, the config it ran under, and the history a restart must not forget."""
        reports = [{"client_id": r.client_id, "tier": r.tier, "spec": r.spec, "epoch": r.epoch, "step": r.step,
                    "weights_sha256": r.weights_sha256}
                   for epoch in sorted(self.machine.hash_reports)
                   for r in self.machine.hash_reports[epoch].values()]
        return {"run_id": self.run.run_id, "epoch": self.machine.epoch, "step": self.machine.step,
                "data_position": self.machine.data_position(self.machine.step), "finished": finished,
                "run": self.run.public(), "val_history": self.keeper.val_history,
                "reference_hashes": {str(k): v for k, v in sorted(self.checks.reference.items())},
                "hash_reports": reports, "divergences": [d.model_dump() for d in self.checks.divergences],
                "exclusions": {cid: list(v) for cid, v in sorted(self.machine.exclusions.items())}}

    # ------------------------------------------------------------------ the object store mirror
    def _mirror(self, sha: str, data: bytes) -> None:
        """Upload a validated blob to the bucket in the background; once there, clients are sent to it."""
        if self.mirror is None:
            return

        task = asyncio.create_task(self._mirror_now(sha, data))
        self._mirroring.add(task)
        task.add_done_callback(self._mirroring.discard)

    async def _mirror_now(self, sha: str, data: bytes) -> bool:
        """Upload a blob to the bucket and wait for it; False (and it is served here) when the store refused."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.mirror.put, sha, data)
        except AftermathError as exc:
            log.warning("blob %s is served by the coordinator: the object store refused it (%s)", sha[:12], exc)
            return False
        self.mirrored.add(sha)
        return True

    def _unmirror(self, collected: list[str]) -> None:
        gone = [sha for sha in collected if sha in self.mirrored]
        if not gone:
            return
        self.mirrored.difference_update(gone)

        def delete() -> None:
            for sha in gone:
                try:
                    self.mirror.delete(sha)
                except AftermathError as exc:
                    log.warning("could not delete blob %s from the object store: %s", sha[:12], exc)

        asyncio.get_running_loop().run_in_executor(None, delete)

    # ------------------------------------------------------------------ helpers
    def _client(self, request: web.Request) -> str:
        return self.sessions.authenticate(request.headers.get("Authorization", ""))

    def _check_payload(self, data: bytes, step: int, client_id: str) -> tuple[Payload, Prepared | None]:
        """A commit's payload decoded (validated), and prepared for the round's screen when the run screens."""
        payload = self._decode(data, step, client_id)
        return payload, self.screen.prepare(payload, data) if self.run.trust.screen else None

    def _decode(self, data: bytes, step: int, client_id: str) -> Payload:
        spec = self.sessions.specs[client_id]
        return self.codec.decode(data, self.run.run_id, step, client_id, spec, self.run.network.max_blob_bytes)

    async def _push_ws(self) -> None:
        if not self._websockets:
            return
        data = self.state().model_dump_json()
        for ws in list(self._websockets):
            try:
                await ws.send_str(data)
            except (ConnectionError, RuntimeError):
                self._websockets.discard(ws)

    @web.middleware
    async def _traffic_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Counts the bytes of every answer (blobs are counted where they are served)."""
        response = await handler(request)
        if isinstance(response, web.Response) and response.body is not None:
            self.bytes_out += len(response.body)
        return response

    @web.middleware
    async def _rate_limit_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """One token bucket per client (by its session) or, before it joins, per remote address."""
        if not self.limiter.enabled:
            return await handler(request)
        cid = self.sessions.client_of(request.headers.get("Authorization", ""))
        key = f"client:{cid}" if cid is not None else f"addr:{request.remote}"
        wait = self.limiter.take(key, time.monotonic())
        if wait > 0:
            return web.json_response(
                {"error": f"rate limit: at most {self.run.network.rate_limit:g} requests/s per client (burst "
                          f"{self.run.network.rate_burst}); retry in {wait:.2f}s", "retry_after": round(wait, 3)},
                status=429, headers={"Retry-After": f"{max(wait, 0.01):.2f}"})
        return await handler(request)

    def _check_replica(self, cid: str, epoch: int, spec: str, weights_sha256: str) -> bool | None:
        """Compare a reported replica hash with the coordinator's reference (None: not computed yet). A differing
        replica is told to resynchronise from the checkpoint (it leaves the epoch, its results stop counting)."""
        known = len(self.checks.divergences)
        match = self.checks.check(cid, epoch, spec, weights_sha256)
        if match is False:
            self.machine.diverged(cid, epoch, self.clock())
            if len(self.checks.divergences) > known:
                d = self.checks.divergences[-1]
                self.metrics.write(event="diverged", client_id=cid, epoch=epoch, spec=spec,
                                   reported=d.reported, expected=d.expected)
                log.warning("replica hash of %s at epoch %d differs from the coordinator's: told to resynchronise",
                            cid, epoch)
        return match

    # ------------------------------------------------------------------ routes
    async def openapi(self, request: web.Request) -> web.Response:
        from aftermath.coordinator.openapi import openapi_document

        return web.json_response(openapi_document(self.app, self.run.run_id))

    async def health(self, request: web.Request) -> web.Response:
        return _answer(HealthAnswer(run_id=self.run.run_id, phase=self.machine.phase.value, step=self.machine.step,
                                    epoch=self.machine.epoch))

    def _run_info(self) -> RunInfo:
        return RunInfo(run=self.run.public(), model_config=self.keeper.config.to_dict(),
                       schema_hash=self.keeper.schema_hash, coordinator_key=self.identity.public_hex)

    async def run_info(self, request: web.Request) -> web.Response:
        return _answer(self._run_info())

    async def join(self, request: web.Request) -> web.Response:
        req = await _body(request, JoinRequest)
        if not hmac.compare_digest(req.token.encode(), self.token.encode()):
            raise web.HTTPUnauthorized(text="wrong run token: ask the run's operator for it (--token)")
        if req.schema_hash != self.keeper.schema_hash:
            return _json_error(409, f"schema mismatch: your checkpoint's schema hash is {req.schema_hash[:16]}..., "
                               f"the run's is {self.keeper.schema_hash[:16]}...: this client's model has another "
                               f"architecture; use the run's model (GET /checkpoint)",
                               reason="schema_mismatch", expected=self.keeper.schema_hash)
        if (req.tier is None) == (req.spec is None):
            raise web.HTTPBadRequest(text="give exactly one of tier (a number) and spec (NAME=w0,w1,...)")
        config = self.keeper.config
        if req.tier is not None:
            if req.tier > max_tier(config):
                raise web.HTTPBadRequest(text=f"tier {req.tier} does not exist; this model has tiers 0..{max_tier(config)}")
            spec = tier_spec(config, req.tier)
        else:
            spec = parse_spec(config, req.spec)
            self.codec.plan.check_spec(spec)  # its widths must cut the chunk grid: refused now, not at commit
        members = self.machine.members
        cid = self.sessions.unique_id(req.name, lambda c: c in members and members[c].status != "gone")
        info = ClientInfo(tier=spec.tier, spec=spec.name, device=req.device, memory_bytes=req.memory_bytes,
                          throughput=req.throughput, public_key=req.public_key or "")
        self.machine.join(cid, info, self.clock())
        session = self.sessions.open(cid, spec)
        if spec.tier is None and spec.name not in self._exporting and not self._checkpoint_has(spec.name):
            self._exporting.add(spec.name)
            self._jobs.put_nowait(("export", spec))
        self._notify()
        return _answer(JoinAnswer(**self._run_info().model_dump(by_alias=True), client_id=cid, session=session,
                                  spec=spec.to_json(), status=self.machine.members[cid].status,
                                  view=ClientView.model_validate_json(self.client_view(cid))))

    def _checkpoint_has(self, name: str) -> bool:
        manifest = read_manifest(self.run_dir / CHECKPOINT_DIR / MODEL_DIR)
        return manifest is not None and manifest.entry(name=name) is not None

    async def _long_poll(self, request: web.Request, version: Callable[[], int], view: bool) -> None:
        """With `after=V`, wait (up to `wait` s, at most 30) until `version()` passes V or the run finished."""
        after = request.query.get("after")
        if after is None:
            return
        try:
            after_v = int(after)
            wait = min(float(request.query.get("wait", "10")), 30.0)
        except ValueError:
            raise web.HTTPBadRequest(text="after must be an integer version and wait a number of seconds")
        if not math.isfinite(wait) or wait < 0:
            raise web.HTTPBadRequest(text="wait must be a finite number of seconds >= 0")
        deadline = time.monotonic() + wait
        while version() <= after_v and self.summary is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for((self._view_changed if view else self._changed).wait(), timeout=left)
            except asyncio.TimeoutError:
                break

    async def get_state(self, request: web.Request) -> web.Response:
        await self._long_poll(request, lambda: self.machine.version, view=False)
        return web.Response(body=self._state_body(), content_type="application/json")

    async def get_view(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        await self._long_poll(request, lambda: self.view_version, view=True)
        return web.Response(body=self.client_view(cid), content_type="application/json")

    async def get_round(self, request: web.Request) -> web.Response:
        self._client(request)
        text = request.match_info["step"]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise web.HTTPBadRequest(text=f"step {text[:40]!r} must be a non-negative integer")
        return web.Response(body=self.round_detail(int(text)), content_type="application/json")

    async def witness(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, WitnessRequest)
        dist = self.distributions.get(req.step)
        if dist is None or cid not in dist.witnesses:
            raise Rejected(f"client {cid!r} is not a witness of step {req.step}")
        if dist.update is None or dist.update.blob != req.update:
            raise Rejected(f"step {req.step}'s published update is not {req.update}")
        if cid in dist.attestations:
            return _answer(OkAnswer())
        dist.attestations[cid] = req.agrees
        if req.agrees:
            self.updates_witnessed += 1
        else:
            dispute = {"step": req.step, "witness": cid, "update": req.update}
            self.update_disputes.append(dispute)
            del self.update_disputes[:-100]
            log.warning("witness %s says the published update of step %d does not match the accepted payloads",
                        cid, req.step)
        self.metrics.write(event="witnessed", step=req.step, client_id=cid, agrees=req.agrees, update=req.update)
        return _answer(OkAnswer())

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._websockets.add(ws)
        try:
            await ws.send_str(self.state().model_dump_json())
            async for msg in ws:  # the push is one-way; anything received is ignored
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._websockets.discard(ws)
        return ws

    async def heartbeat(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, HeartbeatRequest)
        self.machine.heartbeat(cid, self.clock(), req.stats)
        return _answer(HeartbeatAnswer(version=self.machine.version))

    async def ready(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, ReadyRequest)
        self.machine.ready(cid, req.epoch, self.clock())
        self._notify()
        return _answer(OkAnswer())

    async def put_blob(self, request: web.Request) -> web.Response:
        self._client(request)
        sha = request.match_info["sha256"]
        if not is_sha256(sha):
            raise web.HTTPBadRequest(text=f"blob id {sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
        data = await request.read()
        created = self.blobs.put(sha, data, self.run.network.max_blob_storage_bytes)
        self.ledger.uploaded(sha, self.machine.step)
        return web.json_response({"sha256": sha, "size": len(data), "created": created},
                                 status=201 if created else 200)

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        self._client(request)
        sha = request.match_info["sha256"]
        if not is_sha256(sha):
            raise web.HTTPBadRequest(text=f"blob id {sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
        if sha in self.mirrored:  # the bucket serves it (the client checks the bytes against the sha256)
            raise web.HTTPTemporaryRedirect(self.mirror.download_url(sha))
        if not self.blobs.has(sha):
            raise web.HTTPNotFound(text=f"no blob {sha}: it was never uploaded or has been collected")
        return web.Response(body=self.blobs.get(sha), content_type="application/octet-stream")

    async def commit(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        if request.content_type == COMMIT_WITH_BLOB:  # the payload in the same request
            try:
                fields, data = unpack_commit(await request.read(), MAX_JSON_BYTES)
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from exc
            if not isinstance(fields, dict):
                raise web.HTTPBadRequest(text="the commit's JSON must be an object")
            req = CommitRequest.model_validate(fields)
            self.blobs.put(req.blob, data, self.run.network.max_blob_storage_bytes)
            self.ledger.uploaded(req.blob, self.machine.step)
        else:
            req = await _body(request, CommitRequest)
            if not self.blobs.has(req.blob):
                raise web.HTTPConflict(text=f"blob {req.blob} has not been uploaded: PUT /blobs/{req.blob} first")
            data = self.blobs.get(req.blob)
        spec = self.sessions.specs[cid]
        # Validate the payload before it can enter an accepted set: a bad payload must never reach a model.
        loop = asyncio.get_running_loop()
        commit = Commit(client_id=cid, step=req.step, blob=req.blob, tier=spec.tier, spec=spec.name,
                        sequences=req.sequences, train_seconds=req.train_seconds, loss=req.loss,
                        overhead_seconds=req.overhead_seconds, payload_bytes=len(data))
        try:
            self._verify_signature(cid, req)
            if len(data) <= INLINE_DECODE_BYTES:  # ~0.1 ms: cheaper here than a hop to a thread and back
                payload, prepared = self._check_payload(data, req.step, cid)
            else:
                payload, prepared = await loop.run_in_executor(None, self._check_payload, data, req.step, cid)
            commit.signature = req.signature or ""
            self.machine.commit(commit, self.clock())
        except AftermathError as exc:  # recorded for the dashboard's events, then answered 4xx as before
            self.rejected += 1
            self.metrics.write(event="rejected", client_id=cid, step=req.step, blob=req.blob, reason=str(exc)[:300])
            raise
        self.decoded[req.blob] = payload
        if prepared is not None:
            self.prepared[req.blob] = prepared
        self._mirror(req.blob, data)
        if req.stats:
            self.machine.heartbeat(cid, self.clock(), req.stats)
        self._notify()
        return _answer(OkAnswer())

    def _verify_signature(self, cid: str, req: CommitRequest) -> None:
        """The commit must be signed by the key bound at join, for the range the coordinator assigned to `cid`."""
        member = self.machine.members.get(cid)
        if member is None or not member.info.public_key:
            raise SignatureError(f"client {cid!r} joined without a public key, and every commit must be signed: "
                                 f"join again with public_key (aftermath.crypto.Signer)")
        if req.signature is None:
            raise SignatureError("the commit carries no signature; sign (run, step, client, blob, range) with the key "
                                 "sent at join")
        rnd = self.machine.round
        if rnd is None or rnd.step != req.step or cid not in rnd.assignments:
            raise Rejected(f"client {cid!r} has no batch assigned in step {req.step}")
        assigned = rnd.assignments[cid]
        verify_commitment(member.info.public_key, req.signature, self.run.run_id, req.step, cid, req.blob,
                          assigned.start, assigned.end)

    async def applied(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, AppliedRequest)
        self.machine.applied(cid, req.step, self.clock())
        self._notify()
        return _answer(OkAnswer())

    async def report_hash(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, HashRequest)
        self.machine.report_hash(cid, req.epoch, req.step, req.weights_sha256, self.clock())
        if req.stats:
            self.machine.heartbeat(cid, self.clock(), req.stats)
        match = self._check_replica(cid, req.epoch, self.sessions.specs[cid].name, req.weights_sha256)
        self._notify()
        return _answer(HashAnswer(match=match, resync=match is False))

    async def checkpoint(self, request: web.Request) -> web.Response:
        info_path = self.run_dir / CHECKPOINT_DIR / INFO_FILE
        if not info_path.is_file():
            raise web.HTTPNotFound(text="no checkpoint has been written yet")
        answer = CheckpointAnswer(info=json.loads(info_path.read_text()), model_dir=MODEL_DIR,
                                  manifest=self.keeper.manifest_json())
        # signed as the client reads it back: the parsed model's JSON form
        answer.signature = self.identity.sign(checkpoint_message(
            self.run.run_id, answer.info.model_dump(mode="json"), answer.manifest))
        return _answer(answer)

    async def checkpoint_file(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        root = (self.run_dir / CHECKPOINT_DIR).resolve()
        parts = rel.split("/")
        if (len(rel) > MAX_PATH_CHARS or any(len(p) > 255 for p in parts)
                or any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\\" in rel
                or any(ord(ch) < 32 or ord(ch) == 127 for ch in rel)):  # NUL would crash the path resolver
            raise web.HTTPBadRequest(text=f"path {rel[:200]!r} must be a plain relative path inside the checkpoint "
                                     f"(at most {MAX_PATH_CHARS} characters, 255 per part)")
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound(text=f"the checkpoint has no file {rel[:200]!r}")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def get_summary(self, request: web.Request) -> web.Response:
        if self.summary is None:
            raise web.HTTPNotFound(text="the run has not finished yet")
        return _answer(self.summary)


# ------------------------------------------------------------------------------------------ running
async def serve(service: CoordinatorService, host: str, port: int, on_ready: Callable[[str], None] | None = None,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve (over TLS with `ssl_context`: aftermath.tls) until the run finishes and the linger time has passed."""
    runner = web.AppRunner(service.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    actual = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    if on_ready is not None:
        on_ready(f"{'https' if ssl_context is not None else 'http'}://{host}:{actual}")
    try:
        await service.finished.wait()
    finally:
        await runner.cleanup()
