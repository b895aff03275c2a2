"""The coordinator with N simulated clients: the protocol without training. How do round time, the coordinator's
CPU and its traffic per round grow with N?

Two measurements:
1. The pure state machine (`RunStateMachine`), driven in this process with an injected clock, N up to thousands:
   per round, N commits + tick + N applied + tick, and one `snapshot()` (the JSON of the dashboard's GET /state;
   its size grows with N). Wall time per round and snapshot bytes.
2. A real coordinator service (`aftermath coordinator`, its own process, on 127.0.0.1) with N lightweight
   asyncio clients in this process (default N = 16, 64, 256, 1024). Each client does what a real client does,
   minus training and applying: join (with an ed25519 public key), long-poll its GET /view, POST /ready,
   POST /commit (signed) with its payload, download what its data plane needs (the round's update blob, or every
   other accepted payload; a witness both) and POST /applied (and /witness).
   Payloads are real DisTrO payloads of one tier of --preset (coefficients computed once, then encoded per client
   and step), because the coordinator validates every payload at commit and applies every round to its universal
   replica (and, data plane "update", publishes the round's update). Measured per round: seconds
   (client-observed, round start to next round start, first round excluded), the coordinator process's CPU
   seconds (psutil) and those of its event-loop thread alone (the control plane: every request; the rest is
   its replica's apply and the large payloads' checks in worker threads), its bytes out (its own counter, in
   its metrics), the largest download of a client (and of a witness), and the client processes' CPU beside it
   (they share the machine's two cores, so the round time includes their work).
Requests go to 127.0.0.1 only; every run is bounded by --timeout seconds.

Run:   .venv/bin/python bench/scale.py --clients 16,64,256,1024 --repeats 2 --out bench/results/scale.json
Quick: .venv/bin/python bench/scale.py --quick --out /tmp/scale.json     (state machine to 256, service N=4)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


# ------------------------------------------------------------------------------------------ the state machine
def bench_state_machine(n: int, rounds: int) -> dict[str, Any]:
    from aftermath.coordinator.state import ClientInfo, Commit, Phase, RunStateMachine
    from aftermath.runconfig import ScheduleSection

    schedule = ScheduleSection(init_min_clients=n, min_clients=1, waiting_for_members_extra_time=0.0,
                               global_batch_size=2 * n, total_steps=rounds + 1, rounds_per_epoch=rounds + 1,
                               heartbeat_timeout=1e6, heartbeat_interval=1.0)
    clock = 0.0
    machine = RunStateMachine(schedule, clock, run_id="scale")
    ids = [f"c{i:05d}" for i in range(n)]
    for cid in ids:
        machine.join(cid, ClientInfo(tier=0, spec="tier0"), clock)
    machine.tick(clock)
    for cid in ids:
        machine.ready(cid, machine.epoch, clock)
    machine.tick(clock)
    assert machine.phase == Phase.ROUND_TRAIN, machine.phase
    per_round, snapshot_s, snapshot_bytes = [], [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        rnd = machine.round
        for cid, batch in rnd.assignments.items():
            clock += 1e-4
            machine.commit(Commit(client_id=cid, step=rnd.step, blob="0" * 64, tier=0, spec="tier0",
                                  sequences=batch.size, train_seconds=0.0, loss=1.0), clock)
        machine.tick(clock)
        # overlapped rounds: the next step is open (or, at the epoch's end, the witness) as the set is applied
        for cid in ids:
            clock += 1e-4
            machine.applied(cid, rnd.step, clock)
        machine.tick(clock)
        per_round.append(time.perf_counter() - start)
        s0 = time.perf_counter()
        text = json.dumps(machine.snapshot(clock))
        snapshot_s.append(time.perf_counter() - s0)
        snapshot_bytes = len(text)
    return {"clients": n, "rounds": rounds, "round_ms": 1e3 * statistics.median(per_round),
            "snapshot_ms": 1e3 * statistics.median(snapshot_s), "snapshot_bytes": snapshot_bytes}


# ------------------------------------------------------------------------------------------ the real service
class PayloadMaker:
    """Real payloads of one spec: coefficients computed once, encoded per (client, step) (cheap)."""

    def __init__(self, run: Any, tier: int) -> None:
        import torch

        from aftermath.round.replica import optimizer_config
        from aftermath.model import param_shapes, preset_config, tier_spec
        from aftermath.optim import DistroOptimizer

        cfg = preset_config(run.model.preset, **run.model.overrides)
        self.spec = tier_spec(cfg, tier)
        self.tier = tier
        self.run_id = run.run_id
        shapes = param_shapes(cfg, self.spec)
        params = {n: torch.zeros(s) for n, s in shapes.items()}
        opt_config = optimizer_config(run)
        self.opt = DistroOptimizer(opt_config, cfg, self.spec, params)
        gen = torch.Generator().manual_seed(0)
        grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}
        self.coeffs = self.opt.compress(grads, 0)

    def blob(self, client_id: str, step: int) -> bytes:
        from aftermath.optim import Payload, encode_payload

        payload = Payload(kind="distro", run_id=self.run_id, step=step, client_id=client_id, spec=self.spec,
                          params=dict(self.coeffs))
        return encode_payload(payload, self.opt.plan, self.opt.config.wire())


@dataclass
class SimFaults:
    """What a simulated client's network and life do to it (--faults): every request is delayed, some are lost
    (and retried), some clients die at a step and never come back, some join late."""

    latency_s: float = 0.01
    jitter_s: float = 0.03
    loss: float = 0.05
    die_at_step: int | None = None
    join_at_step: int | None = None  # it joins once the run reached this step (then waits for the next epoch)
    dropped: int = 0


class LightClient:
    """A client without training: its protocol calls, its real payload, and the real downloads of its data plane
    (the update blob, or every other accepted payload), counted per step."""

    def __init__(self, index: int, url: str, token: str, maker: PayloadMaker, schema: str,
                 round_seen: dict[int, float], faults: SimFaults | None = None,
                 heartbeat_s: float = 0.0, update_from_bucket: bool = False) -> None:
        self.name = f"sim-{index}"
        self.faults = faults
        self.rng = random.Random(index)
        self.heartbeat_s = heartbeat_s  # 0: no heartbeats (silent clients are never dropped in the plain bench)
        self.update_from_bucket = update_from_bucket
        self.url, self.token, self.maker, self.schema = url, token, maker, schema
        self.round_seen = round_seen
        self.session_token = ""
        self.client_id = ""
        self.requests = 0
        self.bytes_down: dict[int, int] = {}  # step -> blob bytes downloaded to apply it
        self.own: set[str] = set()
        self.witnessed: set[int] = set()  # steps it was a witness of (it downloaded the payloads too)

    async def call(self, http: Any, method: str, path: str, body: Any = None, data: bytes | None = None,
                   params: dict | None = None, raw: bool = False, headers: dict | None = None) -> Any:
        headers = dict(headers or {})
        if self.session_token:
            headers["Authorization"] = f"Bearer {self.session_token}"
        self.requests += 1
        f = self.faults
        if f is not None:  # a slow, lossy network: a lost request is sent again after a pause
            await asyncio.sleep(f.latency_s + f.jitter_s * self.rng.random())
            while self.rng.random() < f.loss:
                f.dropped += 1
                await asyncio.sleep(0.1 + f.jitter_s * self.rng.random())
        async with http.request(method, self.url + path, json=body, data=data, params=params,
                                headers=headers) as resp:
            payload = await resp.read() if raw else await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {str(payload)[:200]}")
            return payload

    async def apply(self, http: Any, rnd: dict) -> bool:
        """Download what applying `rnd` needs, say applied; False while its update is being computed."""
        result, step = rnd["result"], rnd["step"]
        blobs = []
        if result["plane"] == "update":
            if result["update"] is None:
                return False
            if self.update_from_bucket and not result["witness"]:  # a bucket serves it: only its size is counted
                self.bytes_down[step] = self.bytes_down.get(step, 0) + result["update"]["bytes"]
            else:
                blobs.append(result["update"]["blob"])
        if result["plane"] == "payloads" or result["witness"]:
            detail = await self.call(http, "GET", f"/rounds/{step}")
            blobs += [c["blob"] for c in detail["accepted"] if c["blob"] not in self.own]
        for sha in blobs:
            data = await self.call(http, "GET", f"/blobs/{sha}", raw=True)
            self.bytes_down[step] = self.bytes_down.get(step, 0) + len(data)
        if result["witness"]:
            self.witnessed.add(step)
            await self.call(http, "POST", "/witness", {"step": step, "update": result["update"]["blob"],
                                                       "agrees": True})
        await self.call(http, "POST", "/applied", {"step": step})
        return True

    async def run(self, http: Any) -> None:
        from aftermath.crypto import Signer

        signer = Signer()  # commits are signed (ed25519), as a real client signs them
        if self.faults is not None and self.faults.join_at_step is not None:
            while (await self.call(http, "GET", "/health"))["step"] < self.faults.join_at_step:
                await asyncio.sleep(0.5)
        answer = await self.call(http, "POST", "/join", {
            "token": self.token, "name": self.name, "tier": self.maker.tier, "device": "cpu", "memory_bytes": 0,
            "throughput": 1.0, "schema_hash": self.schema, "public_key": signer.public_hex})
        self.session_token, self.client_id = answer["session"], answer["client_id"]
        beat = asyncio.create_task(self.heartbeats(http)) if self.heartbeat_s else None
        try:
            await self.rounds(http, signer)
        finally:
            if beat is not None:
                beat.cancel()

    async def heartbeats(self, http: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.call(http, "POST", "/heartbeat", {})

    async def rounds(self, http: Any, signer: Any) -> None:
        from aftermath.round.protocol import COMMIT_WITH_BLOB, CommitRequest, pack_commit

        version, committed, applied, ready = -1, -1, -1, -1
        while True:
            view = await self.call(http, "GET", "/view", params={"after": str(version), "wait": "10"})
            version = view["version"]
            phase, rnd, previous = view["phase"], view["round"], view["previous_round"]
            if phase == "Finished":
                return
            if view["me"]["status"] != "member":
                continue  # it waits for the next epoch
            behind = view["catch_up"]
            if behind is not None and behind["step"] == applied + 1 and await self.apply(http, behind):
                applied = behind["step"]  # it fell behind: what it lacks first
            if previous is not None and previous["result"] is not None and previous["step"] == applied + 1:
                # overlapped rounds: the step before the one in training is applied now
                if await self.apply(http, previous):
                    applied = previous["step"]
            if self.faults is not None and self.faults.die_at_step is not None \
                    and view["step"] >= self.faults.die_at_step:
                return  # it dies: no goodbye, its heartbeats stop
            if phase == "Warmup" and ready < view["epoch"] and view["me"]["status"] == "member":
                await self.call(http, "POST", "/ready", {"epoch": view["epoch"]})
                ready = view["epoch"]
                applied = committed = view["step"] - 1  # as a real client that loaded the epoch's checkpoint
            elif phase == "RoundTrain" and rnd is not None and rnd["step"] > committed and applied >= rnd["step"] - 2:
                # as a real client: it trains step s once its weights are at s - 1 at least (overlapped rounds)
                step = rnd["step"]
                self.round_seen.setdefault(step, time.perf_counter())
                if rnd["assignment"] is not None:
                    data = self.maker.blob(self.client_id, step)
                    sha = hashlib.sha256(data).hexdigest()
                    self.own.add(sha)
                    start, end = rnd["assignment"]
                    signature = signer.sign_commitment(self.maker.run_id, step, self.client_id, sha, start, end)
                    # a simulated 1000 sequences/s: the batch split leaves real clients in the run small shares
                    commit = CommitRequest(step=step, blob=sha, sequences=end - start,
                                           train_seconds=(end - start) / 1000, loss=1.0, signature=signature)
                    await self.call(http, "POST", "/commit", data=pack_commit(commit, data),
                                    headers={"Content-Type": COMMIT_WITH_BLOB})
                committed = step
            elif phase == "RoundWitness" and rnd is not None and rnd["result"] is not None \
                    and rnd["step"] > applied:
                if await self.apply(http, rnd):
                    applied = rnd["step"]


def sim_faults(n: int, rounds: int, seed: int = 0) -> list[SimFaults]:
    """Every simulated client's faults: latency and loss for all; one in 16 dies at a random step, one in 16
    joins at step 1 (and waits for the next epoch)."""
    rng = random.Random(seed)
    faults = [SimFaults() for _ in range(n)]
    chosen = rng.sample(range(n), 2 * max(1, n // 16))
    for i in chosen[:len(chosen) // 2]:
        faults[i].die_at_step = rng.randint(1, max(1, rounds - 2))
    for i in chosen[len(chosen) // 2:]:
        faults[i].join_at_step = 1
    return faults


async def drive_clients(url: str, token: str, n: int, maker: PayloadMaker, coordinator_pid: int,
                        timeout: float, faults: list[SimFaults] | None = None, real_tiers: tuple[int, ...] = (),
                        work_dir: Path | None = None, heartbeat_s: float = 0.0,
                        update_from_bucket: bool = False) -> dict[str, Any]:
    """N simulated clients (with `faults`, one each) and, beside them, real training clients of `real_tiers`."""
    import aiohttp
    import psutil

    coord = psutil.Process(coordinator_pid)
    me = psutil.Process()
    round_seen: dict[int, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        info = await (await http.get(url + "/run")).json()
        clients = [LightClient(i, url, token, maker, info["schema_hash"], round_seen,
                               faults[i] if faults else None, heartbeat_s, update_from_bucket) for i in range(n)]
        cpu_marks: dict[int, tuple[float, float, float]] = {}

        async def mark() -> None:  # CPU of the coordinator (all; its event loop) and of this process, per round
            while True:
                for step in list(round_seen):
                    if step not in cpu_marks:
                        c, m = coord.cpu_times(), me.cpu_times()
                        # Linux: the main thread's id is the process id; it runs the event loop (the control plane)
                        loop_cpu = next((t.user_time + t.system_time for t in coord.threads() if t.id == coord.pid),
                                        0.0)
                        cpu_marks[step] = (c.user + c.system, m.user + m.system, loop_cpu)
                await asyncio.sleep(0.005)

        marker = asyncio.create_task(mark())
        tasks = [asyncio.create_task(c.run(http)) for c in clients]
        real = [asyncio.create_task(real_client(url, token, tier, i, work_dir)) for i, tier in enumerate(real_tiers)]
        done, pending = await asyncio.wait(tasks + real, timeout=timeout)
        marker.cancel()
        for t in pending:
            t.cancel()
        errors = [repr(t.exception()) for t in done if t.exception() is not None]
    steps = sorted(round_seen)
    measured = [s for s in steps[1:] if s + 1 in round_seen and s in cpu_marks and s + 1 in cpu_marks]
    round_s = [round_seen[s + 1] - round_seen[s] for s in measured]
    coord_cpu = [cpu_marks[s + 1][0] - cpu_marks[s][0] for s in measured]
    client_cpu = [cpu_marks[s + 1][1] - cpu_marks[s][1] for s in measured]
    loop_cpu = [cpu_marks[s + 1][2] - cpu_marks[s][2] for s in measured]
    downloads = [max(c.bytes_down.get(s, 0) for c in clients if s not in c.witnessed) for s in measured]
    witness_downloads = [max((c.bytes_down.get(s, 0) for c in clients if s in c.witnessed), default=0)
                         for s in measured]
    return {"clients": n, "finished": not pending and not errors, "errors": errors[:3],
            "rounds_seen": len(steps), "rounds_measured": len(measured),
            "round_s": statistics.median(round_s) if round_s else None,
            "coordinator_cpu_s_per_round": statistics.median(coord_cpu) if coord_cpu else None,
            "control_plane_cpu_s_per_round": statistics.median(loop_cpu) if loop_cpu else None,
            "clients_cpu_s_per_round": statistics.median(client_cpu) if client_cpu else None,
            "requests": sum(c.requests for c in clients),
            "max_client_bytes_down_per_round": statistics.median(downloads) if downloads else None,
            "witness_bytes_down_per_round": statistics.median(witness_downloads) if witness_downloads else None,
            "measured_steps": measured, "payload_bytes": len(maker.blob("sim-0", 0)),
            "sim_dropped_requests": sum(c.faults.dropped for c in clients if c.faults),
            "real_clients": [t.result() for t in real if t.done() and t.exception() is None]}


async def real_client(url: str, token: str, tier: int, index: int, work_dir: Path) -> dict[str, Any]:
    """A real training client (its own replica, verified by the epoch's hash check) on a lossy, slow network."""
    from aftermath.client.loop import ClientOptions, TrainingClient
    from aftermath.faults import FaultConfig

    options = ClientOptions(coordinator=url, token=token, tier=tier, name=f"real-{index}", threads=1,
                            work_dir=work_dir, metrics_path=work_dir / f"real-{index}.jsonl",
                            faults=FaultConfig(latency_ms=10, jitter_ms=20, loss=0.05, seed=index))
    return await TrainingClient(options).run_async()


def coordinator_traffic(metrics: Path, steps: list[int]) -> dict[str, Any]:
    """From the coordinator's metrics: its bytes out while each step trained (from the step's round start to the
    next's), the data planes of the rounds, the size of a round's update."""
    started, applied = {}, {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "round_started":
            started[record["step"]] = record["bytes_out"]
        elif record.get("event") == "applied":
            applied[record["step"]] = record
    out = [started[s + 1] - started[s] for s in steps if s in started and s + 1 in started]
    planes = sorted({applied[s]["plane"] for s in steps if s in applied})
    updates = [applied[s]["update_bytes"] for s in steps if applied.get(s, {}).get("update_bytes")]
    return {"coordinator_bytes_out_per_round": statistics.median(out) if out else None, "planes": planes,
            "update_bytes": updates[0] if updates else None}


def bench_service(n: int, rounds: int, timeout: float, tier: int, preset: str, data_plane: str,
                  faults: bool = False, update_from_bucket: bool = False) -> dict[str, Any]:
    """One run of the real coordinator with N simulated clients; with `faults`, the reliability scenario: faults
    on every simulated client (sim_faults) and two real training clients (tiers 0 and 1) on a lossy network,
    several epochs, the summary's replica check included."""
    import secrets

    from aftermath.runconfig import parse_run_config
    from aftermath.testnet import TestnetOptions, free_port, testnet_config_text

    with tempfile.TemporaryDirectory(prefix="aftermath-scale-") as tmp:
        run_dir = Path(tmp)
        # one epoch of `rounds` rounds; silent clients are never dropped; no hash reports wait at the end
        schedule = {"schedule.rounds_per_epoch": rounds, "schedule.heartbeat_timeout": 600.0,
                    "schedule.heartbeat_interval": 5.0, "schedule.cooldown_time": 0.5,
                    "schedule.max_round_train_time": timeout, "schedule.round_witness_time": timeout,
                    "schedule.warmup_time": timeout, "model.export_tiers": [0]}
        if faults:  # epochs of 3 rounds (replica hashes compared at each end); the dead are dropped in 4 s
            schedule = {"schedule.rounds_per_epoch": 3, "schedule.heartbeat_timeout": 4.0,
                        "schedule.heartbeat_interval": 1.0, "schedule.cooldown_time": 5.0,
                        "schedule.max_round_train_time": 20.0, "schedule.round_witness_time": 20.0,
                        "schedule.warmup_time": 60.0, "model.export_tiers": [0, 1], "optimizer.lr": 1e-3,
                        # the first epoch starts without the late joiners
                        "schedule.init_min_clients": n - sum(f.join_at_step is not None for f in sim_faults(n - 2,
                                                                                                           rounds))}
        text = testnet_config_text(TestnetOptions(clients=n, steps=rounds, extra_overrides={
            **schedule, "schedule.global_batch_size": 2 * n, "data.val_sequences": 8, "model.preset": preset,
            "network.data_plane": data_plane,
            # every simulated client joins from 127.0.0.1: one address's limit before join would throttle them all
            "network.rate_limit": 0,
            # simulated clients send copies of one payload: the screen would rightly exclude them all (its cost at
            # scale is measured on distinct payloads by bench/stress.py --screen-cost)
            "trust.screen": False}))
        config = run_dir / "run.toml"
        config.write_text(text)
        import tomllib

        run = parse_run_config(tomllib.loads(text))
        maker = PayloadMaker(run, tier)
        token = secrets.token_urlsafe(12)
        port = free_port()
        ready_file = run_dir / "ready.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(run_dir / "coordinator.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "aftermath.cli", "coordinator", "--config", str(config),
                                 "--run-dir", str(run_dir / "run"), f"--token={token}", "--port", str(port),
                                 "--ready-file", str(ready_file)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not ready_file.is_file():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the coordinator did not start: " + (run_dir / "coordinator.log").read_text()[-2000:])
                time.sleep(0.1)
            url = f"http://127.0.0.1:{port}"
            if faults:
                result = asyncio.run(drive_clients(url, token, n - 2, maker, proc.pid, timeout,
                                                   sim_faults(n - 2, rounds), (0, 1), run_dir / "clients", 1.0))
                result["clients"] = n
                proc.wait(timeout=60)  # the run's end: its summary is written
                result["summary"] = json.loads((run_dir / "run" / "summary.json").read_text())
            else:
                result = asyncio.run(drive_clients(url, token, n, maker, proc.pid, timeout,
                                                   update_from_bucket=update_from_bucket))
            result.update(coordinator_traffic(run_dir / "run" / "metrics" / "coordinator.jsonl",
                                              result.pop("measured_steps")), preset=preset, data_plane=data_plane)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
    return result


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per N over repeated runs: the medians, and each measure's min and median over the runs."""
    keys = ("round_s", "coordinator_cpu_s_per_round", "control_plane_cpu_s_per_round", "clients_cpu_s_per_round",
            "coordinator_bytes_out_per_round",
            "max_client_bytes_down_per_round", "witness_bytes_down_per_round")
    row = {"clients": runs[0]["clients"], "runs": runs, "finished": all(r["finished"] for r in runs),
           "errors": [e for r in runs for e in r["errors"]], "rounds_seen": min(r["rounds_seen"] for r in runs),
           "requests": statistics.median(r["requests"] for r in runs),
           "planes": sorted({p for r in runs for p in r["planes"]}), "update_bytes": runs[0]["update_bytes"],
           "payload_bytes": runs[0]["payload_bytes"], "rounds_measured": sum(r["rounds_measured"] for r in runs)}
    for key in keys:
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
        row[f"{key}_min"] = min(values) if values else None
    return row


def fault_row(run: dict[str, Any]) -> list[Any]:
    summary = run["summary"]
    real = run["real_clients"]
    return [run["clients"], summary["steps"], "yes" if summary["replicas_consistent"] else "NO",
            summary["hashes_checked"], len(summary["divergences"]),
            sum(c["status"] == "gone" for c in summary["clients"]), run["sim_dropped_requests"],
            " / ".join(str(sum(c.get(f"faults_{k}", 0) for c in real)) for k in ("latency", "dropped"))]


def _pair(row: dict[str, Any], key: str, scale: float, fmt: str, both: bool = True) -> str | None:
    if row[key] is None:
        return None
    median = fmt.format(row[key] * scale)
    return f"{fmt.format(row[f'{key}_min'] * scale)} / {median}" if both else median


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="state machine up to 256, service with 4 clients")
    ap.add_argument("--machine-clients", default=None, help="N for the state machine (default 4,...,4096)")
    ap.add_argument("--service-clients", "--clients", default=None,
                    help="N for the real service (default 16,64,256,1024)")
    ap.add_argument("--repeats", type=int, default=1, help="service runs per N (min and median are reported)")
    ap.add_argument("--preset", default="small", help="model preset of the payloads and the coordinator's replica "
                    "(default small)")
    ap.add_argument("--data-plane", default="auto", choices=("auto", "payloads", "update"),
                    help="network.data_plane of the run (default auto)")
    ap.add_argument("--update-from-bucket", action="store_true", help=(
        "the clients (witnesses apart) do not download a round's update blob from the coordinator, as when an "
        "S3-compatible bucket serves it ([storage] backend s3); its bytes still count as theirs"))
    ap.add_argument("--faults", action="store_true", help=(
        "the reliability scenario: every simulated client on a slow, lossy network (10-40 ms, 5%% of requests "
        "lost), 1 in 16 dying mid-run and 1 in 16 joining late, beside 2 real training clients (tiers 0 and 1) "
        "whose replicas the epochs' hash checks compare; epochs of 3 rounds"))
    ap.add_argument("--rounds", type=int, default=None, help="rounds per service run (default 6; 3 quick)")
    ap.add_argument("--tier", type=int, default=3, help="tier of the simulated clients' payloads (default 3)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds one service run may take")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    torch.set_num_threads(1)
    console = Console(width=200)
    t0 = time.perf_counter()
    machine_ns = [int(x) for x in (args.machine_clients or
                                   ("4,64,256" if args.quick else "4,16,64,256,1024,4096")).split(",")]
    service_ns = [int(x) for x in (args.service_clients or ("4" if args.quick else "16,64,256,1024")).split(",")]
    rounds = args.rounds or (3 if args.quick else 6)

    machine_rows = []
    for n in machine_ns:
        machine_rows.append(bench_state_machine(n, 5 if n >= 1024 else 10))
        console.log(f"state machine, {n} clients: {machine_rows[-1]['round_ms']:.2f} ms per round")
    service_rows = []
    for n in service_ns:
        runs = []
        for _ in range(args.repeats):
            runs.append(bench_service(n, rounds, args.timeout, args.tier, args.preset, args.data_plane,
                                      args.faults, args.update_from_bucket))
            console.log(f"service, {n} clients: {runs[-1]}")
        service_rows.append(summarise_runs(runs))

    m_cols = ["clients", "state machine ms per round", "snapshot ms", "snapshot KB (each /state answer)"]
    m_rows = [[r["clients"], f"{r['round_ms']:.2f}", f"{r['snapshot_ms']:.2f}", f"{r['snapshot_bytes'] / 1e3:.1f}"]
              for r in machine_rows]
    s_cols = ["clients", "plane", "s per round (min / median)", "coordinator CPU s per round (min / median)",
              "of it, event loop (control plane)", "coordinator CPU ms per client", "coordinator MB out per round",
              "max client MB down per round",
              "witness MB down per round",
              "client processes CPU s per round", "finished"]
    s_rows = [[r["clients"], "+".join(r["planes"]), _pair(r, "round_s", 1, "{:.2f}"),
               _pair(r, "coordinator_cpu_s_per_round", 1, "{:.2f}"),
               _pair(r, "control_plane_cpu_s_per_round", 1, "{:.2f}"),
               None if r["coordinator_cpu_s_per_round"] is None
               else f"{1e3 * r['coordinator_cpu_s_per_round'] / r['clients']:.2f}",
               _pair(r, "coordinator_bytes_out_per_round", 1e-6, "{:.2f}", both=False),
               _pair(r, "max_client_bytes_down_per_round", 1e-6, "{:.3f}", both=False),
               _pair(r, "witness_bytes_down_per_round", 1e-6, "{:.3f}", both=False),
               _pair(r, "clients_cpu_s_per_round", 1, "{:.2f}", both=False),
               "yes" if r["finished"] else "no"] for r in service_rows]
    _common.print_table("Pure state machine (one process, injected clock)", m_cols, m_rows, console)
    _common.print_table(f"Real coordinator on 127.0.0.1, N asyncio clients, no training (tier-{args.tier} "
                        f"{args.preset} payloads, data plane {args.data_plane})", s_cols, s_rows, console)
    f_cols = ["clients", "steps", "replicas consistent", "hashes checked", "divergences", "members dropped",
              "simulated requests lost", "real clients' requests delayed / lost"]
    f_rows = [fault_row(run) for row in service_rows for run in row["runs"] if "summary" in run]
    if f_rows:
        _common.print_table("Faults: real training clients beside the simulated ones", f_cols, f_rows, console)
    path = _common.write_json(args.out, {
        "benchmark": "scale", "quick": args.quick, "complete": True, "rounds": rounds, "tier": args.tier,
        "preset": args.preset, "data_plane": args.data_plane, "repeats": args.repeats,
        "update_from_bucket": args.update_from_bucket,
        "load_average": os.getloadavg(),
        "state_machine": machine_rows, "service": service_rows, "wall_seconds": round(time.perf_counter() - t0, 1),
        "markdown": {"state_machine": _common.markdown_table(m_cols, m_rows),
                     "service": _common.markdown_table(s_cols, s_rows),
                     **({"faults": _common.markdown_table(f_cols, f_rows)} if f_rows else {})},
    })
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
