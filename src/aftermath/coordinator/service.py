"""The coordinator's aiohttp service: a thin shell around the pure state machine and the model keeper.

Routes (JSON in and out, except blob and checkpoint file bodies; errors are `{"error": "..."}` with a 4xx):

    GET  /health                      liveness, phase and step
    GET  /run                         the run config (without the token), model config and schema hash
    POST /join                        {token, name, tier | spec, device, memory_bytes, throughput, schema_hash}
                                      -> {client_id, session, spec, run, model_config, ...}
    GET  /state[?after=V&wait=S]      the run's state; with `after`, waits up to S s for a version > V
    GET  /ws                          WebSocket: the state, pushed on every change
    POST /heartbeat                   {stats}                                    (session)
    POST /ready                       {epoch}: the member holds the current model (session)
    PUT  /blobs/{sha256}              payload bytes, hash checked, size capped   (session)
    GET  /blobs/{sha256}              payload bytes                              (session)
    POST /commit                      {step, blob, sequences, train_seconds, loss, stats} (session)
    POST /applied                     {step}: the member applied the round's accepted set (session)
    POST /hash                        {epoch, step, weights_sha256}              (session)
    GET  /checkpoint                  the current checkpoint: epoch, step, manifest
    GET  /checkpoint/files/{path}     one file of it
    GET  /summary                     summary.json once the run has finished
    GET  /data/...                    token batches (aftermath.data.server), when data.source = "coordinator"
    GET  /openapi.json                an OpenAPI 3 description of every route (aftermath.coordinator.openapi)

Calls after join carry `Authorization: Bearer SESSION`. Trust: the join sends the client's ed25519 public key,
bound to its session; a commit must carry the client's signature of (run, step, client, blob, ASSIGNED range)
(aftermath.crypto). Every client (or address, before it joins) has a token-bucket rate limit (429 + Retry-After);
JSON bodies and blobs are size-capped; blob storage is bounded and old rounds' blobs are collected. Everything that changes the run goes through the
state machine (`RunStateMachine`); slow work (applying rounds, checkpoints) runs in one worker thread, in order.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aftermath.coordinator.blobs import BlobStore, BlobTooLarge, StorageFull, is_sha256
from aftermath.coordinator.keeper import CHECKPOINT_DIR, INFO_FILE, ModelKeeper
from aftermath.coordinator.persist import load_state, save_state, write_json_atomic
from aftermath.coordinator.ratelimit import RateLimiter
from aftermath.coordinator.state import ClientInfo, Commit, Event, Phase, Rejected, RunStateMachine
from aftermath.crypto import SignatureError, verify_commitment
from aftermath.errors import AftermathError, ConfigError
from aftermath.metrics import MetricsWriter
from aftermath.model import TierSpec, parse_spec, tier_spec
from aftermath.model.geometry import max_tier
from aftermath.runconfig import RunConfig

log = logging.getLogger("aftermath.coordinator")

SUMMARY_FILE = "summary.json"
MAX_JSON_BYTES = 256 * 1024
STAT_KEYS_MAX = 32


# ------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_stats(stats: dict[str, Any]) -> dict[str, Any]:
    if len(stats) > STAT_KEYS_MAX:
        raise ValueError(f"at most {STAT_KEYS_MAX} stats, got {len(stats)}")
    for key, value in stats.items():
        if len(key) > 64 or not isinstance(value, (int, float, str, type(None))) or isinstance(value, bool):
            raise ValueError(f"stat {key[:64]!r} must be a number, a short string or null")
        if isinstance(value, str) and len(value) > 256:
            raise ValueError(f"stat {key!r} is longer than 256 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"stat {key!r} is not finite")
    return stats


class JoinRequest(_Request):
    token: str = Field(max_length=256)
    name: str = Field("", max_length=48, pattern=r"^[A-Za-z0-9_.-]*$")
    tier: int | None = Field(None, ge=0, le=64)
    spec: str | None = Field(None, max_length=1024)
    device: str = Field("cpu", max_length=64)
    memory_bytes: int = Field(0, ge=0)
    throughput: float = Field(1.0, gt=0, le=1e9)
    schema_hash: str = Field(max_length=128)
    public_key: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                   description="the client's ed25519 public key (hex); commits must be signed with it")


class StatsRequest(_Request):
    stats: dict[str, Any] = Field(default_factory=dict)
    _v = field_validator("stats")(_check_stats)


class ReadyRequest(_Request):
    epoch: int = Field(ge=0)


class CommitRequest(_Request):
    step: int = Field(ge=0)
    blob: str = Field(pattern=r"^[0-9a-f]{64}$")
    sequences: int = Field(gt=0)
    train_seconds: float = Field(ge=0, le=1e6)
    loss: float
    signature: str | None = Field(None, pattern=r"^[0-9a-f]{128}$",
                                  description="ed25519 signature of the commitment (aftermath.crypto)")
    stats: dict[str, Any] = Field(default_factory=dict)
    _v = field_validator("stats")(_check_stats)

    @field_validator("loss")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("loss must be finite")
        return value


class AppliedRequest(_Request):
    step: int = Field(ge=0)


class HashRequest(_Request):
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    stats: dict[str, Any] = Field(default_factory=dict)
    _v = field_validator("stats")(_check_stats)


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure becomes a JSON error with a 4xx; an unexpected exception is logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return _json_error(exc.status, exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason)
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
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text=f"the body must be a JSON object, got {type(data).__name__}")
    return model.model_validate(data)


# ------------------------------------------------------------------------------------------ service
class CoordinatorService:
    def __init__(self, run: RunConfig, run_dir: str | Path, *, token: str, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, linger: float = 3.0, admin_token: str = "") -> None:
        if not token:
            raise ConfigError("the coordinator needs a run token (--token or network.token)")
        self.run = run
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.clock = clock
        self.linger = linger
        self.data_dir = data_dir
        previous = load_state(self.run_dir)
        if previous is not None and previous.get("finished"):
            raise ConfigError(f"{self.run_dir} holds a finished run (step {previous['step']}); choose another "
                              f"--run-dir or move it away")
        if previous is not None and previous.get("run_id") != run.run_id:
            raise ConfigError(f"{self.run_dir} holds run {previous.get('run_id')!r}, not {run.run_id!r}")
        self.keeper = ModelKeeper(run, self.run_dir, data_dir)
        repaired = self.keeper.recover()
        if repaired:
            log.warning("%s: %s", self.run_dir, repaired)
        info = self.keeper.checkpoint_info()
        if previous is not None and info.get("step", -1) > previous["step"] and info.get("epoch", -1) > previous["epoch"]:
            # killed after the checkpoint swap but before state.json: the complete newer checkpoint wins
            log.warning("%s: the checkpoint holds epoch %s step %s, newer than state.json: resuming from it",
                        self.run_dir, info["epoch"], info["step"])
            previous = {**previous, "epoch": info["epoch"], "step": info["step"]}
        elif previous is None and info.get("epoch", -1) >= 0 and info.get("run_id") == run.run_id:
            # killed after the first epoch's checkpoint but before state.json existed
            previous = {"run_id": run.run_id, "epoch": info["epoch"], "step": info["step"], "finished": False}
        self.resume = previous
        step = previous["step"] if previous else 0
        epoch = previous["epoch"] + 1 if previous else 0
        self.machine = RunStateMachine(run.schedule, clock(), run_id=run.run_id, seed=run.seed, step=step, epoch=epoch)
        self.blobs = BlobStore(self.run_dir / "blobs", run.network.max_blob_bytes)
        self.blobs.clear()  # blobs of an earlier process belong to rounds that are redone or done
        self.blob_steps: dict[str, int] = {}  # sha -> the step that was training when it was uploaded
        self.limiter = RateLimiter(run.network.rate_limit, run.network.rate_burst)
        self.divergences: list[dict[str, Any]] = []  # replicas found to differ and told to resynchronise
        self.rejected = 0  # commits refused (bad payload, bad signature, not assigned ...)
        self.metrics = MetricsWriter(self.run_dir / "metrics" / "coordinator.jsonl")
        self.sessions: dict[str, str] = {}  # session token -> client id
        self.specs: dict[str, TierSpec] = {}  # client id -> spec
        self.names_used: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []  # recent events, for watchers (bounded)
        self.mismatches: list[dict[str, Any]] = []
        self.round_blobs: dict[int, list[str]] = {}
        self.decoded: dict[str, Any] = {}  # blob sha -> payload decoded (validated) at commit, until applied
        self.finished: asyncio.Event | None = None  # created on the loop in on_startup
        self.summary: dict[str, Any] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keeper")
        self._jobs: asyncio.Queue | None = None
        self._changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._websockets: set[web.WebSocketResponse] = set()
        self.admin_token = admin_token  # pauses and resumes the run from the dashboard; empty = disabled
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware, self._rate_limit_middleware],
                              client_max_size=self.run.network.max_blob_bytes + 4096)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/run", self.run_info)
        r.add_post("/join", self.join)
        r.add_get("/state", self.state)
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

            add_data_routes(app, self.data_dir)
        from aftermath.dashboard import add_dashboard_routes  # GET / (the page), /api/dashboard, pause/resume

        self.dashboard = add_dashboard_routes(app, self, self.admin_token)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()
        self._jobs = asyncio.Queue()
        resume_step = self.resume["step"] if self.resume else None
        await loop.run_in_executor(self.executor, self.keeper.start, resume_step)
        if self.resume is None:  # the initial model is checkpoint "-1": what the first warmup loads
            info = await loop.run_in_executor(self.executor, self.keeper.write_checkpoint, -1, 0)
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
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _ticker(self) -> None:
        last_version = -1
        while True:
            try:
                events = self.machine.tick(self.clock())
                for event in events:
                    self._on_event(event)
                if self.machine.version != last_version:
                    last_version = self.machine.version
                    self._notify()
                    await self._push_ws()
            except Exception:  # a bug in an event handler must not stop the run's clock
                log.exception("tick failed")
            await asyncio.sleep(0.02)

    def _on_event(self, event: Event) -> None:
        record = {"kind": event.kind, **event.data}
        self.events.append({"time": time.time(), **record})
        del self.events[:-200]
        if event.kind in ("joined", "dropped", "deferred", "phase", "epoch_ended", "finished"):
            log.info("%s %s", event.kind, event.data)
        if event.kind == "round_accepted":
            self._jobs.put_nowait(("apply", event.data))
        elif event.kind == "epoch_ended":
            self._jobs.put_nowait(("checkpoint", event.data))
        elif event.kind == "finished":
            self._jobs.put_nowait(("finish", event.data))
        self.metrics.write(event=event.kind, **{k: v for k, v in event.data.items() if k != "accepted"},
                           **({"accepted": [c["client_id"] for c in event.data["accepted"]]}
                              if "accepted" in event.data else {}))

    async def _worker(self) -> None:
        """Runs the slow jobs in order, in one thread: apply rounds, write checkpoints, finish."""
        loop = asyncio.get_running_loop()
        while True:
            kind, data = await self._jobs.get()
            try:
                if kind == "apply":
                    await self._apply_job(loop, data)
                elif kind == "checkpoint":
                    await self._checkpoint_job(loop, data)
                elif kind == "finish":
                    await self._finish_job(loop)
            except Exception:
                log.exception("job %s failed", kind)
                self.events.append({"time": time.time(), "kind": "error", "job": kind})
                if kind == "checkpoint":  # do not hold the run in Cooldown forever; the old checkpoint stands
                    self.machine.checkpoint_done(data["epoch"], data["step"], self.clock())

    async def _apply_job(self, loop: asyncio.AbstractEventLoop, data: dict[str, Any]) -> None:
        step = data["step"]
        accepted = data["accepted"]
        started = time.perf_counter()

        def work() -> int:
            payloads = []
            total = 0
            for c in accepted:
                total += self.blobs.size(c["blob"])
                payload = self.decoded.pop(c["blob"], None)
                if payload is None:
                    payload = self.keeper.decode(self.blobs.get(c["blob"]), step, c["client_id"],
                                                 self.specs[c["client_id"]])
                payloads.append(payload)
            self.keeper.apply_round(step, payloads)
            return total

        total = await loop.run_in_executor(self.executor, work)
        self.decoded = {sha: p for sha, p in self.decoded.items() if p.step > step}  # late, rejected commits
        self.round_blobs[step] = [c["blob"] for c in accepted]
        for old in [s for s in self.round_blobs if s < step - 2]:  # every member has moved past these
            del self.round_blobs[old]
        # every blob uploaded before step - 2 (accepted or not: rejected, late, junk) is collected
        keep = {sha for shas in self.round_blobs.values() for sha in shas}
        for sha, uploaded in list(self.blob_steps.items()):
            if uploaded < step - 2 and sha not in keep:
                self.blobs.delete(sha)
                del self.blob_steps[sha]
        self.metrics.write(event="applied", step=step, accepted=len(accepted), missing=len(data["missing"]),
                           payload_bytes=total, apply_seconds=round(time.perf_counter() - started, 4),
                           losses={c["client_id"]: c["loss"] for c in accepted})

    async def _checkpoint_job(self, loop: asyncio.AbstractEventLoop, data: dict[str, Any]) -> None:
        epoch, step = data["epoch"], data["step"]
        specs = list({s.name: s for s in self.specs.values()}.values())
        info = await loop.run_in_executor(self.executor, self.keeper.write_checkpoint, epoch, step, specs)
        self.machine.checkpoint_done(epoch, step, self.clock())
        for cid, report in list(self.machine.hash_reports.get(epoch, {}).items()):  # reports that came early
            self._check_replica(cid, epoch, report.spec, report.weights_sha256)
        save_state(self.run_dir, self._persisted(finished=False))
        self.metrics.write(event="checkpoint", epoch=epoch, step=step, val_loss=info["val_loss"],
                           seconds=round(info["seconds"], 3), weights_sha256=info["weights_sha256"])
        log.info("checkpoint of epoch %d (step %d) written in %.2fs; val loss %s", epoch, step, info["seconds"],
                 {k: round(v, 4) for k, v in info["val_loss"].items()})

    async def _finish_job(self, loop: asyncio.AbstractEventLoop) -> None:
        # Hash reports of the last cooldown are in (or timed out): compare and write the summary.
        self.summary = self._build_summary()
        write_json_atomic(self.run_dir / SUMMARY_FILE, self.summary)
        save_state(self.run_dir, self._persisted(finished=True))
        self.metrics.write(event="summary", replicas_consistent=self.summary["replicas_consistent"])
        self._notify()
        await asyncio.sleep(self.linger)  # let clients see Finished
        self.finished.set()

    # ------------------------------------------------------------------ consistency and summary
    def consistency(self) -> tuple[bool, list[dict[str, Any]]]:
        """Compare every hash report with the coordinator's replica of the same region (and so with each other)."""
        problems = []
        checked = 0
        for epoch, reports in sorted(self.machine.hash_reports.items()):
            reference = self.keeper.reference_hashes.get(epoch, {})
            for cid, report in sorted(reports.items()):
                expected = reference.get(report.spec)
                if expected is None:
                    continue
                if any(d["client_id"] == cid and d["epoch"] == epoch for d in self.divergences):
                    continue  # detected, and the client resynchronised from the checkpoint: in `divergences`
                checked += 1
                if expected != report.weights_sha256:
                    problems.append({"epoch": epoch, "client_id": cid, "spec": report.spec,
                                     "reported": report.weights_sha256, "expected": expected})
        return (checked > 0 and not problems), problems

    def _build_summary(self) -> dict[str, Any]:
        consistent, problems = self.consistency()
        clients = []
        for cid, member in sorted(self.machine.members.items()):
            last = None
            for epoch in sorted(self.machine.hash_reports, reverse=True):
                if cid in self.machine.hash_reports[epoch]:
                    last = self.machine.hash_reports[epoch][cid].weights_sha256
                    break
            stats = member.stats
            clients.append({"id": cid, "tier": member.info.tier, "spec": member.info.spec,
                            "status": member.status, "final_loss": stats.get("loss"), "weights_sha256": last,
                            "bytes_up": stats.get("bytes_up", 0), "bytes_down": stats.get("bytes_down", 0),
                            "rounds_contributed": member.rounds_contributed,
                            "tokens": stats.get("tokens", 0), "tokens_per_s": stats.get("tokens_per_s")})
        final_val = self.keeper.val_history[-1]["val_loss"] if self.keeper.val_history else {}
        first_val = self.keeper.val_history[0]["val_loss"] if self.keeper.val_history else {}
        tiers = {}
        for name, loss in final_val.items():
            spec_tier = name[4:] if name.startswith("tier") and name[4:].isdigit() else name
            tiers[spec_tier] = {"val_loss": loss, "initial_val_loss": first_val.get(name)}
        return {"run_id": self.run.run_id, "steps": self.machine.step, "epochs": self.machine.epoch + 1,
                "replicas_consistent": consistent, "mismatches": problems, "divergences": self.divergences,
                "clients": clients, "tiers": tiers, "rejected": self.rejected,
                "rate_limited": self.limiter.limited,
                "val_history": self.keeper.val_history,
                "checkpoint": str(self.run_dir / CHECKPOINT_DIR)}

    def _persisted(self, finished: bool) -> dict[str, Any]:
        return {"run_id": self.run.run_id, "epoch": self.machine.epoch, "step": self.machine.step,
                "data_position": self.machine.step * self.run.schedule.global_batch_size,
                "finished": finished, "val_history": self.keeper.val_history,
                "reference_hashes": {str(k): v for k, v in self.keeper.reference_hashes.items()}}

    # ------------------------------------------------------------------ helpers
    def _client(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise web.HTTPUnauthorized(text="missing 'Authorization: Bearer SESSION' (the session token /join gave)")
        cid = self.sessions.get(header[7:].strip())
        if cid is None:
            raise web.HTTPUnauthorized(text="unknown session token: join the run again")
        return cid

    def snapshot(self) -> dict[str, Any]:
        snap = self.machine.snapshot(self.clock())
        snap["finished"] = self.summary is not None
        return snap

    async def _push_ws(self) -> None:
        if not self._websockets:
            return
        data = json.dumps(self.snapshot())
        for ws in list(self._websockets):
            try:
                await ws.send_str(data)
            except (ConnectionError, RuntimeError):
                self._websockets.discard(ws)

    @web.middleware
    async def _rate_limit_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """One token bucket per client (by its session) or, before it joins, per remote address."""
        if not self.limiter.enabled:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        cid = self.sessions.get(header[7:].strip()) if header.startswith("Bearer ") else None
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
        expected = self.keeper.reference_hashes.get(epoch, {}).get(spec)
        if expected is None:
            return None
        if expected != weights_sha256:
            if not any(d["client_id"] == cid and d["epoch"] == epoch for d in self.divergences):
                self.mismatches.append({"epoch": epoch, "client_id": cid})
                self.divergences.append({"epoch": epoch, "client_id": cid, "spec": spec,
                                         "reported": weights_sha256, "expected": expected})
                self.machine.diverged(cid, epoch, self.clock())
                self.metrics.write(event="diverged", client_id=cid, epoch=epoch, spec=spec,
                                   reported=weights_sha256, expected=expected)
                log.warning("replica hash of %s at epoch %d differs from the coordinator's: told to resynchronise",
                            cid, epoch)
            return False
        return True

    # ------------------------------------------------------------------ routes
    async def openapi(self, request: web.Request) -> web.Response:
        from aftermath.coordinator.openapi import openapi_document

        return web.json_response(openapi_document(self.app, self.run.run_id))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "run_id": self.run.run_id, "phase": self.machine.phase.value,
                                  "step": self.machine.step, "epoch": self.machine.epoch})

    async def run_info(self, request: web.Request) -> web.Response:
        return web.json_response({"run": self.run.public(), "model_config": self.keeper.config.to_dict(),
                                  "schema_hash": self.keeper.schema_hash})

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
        base = req.name or "client"
        cid = base
        while cid in self.machine.members and self.machine.members[cid].status != "gone":
            self.names_used[base] = self.names_used.get(base, 1) + 1
            cid = f"{base}-{self.names_used[base]}"
        info = ClientInfo(tier=spec.tier, spec=spec.name, device=req.device, memory_bytes=req.memory_bytes,
                          throughput=req.throughput, public_key=req.public_key or "")
        self.machine.join(cid, info, self.clock())
        session = secrets.token_urlsafe(24)
        for old in [s for s, c in self.sessions.items() if c == cid]:
            del self.sessions[old]
        self.sessions[session] = cid
        self.specs[cid] = spec
        self._notify()
        return web.json_response({
            "client_id": cid, "session": session, "spec": spec.to_json(), "run": self.run.public(),
            "model_config": config.to_dict(), "schema_hash": self.keeper.schema_hash,
            "status": self.machine.members[cid].status, "state": self.snapshot()})

    async def state(self, request: web.Request) -> web.Response:
        after = request.query.get("after")
        if after is not None:
            try:
                after_v = int(after)
                wait = min(float(request.query.get("wait", "10")), 30.0)
            except ValueError:
                raise web.HTTPBadRequest(text="after must be an integer version and wait a number of seconds")
            if not math.isfinite(wait) or wait < 0:
                raise web.HTTPBadRequest(text="wait must be a finite number of seconds >= 0")
            deadline = time.monotonic() + wait
            while self.machine.version <= after_v and self.summary is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
                except asyncio.TimeoutError:
                    break
        return web.json_response(self.snapshot())

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._websockets.add(ws)
        try:
            await ws.send_str(json.dumps(self.snapshot()))
            async for msg in ws:  # the push is one-way; anything received is ignored
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._websockets.discard(ws)
        return ws

    async def heartbeat(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, StatsRequest)
        self.machine.heartbeat(cid, self.clock(), req.stats)
        return web.json_response({"ok": True, "version": self.machine.version})

    async def ready(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, ReadyRequest)
        self.machine.ready(cid, req.epoch, self.clock())
        self._notify()
        return web.json_response({"ok": True})

    async def put_blob(self, request: web.Request) -> web.Response:
        self._client(request)
        sha = request.match_info["sha256"]
        if not is_sha256(sha):
            raise web.HTTPBadRequest(text=f"blob id {sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
        data = await request.read()
        created = self.blobs.put(sha, data, self.run.network.max_blob_storage_bytes)
        self.blob_steps.setdefault(sha, self.machine.step)
        return web.json_response({"sha256": sha, "size": len(data), "created": created},
                                 status=201 if created else 200)

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        self._client(request)
        sha = request.match_info["sha256"]
        if not is_sha256(sha):
            raise web.HTTPBadRequest(text=f"blob id {sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
        if not self.blobs.has(sha):
            raise web.HTTPNotFound(text=f"no blob {sha}: it was never uploaded or has been collected")
        return web.FileResponse(self.blobs.path(sha), headers={"Content-Type": "application/octet-stream"})

    async def commit(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, CommitRequest)
        if not self.blobs.has(req.blob):
            raise web.HTTPConflict(text=f"blob {req.blob} has not been uploaded: PUT /blobs/{req.blob} first")
        spec = self.specs[cid]
        # Validate the payload before it can enter an accepted set: a bad payload must never reach a model.
        data = self.blobs.get(req.blob)
        loop = asyncio.get_running_loop()
        commit = Commit(client_id=cid, step=req.step, blob=req.blob, tier=spec.tier, spec=spec.name,
                        sequences=req.sequences, train_seconds=req.train_seconds, loss=req.loss)
        try:
            self._verify_signature(cid, req)
            payload = await loop.run_in_executor(None, self.keeper.decode, data, req.step, cid, spec)
            commit.signature = req.signature or ""
            self.machine.commit(commit, self.clock())
        except AftermathError as exc:  # recorded for the dashboard's events, then answered 4xx as before
            self.rejected += 1
            self.metrics.write(event="rejected", client_id=cid, step=req.step, blob=req.blob, reason=str(exc)[:300])
            raise
        self.decoded[req.blob] = payload
        if req.stats:
            self.machine.heartbeat(cid, self.clock(), req.stats)
        self._notify()
        return web.json_response({"ok": True})

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
        return web.json_response({"ok": True})

    async def report_hash(self, request: web.Request) -> web.Response:
        cid = self._client(request)
        req = await _body(request, HashRequest)
        self.machine.report_hash(cid, req.epoch, req.step, req.weights_sha256, self.clock())
        if req.stats:
            self.machine.heartbeat(cid, self.clock(), req.stats)
        match = self._check_replica(cid, req.epoch, self.specs[cid].name, req.weights_sha256)
        self._notify()
        return web.json_response({"ok": True, "match": match, "resync": match is False})

    async def checkpoint(self, request: web.Request) -> web.Response:
        info_path = self.run_dir / CHECKPOINT_DIR / INFO_FILE
        if not info_path.is_file():
            raise web.HTTPNotFound(text="no checkpoint has been written yet")
        info = json.loads(info_path.read_text())
        return web.json_response({"info": info, "model_dir": "model", "manifest": self.keeper.manifest_json()})

    async def checkpoint_file(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        root = (self.run_dir / CHECKPOINT_DIR).resolve()
        parts = rel.split("/")
        if (any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\\" in rel
                or any(ord(ch) < 32 or ord(ch) == 127 for ch in rel)):  # NUL would crash the path resolver
            raise web.HTTPBadRequest(text=f"path {rel[:200]!r} must be a plain relative path inside the checkpoint")
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound(text=f"the checkpoint has no file {rel[:200]!r}")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def get_summary(self, request: web.Request) -> web.Response:
        if self.summary is None:
            raise web.HTTPNotFound(text="the run has not finished yet")
        return web.json_response(self.summary)


# ------------------------------------------------------------------------------------------ running
async def serve(service: CoordinatorService, host: str, port: int,
                on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until the run finishes (and the linger time has passed)."""
    runner = web.AppRunner(service.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    if on_ready is not None:
        on_ready(f"http://{host}:{actual}")
    try:
        await service.finished.wait()
    finally:
        await runner.cleanup()
