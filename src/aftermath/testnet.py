"""The local testnet: a coordinator and N client processes on 127.0.0.1, a live view, and the run's results.

Every part is a real process started with this Python (`python -m aftermath.cli coordinator|client ...`),
talking HTTP on 127.0.0.1, exactly as on separate machines. Output directory:

    OUT/checkpoint/          final universal checkpoint, tier exports, manifest (written by the coordinator)
    OUT/metrics/*.jsonl      one JSONL per process (coordinator.jsonl, client-0.jsonl, ...)
    OUT/summary.json         steps, replicas_consistent, clients, validation loss per tier
    OUT/loss.png             training loss per tier over steps, and validation loss per tier at epoch ends
    OUT/logs/*.log           each process's output

Faults (docs/reliability.md): `faults` passes latency, loss and a bandwidth limit to every client;
`kill_random` clients are killed with SIGKILL, one every `kill_interval` seconds, and restarted
`restart_delay` seconds later (as are clients that crash through the crash hook); `kill_coordinator_at_step`
kills the coordinator once that step is reached and an epoch checkpoint exists, and restarts it on the same run
directory and port. summary.json gains `"faults": {"latency", "dropped", "throttled", "kills", "rejoins"}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aftermath.crypto import COORDINATOR_KEY_FILE, Signer
from aftermath.errors import EXIT_EXCLUDED, AftermathError, ConfigError
from aftermath.faults import FaultConfig
from aftermath.metrics import read_metrics
from aftermath.report import plot_loss
from aftermath.round.protocol import StateSnapshot

OWNED = ("checkpoint", "metrics", "logs", "summary.json", "loss.png", "state.json", ".checkpoint-tmp",
         ".checkpoint-old", ".clients", "coordinator.json", "report.html", "report-loss.png",
         "report-validation.png", "report-bandwidth.png", "report-tokens-per-s.png", "tls")


@dataclass
class TestnetOptions:
    __test__ = False  # not a pytest test class
    clients: int = 3
    tiers: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    config: Path | None = None
    out: Path = Path("out")
    live: bool = True
    timeout: float = 600.0
    threads: int = 1
    extra_overrides: dict[str, Any] = field(default_factory=dict)
    faults: FaultConfig | None = None  # network faults injected by every client's transport
    kill_random: int = 0  # clients killed with SIGKILL during the run (then restarted)
    kill_interval: float = 10.0  # seconds between two kills (the first after the first round starts)
    restart_delay: float = 2.0  # a killed or crashed client is restarted this long after
    kill_coordinator_at_step: int | None = None  # kill -9 the coordinator there (after a checkpoint), restart it
    crash_at: dict[int, str] = field(default_factory=dict)  # client index -> "STEP:PHASE" (the crash hook)
    perturb_at: dict[int, int] = field(default_factory=dict)  # client index -> step (the divergence hook)
    attacks: dict[int, str] = field(default_factory=dict)  # client index -> attack (aftermath.client.hooks.ATTACKS)
    tls: bool = False  # https with a self-signed certificate (OUT/tls), pinned by its fingerprint in every client


def testnet_config_text(options: TestnetOptions) -> str:
    """The run config the testnet's coordinator gets: the user's (or the default) plus testnet quorums."""
    from aftermath.runconfig import load_run_config

    run = load_run_config(options.config)
    overrides = {"schedule.init_min_clients": options.clients, "schedule.min_clients": 1,
                 "schedule.waiting_for_members_extra_time": 0.2, "schedule.total_steps": options.steps,
                 "network.port": 0, "network.host": "127.0.0.1", "train.threads": options.threads}
    overrides.update(options.extra_overrides)
    run = run.with_overrides(overrides)
    return _to_toml(run.model_dump())


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the run config (tables, strings, numbers, booleans, lists)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        out += f"\n[{name}]\n" + _to_toml(value, prefix=name + ".")
    return out


def clean_out(out: Path) -> None:
    """Remove what an earlier testnet wrote in `out` (only the names the testnet owns)."""
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Testnet:
    __test__ = False  # not a pytest test class

    def __init__(self, options: TestnetOptions, console: Console | None = None) -> None:
        if options.clients < 1:
            raise ConfigError(f"--clients {options.clients}: need at least one client")
        if not options.tiers:
            raise ConfigError("--tiers needs at least one tier, e.g. 0,1,2")
        self.opts = options
        self.console = console or Console()
        self.out = options.out
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = ""
        self.token = secrets.token_urlsafe(12)
        self.admin_token = secrets.token_urlsafe(12)  # pauses/resumes the run from the dashboard
        self.last_state: StateSnapshot | None = None
        self.started = 0.0
        self.client_args: dict[str, list[str]] = {}  # name -> arguments of its first incarnation
        self.incarnations: dict[str, int] = {}
        self.kills = 0  # clients killed by the testnet or by their crash hook
        self.excluded: set[str] = set()  # clients that ended because the coordinator excluded them
        self.random_kills = 0  # of those, killed by --kill-random (its limit counts only these)
        self.restarted: list[str] = []  # metrics files of restarted incarnations
        self.coordinator_args: list[str] = []
        self.coordinator_kills = 0
        self.fingerprint: str | None = None  # of the coordinator's certificate, with tls
        seed = options.faults.seed if options.faults is not None else 0
        self.rng = random.Random(seed)

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        from aftermath.tls import ADMIN_TOKEN_ENV, TOKEN_ENV

        log = open(self.out / "logs" / f"{name}.log", "w")
        # the tokens go through the environment (readable by this user only), never argv (visible in `ps`)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.opts.threads), MKL_NUM_THREADS=str(self.opts.threads),
                   PYTHONUNBUFFERED="1", **{TOKEN_ENV: self.token})
        env.pop(ADMIN_TOKEN_ENV, None)
        if name == "coordinator":
            env[ADMIN_TOKEN_ENV] = self.admin_token
        proc = subprocess.Popen([sys.executable, "-m", "aftermath.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=os.getcwd())
        self.procs[name] = proc
        return proc

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run(self) -> dict[str, Any]:
        from aftermath.data import default_data_dir

        self.out.mkdir(parents=True, exist_ok=True)
        clean_out(self.out)
        (self.out / "logs").mkdir()
        (self.out / "metrics").mkdir()
        config_path = self.out / "logs" / "run.toml"
        config_text = testnet_config_text(self.opts)
        config_path.write_text(config_text)
        default_data_dir()  # prepare the embedded corpus once, before the processes race for it
        self.started = time.perf_counter()
        ready_file = self.out / "coordinator.json"
        port = free_port()
        self.url = f"{'https' if self.opts.tls else 'http'}://127.0.0.1:{port}"
        self.coordinator_args = ["coordinator", "--config", str(config_path), "--run-dir", str(self.out),
                                 "--port", str(port), "--ready-file", str(ready_file)]
        # the coordinator's identity, made here so every client pins it from the start (the coordinator reuses it)
        pin = ["--coordinator-key", Signer.load_or_create(self.out / COORDINATOR_KEY_FILE).public_hex]
        if self.opts.tls:
            from aftermath.tls import make_self_signed

            cert, key = self.out / "tls" / "cert.pem", self.out / "tls" / "key.pem"
            self.fingerprint = make_self_signed(cert, key, ["127.0.0.1", "localhost"])
            self.coordinator_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            pin += ["--coordinator-fingerprint", self.fingerprint]
            self.console.print(f"[bold]TLS[/bold]: self-signed certificate {cert}, SHA-256 fingerprint "
                               f"{self.fingerprint}")
        self._spawn("coordinator", self.coordinator_args)
        self.console.print(f"[bold]testnet[/bold]: coordinator at [green]{self.url}[/green] "
                           f"(state: {self.url}/state), {self.opts.clients} clients, tiers {self.opts.tiers}")
        self.console.print(f"[bold]dashboard[/bold]: [green]{self.url}/#admin={self.admin_token}[/green]")
        try:
            # clients start beside the coordinator (importing torch takes a while) and retry until it answers
            for i in range(self.opts.clients):
                tier = self.opts.tiers[i % len(self.opts.tiers)]
                name = f"client-{i}"
                self.client_args[name] = [
                    "client", "--coordinator", self.url, *pin, "--tier", str(tier),
                    "--name", name, "--work-dir", str(self.out / ".clients"), "--threads", str(self.opts.threads),
                    "--device", "cpu", *(self.opts.faults.to_args() if self.opts.faults else [])]
                hooks = []
                if i in self.opts.crash_at:
                    hooks += ["--crash-at", self.opts.crash_at[i]]
                if i in self.opts.perturb_at:
                    hooks += ["--perturb-at", str(self.opts.perturb_at[i])]
                if i in self.opts.attacks:
                    hooks += ["--attack", self.opts.attacks[i]]
                self.incarnations[name] = 0
                self._spawn(name, [*self.client_args[name], *hooks,
                                   "--metrics", str(self.out / "metrics" / f"{name}.jsonl")])
            self._wait_ready(ready_file)
            asyncio.run(self._watch())
        finally:
            self._stop_all()
        wall = time.perf_counter() - self.started
        summary_path = self.out / "summary.json"
        if not summary_path.is_file():
            raise AftermathError(f"the run did not finish: no {summary_path}; see the logs in {self.out / 'logs'}")
        summary = json.loads(summary_path.read_text())
        summary["wall_seconds"] = round(wall, 2)
        summary["throughput"] = self._throughput()
        summary["faults"] = self._fault_counts()
        if self.coordinator_kills:
            summary["coordinator_restarts"] = self.coordinator_kills
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        plot_loss(self.out, self.out / "loss.png")
        self._write_report()
        shutil.rmtree(self.out / ".clients", ignore_errors=True)
        ready_file.unlink(missing_ok=True)
        return summary

    def _write_report(self) -> None:
        from aftermath.report import write_report

        try:
            report = write_report(self.out)
            self.console.print(f"[bold]report[/bold]: [green]{report.html_path}[/green]")
        except Exception as exc:  # the run's results stand without a report; say why it is missing
            self.console.print(f"[yellow]report not written[/yellow]: {exc} (try `aftermath report {self.out}`)")

    def _wait_ready(self, ready_file: Path) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ready_file.is_file():
                try:
                    return json.loads(ready_file.read_text())["url"]
                except (json.JSONDecodeError, KeyError):
                    pass
            if self.procs["coordinator"].poll() is not None:
                raise AftermathError("the coordinator exited at start: " + self._tail("coordinator"))
            time.sleep(0.1)
        raise AftermathError("the coordinator did not start within 120 s: " + self._tail("coordinator"))

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.out / "logs" / f"{name}.log"
        return "\n" + "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""

    # ------------------------------------------------------------------ watching
    async def _watch(self) -> None:
        deadline = time.monotonic() + self.opts.timeout
        live = Live(self._view(), console=self.console, refresh_per_second=4, transient=False) \
            if self.opts.live else None
        if live:
            live.start()
        restarts: dict[str, float] = {}  # client name -> when to restart it
        next_kill: float | None = None
        coordinator_back_at: float | None = None
        try:
            from aftermath.tls import client_ssl

            connector = aiohttp.TCPConnector(ssl=client_ssl(self.fingerprint, None) or True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while True:
                    now = time.monotonic()
                    coordinator = self.procs["coordinator"]
                    if coordinator_back_at is not None:
                        if now >= coordinator_back_at:  # restart it on the same run directory and port
                            coordinator_back_at = None
                            self._spawn("coordinator", self.coordinator_args)
                    elif coordinator.poll() is not None:
                        break
                    for name, proc in list(self.procs.items()):
                        if name == "coordinator" or name in restarts or name in self.excluded:
                            continue
                        code = proc.poll()
                        if code == -signal.SIGKILL:  # killed by us or by its crash hook: restart it later
                            self.kills += 1
                            restarts[name] = now + self.opts.restart_delay
                        elif code == EXIT_EXCLUDED:  # the coordinator excluded it: the run goes on without it
                            self.excluded.add(name)
                        elif code not in (None, 0):
                            raise AftermathError(f"{name} failed (exit {proc.returncode}):" + self._tail(name))
                    for name, when in list(restarts.items()):
                        if now >= when and (self.last_state is None or self.last_state.phase != "Finished"):
                            del restarts[name]
                            self._restart_client(name)
                    if self.opts.kill_random and self.random_kills < self.opts.kill_random and self._running_round():
                        if next_kill is None:
                            next_kill = now + self.opts.kill_interval / 2
                        elif now >= next_kill:
                            next_kill = now + self.opts.kill_interval
                            alive = [n for n, p in self.procs.items() if n != "coordinator" and p.poll() is None]
                            if alive:
                                victim = self.rng.choice(sorted(alive))
                                self.procs[victim].send_signal(signal.SIGKILL)
                                self.random_kills += 1
                    step_k = self.opts.kill_coordinator_at_step
                    st = self.last_state
                    if step_k is not None and not self.coordinator_kills and st is not None \
                            and st.step >= step_k and st.checkpoint.epoch >= 0:
                        coordinator.send_signal(signal.SIGKILL)
                        coordinator.wait()
                        self.coordinator_kills += 1
                        self.last_state = None
                        coordinator_back_at = now + self.opts.restart_delay
                    if time.monotonic() > deadline:
                        raise AftermathError(f"the testnet did not finish in {self.opts.timeout:.0f} s; logs in "
                                             f"{self.out / 'logs'}")
                    try:
                        async with session.get(f"{self.url}/state", timeout=aiohttp.ClientTimeout(total=5)) as r:
                            self.last_state = StateSnapshot.model_validate(await r.json())
                    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValidationError):
                        pass
                    if live:
                        live.update(self._view())
                    await asyncio.sleep(0.25)
        finally:
            if live:
                live.update(self._view())
                live.stop()
        for name, proc in self.procs.items():
            if name != "coordinator":
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def _running_round(self) -> bool:
        st = self.last_state
        return st is not None and st.phase != "Finished" and (st.step > 0 or st.phase == "RoundTrain")

    def _restart_client(self, name: str) -> None:
        """A killed client comes back as a new process (a new keypair, a new join): it rejoins at the next epoch."""
        self.incarnations[name] += 1
        metrics = self.out / "metrics" / f"{name}.r{self.incarnations[name]}.jsonl"
        self.restarted.append(str(metrics))
        log_name = f"{name}.r{self.incarnations[name]}"
        proc = self._spawn(log_name, [*self.client_args[name], "--metrics", str(metrics)])
        del self.procs[log_name]
        self.procs[name] = proc

    def _fault_counts(self) -> dict[str, int]:
        """Faults injected (from every client process's metrics), clients killed, and restarted clients that
        joined the run again and trained or applied at least one round."""
        totals = {"latency": 0, "dropped": 0, "throttled": 0}
        for path in sorted((self.out / "metrics").glob("client-*.jsonl")):
            last: dict[str, int] = {}
            for rec in read_metrics(path):
                if isinstance(rec.get("faults"), dict):
                    last = rec["faults"]  # cumulative within one process
            for key in totals:
                totals[key] += int(last.get(key, 0))
        rejoins = 0
        for path in self.restarted:
            records = read_metrics(path) if Path(path).is_file() else []
            if any(r.get("event") == "round" for r in records):
                rejoins += 1
        return {**totals, "kills": self.kills, "rejoins": rejoins}

    def _view(self) -> Group:
        st = self.last_state
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        if st is None:
            return Group(Text(f"starting... {elapsed:.0f}s"))
        head = Text.assemble(("phase ", "dim"), (st.phase, "bold cyan"), ("  step ", "dim"),
                             f"{st.step}/{st.total_steps}", ("  epoch ", "dim"), str(st.epoch),
                             ("  elapsed ", "dim"), f"{elapsed:.0f}s", ("  ", ""), (self.url, "green"))
        table = Table("client", "tier", "status", "loss", "tokens/s", "bytes up", "bytes down", "rounds", box=None)
        for m in st.members:
            s = m.stats
            loss = s.get("loss")
            table.add_row(m.id, str(m.tier), m.status, "-" if loss is None else f"{loss:.3f}",
                          str(s.get("tokens_per_s") or "-"), _size(s.get("bytes_up", 0)),
                          _size(s.get("bytes_down", 0)), str(m.rounds_contributed))
        return Group(head, table)

    def _throughput(self) -> dict[str, Any]:
        """Tokens/s and bytes per round, from the clients' metrics."""
        tokens, rounds, payload, train = 0, 0, 0, 0.0
        for path in sorted((self.out / "metrics").glob("client-*.jsonl")):
            for rec in read_metrics(path):
                if rec.get("event") == "round" and rec.get("tokens"):
                    tokens += rec["tokens"]
                    payload += rec.get("payload_bytes") or 0
                    train += rec.get("t_train") or 0.0
                    rounds += 1
        wall = time.perf_counter() - self.started
        return {"tokens": tokens, "tokens_per_s_wall": round(tokens / wall, 1) if wall else None,
                "payload_bytes_total": payload, "payloads": rounds,
                "payload_bytes_mean": round(payload / rounds) if rounds else None}


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the coordinator binds it a moment later)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _size(n: int | float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"
