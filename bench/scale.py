"""The coordinator with N simulated clients: the protocol without training. How do round control latency and the
coordinator's CPU per round grow with N?

Two measurements:
1. The pure state machine (`RunStateMachine`), driven in this process with an injected clock, N up to thousands:
   per round, N commits + tick + N applied + tick, and one `snapshot()` (the JSON every /state poll serves;
   its size grows with N). Wall time per round and snapshot bytes.
2. A real coordinator service (`aftermath coordinator`, its own process, on 127.0.0.1) with N lightweight
   asyncio clients in this process, N in (4, 16, 64, 256). Each client does what a real client does, minus
   training: join (with an ed25519 public key), long-poll GET /state, POST /ready, PUT its payload blob + POST /commit
   (signed), POST /applied.
   Payloads are real DisTrO payloads of the smallest tier of the tiny model (coefficients computed once, then
   encoded per client and step), because the coordinator validates every payload at commit and applies every
   round to its universal replica. Measured: seconds per round (client-observed, round start to next round
   start, first round excluded) and the coordinator process's CPU seconds per round (psutil), with the client
   processes' CPU beside it (they share the machine's cores, so the round time includes their work).
Requests go to 127.0.0.1 only; every run is bounded by --timeout seconds.

Run:   .venv/bin/python bench/scale.py --out bench/results/scale.json
Quick: .venv/bin/python bench/scale.py --quick --out /tmp/scale.json     (state machine to 256, service N=4)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


class LightClient:
    def __init__(self, index: int, url: str, token: str, maker: PayloadMaker, schema: str,
                 round_seen: dict[int, float]) -> None:
        self.name = f"sim-{index}"
        self.url, self.token, self.maker, self.schema = url, token, maker, schema
        self.round_seen = round_seen
        self.session_token = ""
        self.client_id = ""
        self.requests = 0

    async def call(self, http: Any, method: str, path: str, body: Any = None, data: bytes | None = None,
                   params: dict | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.session_token}"} if self.session_token else {}
        self.requests += 1
        async with http.request(method, self.url + path, json=body, data=data, params=params,
                                headers=headers) as resp:
            payload = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {payload}")
            return payload

    async def run(self, http: Any) -> None:
        from aftermath.crypto import Signer
        from aftermath.round.protocol import CommitRequest

        signer = Signer()  # commits are signed (ed25519), as a real client signs them
        answer = await self.call(http, "POST", "/join", {
            "token": self.token, "name": self.name, "tier": self.maker.tier, "device": "cpu", "memory_bytes": 0,
            "throughput": 1.0, "schema_hash": self.schema, "public_key": signer.public_hex})
        self.session_token, self.client_id = answer["session"], answer["client_id"]
        version, committed, applied, ready = -1, -1, -1, -1
        while True:
            snap = await self.call(http, "GET", "/state", params={"after": str(version), "wait": "10"})
            version = snap["version"]
            phase, rnd, previous = snap["phase"], snap["round"], snap.get("previous_round")
            if phase == "Finished":
                return
            if previous is not None and previous["accepted"] is not None and previous["step"] > applied:
                # overlapped rounds: the step before the one in training is applied now
                await self.call(http, "POST", "/applied", {"step": previous["step"]})
                applied = previous["step"]
            if phase == "Warmup" and ready < snap["epoch"]:
                me = next((m for m in snap["members"] if m["id"] == self.client_id), None)
                if me is not None and me["status"] == "member":
                    await self.call(http, "POST", "/ready", {"epoch": snap["epoch"]})
                    ready = snap["epoch"]
            elif phase == "RoundTrain" and rnd is not None and rnd["step"] > committed:
                step = rnd["step"]
                self.round_seen.setdefault(step, time.perf_counter())
                assignment = rnd["assignments"].get(self.client_id)
                if assignment is not None:
                    data = self.maker.blob(self.client_id, step)
                    sha = hashlib.sha256(data).hexdigest()
                    await self.call(http, "PUT", f"/blobs/{sha}", data=data)
                    start, end = assignment
                    signature = signer.sign_commitment(self.maker.run_id, step, self.client_id, sha, start, end)
                    commit = CommitRequest(step=step, blob=sha, sequences=end - start, train_seconds=0.0, loss=1.0,
                                           signature=signature)
                    await self.call(http, "POST", "/commit", commit.model_dump())
                committed = step
            elif phase == "RoundWitness" and rnd is not None and rnd["accepted"] is not None \
                    and rnd["step"] > applied:
                # a real client downloads the accepted blobs here; the coordinator serves files (not measured)
                await self.call(http, "POST", "/applied", {"step": rnd["step"]})
                applied = rnd["step"]


async def drive_clients(url: str, token: str, n: int, maker: PayloadMaker, coordinator_pid: int,
                        timeout: float) -> dict[str, Any]:
    import aiohttp
    import psutil

    coord = psutil.Process(coordinator_pid)
    me = psutil.Process()
    round_seen: dict[int, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        info = await (await http.get(url + "/run")).json()
        clients = [LightClient(i, url, token, maker, info["schema_hash"], round_seen) for i in range(n)]
        cpu_marks: dict[int, tuple[float, float]] = {}

        async def mark() -> None:  # CPU of the coordinator and of this process at each round start
            while True:
                for step in list(round_seen):
                    if step not in cpu_marks:
                        c, m = coord.cpu_times(), me.cpu_times()
                        cpu_marks[step] = (c.user + c.system, m.user + m.system)
                await asyncio.sleep(0.005)

        marker = asyncio.create_task(mark())
        tasks = [asyncio.create_task(c.run(http)) for c in clients]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        marker.cancel()
        for t in pending:
            t.cancel()
        errors = [repr(t.exception()) for t in done if t.exception() is not None]
    steps = sorted(round_seen)
    measured = [s for s in steps[1:] if s + 1 in round_seen and s in cpu_marks and s + 1 in cpu_marks]
    round_s = [round_seen[s + 1] - round_seen[s] for s in measured]
    coord_cpu = [cpu_marks[s + 1][0] - cpu_marks[s][0] for s in measured]
    client_cpu = [cpu_marks[s + 1][1] - cpu_marks[s][1] for s in measured]
    return {"clients": n, "finished": not pending and not errors, "errors": errors[:3],
            "rounds_seen": len(steps), "rounds_measured": len(measured),
            "round_s": statistics.median(round_s) if round_s else None,
            "coordinator_cpu_s_per_round": statistics.median(coord_cpu) if coord_cpu else None,
            "clients_cpu_s_per_round": statistics.median(client_cpu) if client_cpu else None,
            "requests": sum(c.requests for c in clients),
            "payload_bytes": len(maker.blob("sim-0", 0))}


def bench_service(n: int, rounds: int, timeout: float, tier: int) -> dict[str, Any]:
    import secrets

    from aftermath.runconfig import parse_run_config
    from aftermath.testnet import TestnetOptions, free_port, testnet_config_text

    with tempfile.TemporaryDirectory(prefix="aftermath-scale-") as tmp:
        run_dir = Path(tmp)
        # one epoch of `rounds` rounds; silent clients are never dropped; no hash reports wait at the end
        text = testnet_config_text(TestnetOptions(clients=n, steps=rounds, extra_overrides={
            "schedule.global_batch_size": 2 * n, "schedule.rounds_per_epoch": rounds,
            "schedule.heartbeat_timeout": 600.0, "schedule.heartbeat_interval": 5.0,
            "schedule.cooldown_time": 0.5, "schedule.max_round_train_time": timeout,
            "schedule.round_witness_time": timeout, "schedule.warmup_time": timeout,
            "data.val_sequences": 8, "model.export_tiers": [0]}))
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
            result = asyncio.run(drive_clients(url, token, n, maker, proc.pid, timeout))
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="state machine up to 256, service with 4 clients")
    ap.add_argument("--machine-clients", default=None, help="N for the state machine (default 4,...,4096)")
    ap.add_argument("--service-clients", default=None, help="N for the real service (default 4,16,64,256)")
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
    service_ns = [int(x) for x in (args.service_clients or ("4" if args.quick else "4,16,64,256")).split(",")]
    rounds = args.rounds or (3 if args.quick else 6)

    machine_rows = []
    for n in machine_ns:
        machine_rows.append(bench_state_machine(n, 5 if n >= 1024 else 10))
        console.log(f"state machine, {n} clients: {machine_rows[-1]['round_ms']:.2f} ms per round")
    service_rows = []
    for n in service_ns:
        r = bench_service(n, rounds, args.timeout, args.tier)
        service_rows.append(r)
        console.log(f"service, {n} clients: {r}")

    m_cols = ["clients", "state machine ms per round", "snapshot ms", "snapshot KB (each /state answer)"]
    m_rows = [[r["clients"], f"{r['round_ms']:.2f}", f"{r['snapshot_ms']:.2f}", f"{r['snapshot_bytes'] / 1e3:.1f}"]
              for r in machine_rows]
    s_cols = ["clients", "rounds measured", "s per round", "coordinator CPU s per round",
              "client processes CPU s per round", "HTTP requests (all rounds)", "finished"]
    s_rows = [[r["clients"], r["rounds_measured"], None if r["round_s"] is None else f"{r['round_s']:.2f}",
               None if r["coordinator_cpu_s_per_round"] is None else f"{r['coordinator_cpu_s_per_round']:.2f}",
               None if r["clients_cpu_s_per_round"] is None else f"{r['clients_cpu_s_per_round']:.2f}",
               r["requests"], "yes" if r["finished"] else "no"] for r in service_rows]
    _common.print_table("Pure state machine (one process, injected clock)", m_cols, m_rows, console)
    _common.print_table(f"Real coordinator on 127.0.0.1, N asyncio clients, no training (tier-{args.tier} tiny "
                        "payloads)", s_cols, s_rows, console)
    path = _common.write_json(args.out, {
        "benchmark": "scale", "quick": args.quick, "complete": True, "rounds": rounds, "tier": args.tier,
        "state_machine": machine_rows, "service": service_rows, "wall_seconds": round(time.perf_counter() - t0, 1),
        "markdown": {"state_machine": _common.markdown_table(m_cols, m_rows),
                     "service": _common.markdown_table(s_cols, s_rows)},
    })
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
