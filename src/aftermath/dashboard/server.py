"""The dashboard's routes on the coordinator's aiohttp app.

    GET  /                     the page (aftermath/web/dashboard.html; its script and style from /web/NAME)
    GET  /api/dashboard        one JSON snapshot of everything the page shows (the page polls it every second)
    POST /api/pause            pause the run before its next round       (Authorization: Bearer ADMIN_TOKEN)
    POST /api/resume           resume it                                 (Authorization: Bearer ADMIN_TOKEN)

The snapshot joins the state machine's live view (phase, round, members) with the run's history, which is
rebuilt from the coordinator's own metrics file (RUN_DIR/metrics/coordinator.jsonl) by reading only what was
appended since the last request. Checkpoint details and text samples are computed once per checkpoint, in a
thread, and cached.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from aftermath.dashboard.history import DenseBytes, MetricsTail, RunHistory
from aftermath.model import MatFormerConfig, TierSpec
from aftermath.round.protocol import StateSnapshot
from aftermath.runconfig import RunConfig

log = logging.getLogger("aftermath.dashboard")

STATIC_FILES = {"dashboard.html": "text/html", "dashboard.js": "application/javascript",
                "dashboard.css": "text/css"}
EVENTS_SHOWN = 60


def static_file(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    return (resources.files("aftermath") / "web" / name).read_bytes()


def checkpoint_view(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The checkpoint on disk: epoch, step, and per tier its directory, files (size, sha256) and total bytes."""
    from aftermath.checkpoint.manifest import read_manifest

    info_path = checkpoint_dir / "checkpoint.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    model_dir = checkpoint_dir / "model"
    manifest = read_manifest(model_dir)
    tiers = []
    for entry in (manifest.tiers if manifest else []):
        files = []
        for rel in list(entry.files) + [f for f in manifest.common_files if entry.tier == 0]:
            path = (model_dir / rel)
            files.append({"path": str(Path(path).resolve().relative_to(checkpoint_dir.resolve())),
                          "bytes": path.stat().st_size if path.is_file() else None,
                          "sha256": manifest.sha256.get(rel)})
        tiers.append({"name": entry.name, "tier": entry.tier, "intermediate_size": entry.intermediate_size,
                      "files": files, "bytes": sum(f["bytes"] or 0 for f in files),
                      "weights_sha256": (info.get("weights_sha256") or {}).get(entry.name),
                      "val_loss": (info.get("val_loss") or {}).get(entry.name)})
    return {"epoch": info.get("epoch"), "step": info.get("step"), "schema_hash": info.get("schema_hash"),
            "tiers": tiers}


class RunView(Protocol):
    """What the dashboard reads of a running coordinator (CoordinatorService provides it)."""

    run: RunConfig
    run_dir: Path
    model_config: MatFormerConfig

    def state(self) -> StateSnapshot: ...

    def spec_of(self, client_id: str) -> TierSpec | None: ...

    def now(self) -> float: ...

    def pause(self) -> None: ...

    def resume_run(self) -> None: ...


class Dashboard:
    """Builds the page's snapshot from a running coordinator's typed view."""

    def __init__(self, view: RunView, admin_token: str = "") -> None:
        self.view = view
        self.admin_token = admin_token
        self.tail = MetricsTail(Path(view.run_dir) / "metrics" / "coordinator.jsonl")
        self.history = RunHistory(dense_bytes_of=DenseBytes(view.model_config, view.spec_of))
        self._checkpoint: dict[str, Any] | None = None  # the cached view of the checkpoint on disk
        self._checkpoint_key: Any = None
        self._checkpoint_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ pieces
    def _peers(self, snap: StateSnapshot, now: float) -> list[dict[str, Any]]:
        beat = self.view.run.schedule.heartbeat_interval
        committed = set(snap.round.committed) if snap.round else set()
        peers = []
        for m in snap.members:
            ago = max(0.0, now - m.last_seen)
            stats = m.stats
            if m.excluded:
                state = "excluded"
            elif m.status == "gone":
                state = "gone"
            elif m.status == "pending":
                state = "joining"
            elif ago > 3 * beat:
                state = "late"
            elif snap.phase in ("WaitingForMembers", "Warmup") and m.ready_epoch != snap.epoch:
                state = "warmup"
            elif snap.phase == "RoundTrain" and m.id in committed:
                state = "trained"
            else:
                state = "training"
            peers.append({"id": m.id, "tier": m.tier, "spec": m.spec, "device": m.device,
                          "memory_bytes": m.memory_bytes, "state": state, "loss": stats.get("loss"),
                          "tokens_per_s": stats.get("tokens_per_s"), "bytes_up": stats.get("bytes_up", 0),
                          "bytes_down": stats.get("bytes_down", 0), "peak_memory": stats.get("peak_memory"),
                          "rounds": m.rounds_contributed, "last_seen_s": round(ago, 1)})
        return peers

    def _round(self, snap: StateSnapshot) -> dict[str, Any]:
        run = self.view.run
        rnd = snap.round
        assigned = sorted(rnd.assignments) if rnd else []
        committed = set(rnd.committed) if rnd else set()
        tokens_per_step = run.sequences_per_round * run.data.seq_len  # a step of the dashboard is a round
        per_round = self.history.seconds_per_round()
        left = max(0, snap.total_steps - snap.step)
        return {"phase": snap.phase, "paused": snap.paused, "finished": snap.finished,
                "seconds_left": snap.seconds_left, "step": snap.step, "total_steps": snap.total_steps,
                "epoch": snap.epoch, "rounds_per_epoch": snap.rounds_per_epoch,
                "round_step": rnd.step if rnd else None, "assigned": assigned, "results_in": sorted(committed),
                "missing": [c for c in assigned if c not in committed],
                "tokens_per_step": tokens_per_step, "tokens_total": snap.step * tokens_per_step,
                "seconds_per_round": None if per_round is None else round(per_round, 2),
                "eta_s": None if per_round is None else round(left * per_round, 1)}

    async def _refresh_checkpoint(self, snap: StateSnapshot) -> None:
        """Recompute the checkpoint view and samples when a new checkpoint is on disk (in a thread)."""
        key = (snap.checkpoint.epoch, snap.checkpoint.step)
        if key == self._checkpoint_key or (self._checkpoint_task and not self._checkpoint_task.done()):
            return
        ckpt_dir = Path(self.view.run_dir) / "checkpoint"

        def work() -> dict[str, Any] | None:
            from aftermath.dashboard.samples import sample_texts

            view = checkpoint_view(ckpt_dir)
            if view is not None:
                view["samples"] = sample_texts(ckpt_dir / "model", [t["tier"] for t in view["tiers"]
                                                                    if t["tier"] is not None])
            return view

        async def run() -> None:
            try:
                view = await asyncio.get_running_loop().run_in_executor(None, work)
            except Exception as exc:  # the checkpoint is being swapped: try again on a later request
                log.info("checkpoint view not ready: %s", exc)
                return
            if view is not None:
                self._checkpoint, self._checkpoint_key = view, key

        self._checkpoint_task = asyncio.create_task(run())

    # ------------------------------------------------------------------ the snapshot
    async def snapshot(self) -> dict[str, Any]:
        self.history.add_all(self.tail.read())
        snap = self.view.state()
        await self._refresh_checkpoint(snap)
        h = self.history
        return {
            "time": time.time(), "run_id": snap.run_id, "version": snap.version,
            "round": self._round(snap), "peers": self._peers(snap, self.view.now()),
            "loss": {"train": h.train_series(), "val": h.val_series()}, "regressions": h.regressions(),
            "bandwidth": h.bandwidth[-200:],
            "checkpoints": h.checkpoints, "checkpoint": self._checkpoint,
            "events": h.events[-EVENTS_SHOWN:][::-1],
            "admin": {"enabled": bool(self.admin_token)},
        }

    # ------------------------------------------------------------------ routes
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=static_file("dashboard.html"), content_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(text=f"no dashboard file {name[:80]!r}")
        return web.Response(body=static_file(name), content_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    async def api_snapshot(self, request: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(), headers={"Cache-Control": "no-store"})

    def _check_admin(self, request: web.Request) -> None:
        if not self.admin_token:
            raise web.HTTPForbidden(text="pause and resume are disabled: start the coordinator with --admin-token")
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            raise web.HTTPUnauthorized(text="wrong or missing admin token: send 'Authorization: Bearer ADMIN_TOKEN' "
                                       "(the token the coordinator printed at start)")

    async def pause(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        self.view.pause()
        return web.json_response({"ok": True, "paused": True})

    async def resume(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        self.view.resume_run()
        return web.json_response({"ok": True, "paused": False})


def add_dashboard_routes(app: web.Application, view: RunView, admin_token: str = "") -> Dashboard:
    """Mount the dashboard on the coordinator's app. An empty admin token disables pause and resume."""
    dash = Dashboard(view, admin_token)
    r = app.router
    r.add_get("/", dash.page)
    r.add_get("/dashboard", dash.page)
    r.add_get("/web/{name}", dash.asset)
    r.add_get("/api/dashboard", dash.api_snapshot)
    r.add_post("/api/pause", dash.pause)
    r.add_post("/api/resume", dash.resume)
    return dash
