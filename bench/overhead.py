"""Protocol overhead on real links: each testnet client's tokens/s against plain PyTorch loops training the same
tiers side by side, and where a round's time goes outside forward/backward; overlapped against synchronous
rounds, over loopback and over an emulated home link.

For every link (--link), schedule (--schedule) and repeat (--repeats):

1. A short testnet (`aftermath.testnet.Testnet`: a coordinator and one client process per tier, real processes
   on 127.0.0.1, DisTrO, the --preset model) runs --steps rounds in one epoch.
   - link `loopback`: 127.0.0.1 as it is.
   - link `home`: every client's transport emulates its own home line through the fault injector
     (aftermath.faults): 50 Mbit/s down, 10 Mbit/s up (6 250 000 and 1 250 000 bytes/s), 40 ms added to every
     request (coordinator calls, blobs, token batches).
   - link `loopback-tls`: 127.0.0.1 over TLS (`aftermath testnet --tls`: a self-signed certificate that every
     client pins), to set beside `loopback` (`--link loopback,loopback-tls`).
   - schedule `overlap` (the run default): a client trains step t+1 while step t's results download and apply;
     `sync`: `schedule.overlap = false`, every client applies step t before step t+1 opens.
   From each client's metrics JSONL ("round" records, aftermath.round.protocol.RoundRecord): tokens per round,
   the round's wall time (between consecutive round records: the round period, waiting for the slower peer and
   the coordinator included; with overlap, record t is written after applying t, i.e. after committing t+1,
   and the period is still one round), and the parts the client times: data, forward/backward (t_train),
   encode, upload+commit, prefetch (downloads while training or waiting: off the critical path), download,
   decode, aggregate+apply; other = the rest (waiting). The first round is left out (warm-up), and the last
   one (it has no next step to overlap with, so it is no steady round). With overlap a record's t_train is of
   the step trained one period earlier, so on a run of few rounds a client's train share can read a little
   above 100 % (other and the critical path a little below 0); over more rounds it evens out.
2. Right after it, the plain loops, side by side: one process per testnet client, all at once
   (multiprocessing spawn, one torch thread each, started together at a barrier), each training its client's
   tier (the preset sliced to it, `torch.optim.AdamW`) on the sequences per step that client got per round, at
   the run's micro-batch size, --steps steps. A process that finishes first keeps training (unmeasured) until
   every process has finished, so each measured step shares the CPUs like the testnet's clients did, and CPU
   contention is not counted as protocol cost.
Reported per link, schedule and client: testnet tokens/s over its side-by-side plain loop's tokens/s (min and
median over the repeats); the critical path = round wall time - t_train (share of the round outside
forward/backward); each part in seconds and in % of the round (medians over the repeats). `os.getloadavg()` is
recorded before and after each testnet and after its plain loops (the machine may be shared: compare runs with
similar load only).

Run:   .venv/bin/python bench/overhead.py --out bench/results/overhead.json
       (small preset, tiers 0,1, 12 steps, both links x both schedules x 2 repeats = 8 testnets, each followed
       by its plain loops; ~2-3 min each, ~15-25 min in all on a loaded 2-core machine)
Quick: .venv/bin/python bench/overhead.py --quick --out /tmp/overhead.json
       (tiny preset, 6 steps, both links, overlap only, 1 repeat; ~1 min)
One:   --link home --schedule overlap --repeats 1 (one testnet)
Local steps: --local-steps 4 (a round is 4 inner steps; the plain loops train one inner step's batch per step)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# the parts of a round a client times (aftermath.round.protocol.RoundRecord)
PARTS = ("t_data", "t_train", "t_encode", "t_upload", "t_prefetch", "t_download", "t_decode", "t_aggregate")
# on the critical path besides t_train (t_prefetch overlaps training or the wait for peers)
CRITICAL = ("t_data", "t_encode", "t_upload", "t_download", "t_decode", "t_aggregate", "t_other")

MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
LINKS: dict[str, dict[str, float] | None] = {
    "loopback": None,  # 127.0.0.1 as it is
    "home": {"latency_ms": 40.0, "bandwidth_down": 50 * MBIT, "bandwidth_up": 10 * MBIT},
    "loopback-tls": None,  # 127.0.0.1 over TLS (a self-signed certificate, pinned by every client)
}
DEFAULT_LINKS = ("loopback", "home")
SCHEDULES = {"overlap": True, "sync": False}


# ---------------------------------------------------------------------------------------------- the testnet side
def network_rates(out: Path, warmup: int = 1, tail: int = 1) -> list[dict[str, Any]]:
    """Per client: tokens/s over round wall time and over t_train, the mean seconds of each part, its share of the
    round, and the critical path (round - t_train).

    A round's wall time is the time from one round record to the next. The first `warmup` records only start
    the clock (their round includes start-up), and the last `tail` rounds are left out (the run's last round
    trains nothing new while it waits: with overlap, its training happened in the round before)."""
    from aftermath.metrics import read_metrics
    from aftermath.round.protocol import RoundRecord

    rows = []
    for path in sorted((out / "metrics").glob("client-*.jsonl")):
        records = sorted((RoundRecord.model_validate(r) for r in read_metrics(path) if r.get("event") == "round"),
                         key=lambda r: r.step)
        # round k+1's wall time: record k -> record k+1; only rounds in which this client trained
        pairs = list(zip(records[warmup:], records[warmup + 1:]))
        pairs = [(a, b) for a, b in pairs[:len(pairs) - tail if tail else None] if b.t_train]
        if not pairs:
            continue
        tokens = [b.tokens for _, b in pairs]
        walls = [b.time - a.time for a, b in pairs]
        train = [b.t_train for _, b in pairs]
        row: dict[str, Any] = {
            "client": path.stem, "tier": records[0].tier, "rounds": len(pairs),
            "tokens_per_round": statistics.fmean(tokens), "sequences_per_round": statistics.fmean(
                [b.sequences for _, b in pairs]), "round_s": statistics.fmean(walls),
            "tokens_per_s_round": sum(tokens) / sum(walls), "tokens_per_s_train": sum(tokens) / sum(train),
            "outside_fwd_bwd_share": 1.0 - sum(train) / sum(walls)}
        for part in PARTS:
            row[part] = statistics.fmean([getattr(b, part) or 0.0 for _, b in pairs])
        row["t_other"] = row["round_s"] - sum(row[p] for p in PARTS if p != "t_prefetch")
        row["critical_path_s"] = row["round_s"] - row["t_train"]
        row["critical_path_share"] = row["outside_fwd_bwd_share"]
        for part in (*PARTS, "t_other"):
            row[f"{part}_share"] = row[part] / row["round_s"]
        rows.append(row)
    return rows


def run_testnet(out: Path, *, preset: str, tiers: list[int], steps: int, link: str, overlap: bool,
                timeout: float, console, local_steps: int = 1) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """One testnet run; (its summary, its run config, network_rates of its clients)."""
    import tomllib

    from aftermath.faults import FaultConfig
    from aftermath.runconfig import parse_run_config
    from aftermath.testnet import Testnet, TestnetOptions

    faults = FaultConfig(**LINKS[link]) if LINKS[link] else None
    options = TestnetOptions(clients=len(tiers), tiers=tiers, steps=steps, out=out, live=False, threads=1,
                             timeout=timeout, faults=faults, tls=link.endswith("-tls"),
                             extra_overrides={"schedule.rounds_per_epoch": steps, "model.preset": preset,
                                              "schedule.overlap": overlap, "optimizer.local_steps": local_steps})
    summary = Testnet(options, console=console).run()
    run = parse_run_config(tomllib.loads((out / "logs" / "run.toml").read_text()))
    return summary, run, network_rates(out)


# ------------------------------------------------------------------------------------------- the plain loops
def plain_micro(run: Any, tier: int) -> int:
    """The micro-batch the testnet's client of `tier` trained with: the run's, or for "auto" the one the client
    chose on this machine (the same memory budget: its free memory)."""
    micro = run.train.micro_batch_size
    if micro != "auto":
        return micro
    import torch

    from aftermath.client.loop import HEADROOM, available_memory, choose_micro_batch
    from aftermath.model import preset_config, tier_spec

    config = preset_config(run.model.preset)
    plan = choose_micro_batch(config, tier_spec(config, tier), int(available_memory(torch.device("cpu")) * HEADROOM),
                              run.data.seq_len, run.optimizer.name, run.schedule.global_batch_size)
    return plan.size if plan is not None else 1


def plain_loop(preset: str, tier: int, sequences: int, seq_len: int, micro: int, steps: int, lr: float, *,
               ready: Callable[[], None] | None = None, finished: Callable[[], None] | None = None,
               others_running: Callable[[], bool] | None = None, busy_limit_s: float = 600.0,
               threads: int = 1) -> dict[str, Any]:
    """Tokens/s of forward/backward/AdamW on the sliced tier (first step left out), in this process, on
    `threads` torch threads (the testnet's clients use one each; the process's setting is restored after).

    Side by side (`side_by_side`): `ready()` is called once the model is built (a barrier, so that every process
    starts together), `finished()` after the measured steps, then the loop keeps training, unmeasured, while
    `others_running()` (at most `busy_limit_s`), so the others' measured steps keep sharing the CPUs with it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plain_loop(preset, tier, sequences, seq_len, micro, steps, lr, ready, finished, others_running,
                           busy_limit_s)
    finally:
        torch.set_num_threads(before)


def _plain_loop(preset, tier, sequences, seq_len, micro, steps, lr, ready, finished, others_running,
                busy_limit_s) -> dict[str, Any]:
    import torch

    from aftermath.data import TokenStream, default_data_dir
    from aftermath.model import build_model, preset_config, tier_spec
    from aftermath.model.slicing import sliced_model

    cfg = preset_config(preset)
    model = build_model(cfg, seed=0)
    if tier:
        model = sliced_model(model, tier_spec(cfg, tier))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = TokenStream(default_data_dir(), seq_len, seed=0, split="train", vocab_size=cfg.vocab_size)
    batches = [stream.sequences(step * sequences, (step + 1) * sequences) for step in range(steps + 1)]

    def one_step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        for lo in range(0, sequences, micro):
            part = batch[lo: lo + micro]
            loss = model.loss(part[:, :-1], part[:, 1:])
            (loss * (part.shape[0] / sequences)).backward()
        opt.step()

    if ready is not None:
        ready()
    times = []
    window_start = time.time()
    for batch in batches:
        start = time.perf_counter()
        one_step(batch)
        times.append(time.perf_counter() - start)
    window_end = time.time()
    if finished is not None:
        finished()
    busy_steps = 0
    if others_running is not None:
        deadline = time.monotonic() + busy_limit_s
        while others_running() and time.monotonic() < deadline:
            one_step(batches[busy_steps % len(batches)])
            busy_steps += 1
    tokens = sequences * seq_len
    return {"tier": tier, "sequences": sequences, "steps": steps, "tokens_per_step": tokens,
            "step_s": statistics.fmean(times[1:]), "tokens_per_s": tokens * steps / sum(times[1:]),
            "window": [round(window_start, 3), round(window_end, 3)], "busy_steps_after": busy_steps,
            "pid": os.getpid()}


def _side_by_side_worker(index: int, job: dict[str, Any], barrier, done, n: int, results) -> None:
    try:
        import torch

        torch.set_num_threads(1)

        def finished() -> None:
            with done.get_lock():
                done.value += 1

        out = plain_loop(**job, ready=lambda: barrier.wait(timeout=600), finished=finished,
                         others_running=lambda: done.value < n)
        results.put((index, out, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        with done.get_lock():
            done.value = n  # nobody waits for this one
        results.put((index, None, traceback.format_exc()))


def side_by_side(jobs: list[dict[str, Any]], timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Run `plain_loop(**job)` for every job at the same time, one spawned process per job, one torch thread
    each, all starting at a barrier; returns their results in the order of `jobs`. Each result has its measured
    `window` (wall-clock start and end), `start_skew_s` (how far apart the processes started) and
    `measured_together_s` (how long all of them were inside their measured steps at once)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(jobs))
    done = ctx.Value("i", 0)
    results = ctx.Queue()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned processes before torch starts there
    try:
        procs = [ctx.Process(target=_side_by_side_worker, args=(i, job, barrier, done, len(jobs), results),
                             daemon=True) for i, job in enumerate(jobs)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < len(jobs):
            try:
                index, result, error = results.get(timeout=1.0)
            except queue.Empty:
                for i, p in enumerate(procs):  # one that died without a word (killed, out of memory)
                    if i not in out and i not in errors and p.exitcode not in (None, 0):
                        errors[i] = f"exited with code {p.exitcode}"
                        barrier.abort()
                        done.value = len(jobs)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the side-by-side plain loops did not finish in {timeout:.0f} s")
                continue
            if error is not None:
                errors[index] = error
            else:
                out[index] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("\n".join(f"plain loop {i} ({jobs[i]}): {e}" for i, e in sorted(errors.items())))
    # each process keeps training until all have finished, so every measured window is shared with all the
    # others from the barrier on; the windows themselves show it
    starts = [r["window"][0] for r in out.values()]
    ends = [r["window"][1] for r in out.values()]
    for r in out.values():
        r["start_skew_s"] = round(max(starts) - min(starts), 3)  # how far apart the processes started measuring
        r["measured_together_s"] = round(min(ends) - max(starts), 3)  # all of them inside their measured steps
    return [out[i] for i in range(len(jobs))]


# ------------------------------------------------------------------------------------------------- reporting
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (link, schedule, client) over its repeats: min and median of the ratios, medians of the rest."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run.get("clients", []):
            if "network_over_plain" in row:
                groups.setdefault((run["link"], run["schedule"], row["client"]), []).append(row)
    out = []
    for (link, schedule, client), rows in groups.items():
        ratios = [r["network_over_plain"] for r in rows]
        shares = [r["critical_path_share"] for r in rows]
        s: dict[str, Any] = {
            "link": link, "schedule": schedule, "client": client, "tier": rows[0]["tier"], "repeats": len(rows),
            "tokens_per_round": _median([r["tokens_per_round"] for r in rows]),
            "network_over_plain_min": min(ratios), "network_over_plain_median": _median(ratios),
            "critical_path_share_min": min(shares), "critical_path_share_median": _median(shares)}
        for key in ("round_s", "tokens_per_s_round", "tokens_per_s_train", "plain_tokens_per_s", "critical_path_s",
                    *PARTS, "t_other"):
            s[key] = _median([r[key] for r in rows])
        for part in (*PARTS, "t_other"):
            s[f"{part}_share"] = s[part] / s["round_s"]
        out.append(s)
    order = {name: i for i, name in enumerate([*LINKS, *SCHEDULES])}
    out.sort(key=lambda s: (order[s["link"]], s["client"], order[s["schedule"]]))
    return out


def tables(summary: list[dict[str, Any]]) -> dict[str, tuple[str, list[str], list[list[Any]]]]:
    """(title, columns, rows) of each table: rates, parts, and overlap against sync where both ran."""
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    def part(s: dict[str, Any], key: str) -> str:
        return f"{s[key]:.3f} ({pct(s[key + '_share'])})"

    rates_cols = ["link", "schedule", "client", "tier", "repeats", "tokens/round", "round s", "tokens/s testnet",
                  "tokens/s fwd/bwd only", "tokens/s plain (side by side)", "testnet/plain min",
                  "testnet/plain median", "critical path s", "critical path share"]
    rates = [[s["link"], s["schedule"], s["client"], s["tier"], s["repeats"], round(s["tokens_per_round"]),
              f"{s['round_s']:.2f}", f"{s['tokens_per_s_round']:.0f}", f"{s['tokens_per_s_train']:.0f}",
              f"{s['plain_tokens_per_s']:.0f}", f"{s['network_over_plain_min']:.2f}",
              f"{s['network_over_plain_median']:.2f}", f"{s['critical_path_s']:.3f}",
              f"{pct(s['critical_path_share_median'])} (min {pct(s['critical_path_share_min'])})"] for s in summary]
    parts_cols = ["link", "schedule", "client", "round s", "train", "data", "encode", "upload+commit",
                  "download", "decode", "aggregate+apply", "other (waiting)", "prefetch (off path)"]
    parts = [[s["link"], s["schedule"], s["client"], f"{s['round_s']:.3f}", part(s, "t_train"), part(s, "t_data"),
              part(s, "t_encode"), part(s, "t_upload"), part(s, "t_download"), part(s, "t_decode"),
              part(s, "t_aggregate"), part(s, "t_other"), part(s, "t_prefetch")] for s in summary]
    out = {"rates": ("Tokens/s: testnet client vs plain PyTorch loops side by side (medians over repeats; critical "
                     "path = round - forward/backward)", rates_cols, rates),
           "parts": ("Seconds per round by part (% of the round; medians over repeats; prefetch runs beside "
                     "training or the wait, off the critical path)", parts_cols, parts)}
    by = {(s["link"], s["client"], s["schedule"]): s for s in summary}
    pairs = [(by[k[:2] + ("sync",)], s) for k, s in by.items() if k[2] == "overlap" and k[:2] + ("sync",) in by]
    if pairs:
        cols = ["link", "client", "tier", "round s sync", "round s overlap", "sync / overlap round",
                "testnet/plain sync", "testnet/plain overlap", "critical path sync", "critical path overlap"]
        rows = [[o["link"], o["client"], o["tier"], f"{y['round_s']:.3f}", f"{o['round_s']:.3f}",
                 f"{y['round_s'] / o['round_s']:.2f}x", f"{y['network_over_plain_median']:.2f}",
                 f"{o['network_over_plain_median']:.2f}", pct(y["critical_path_share_median"]),
                 pct(o["critical_path_share_median"])] for y, o in pairs]
        out["overlap_vs_sync"] = ("Overlapped against synchronous rounds (medians over repeats)", cols, rows)
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("Run:"):])
    ap.add_argument("--quick", action="store_true",
                    help="tiny preset, 6 steps, 1 repeat, overlap only (each default below, unless given)")
    ap.add_argument("--preset", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--link", default="both",
                    help="loopback: 127.0.0.1 as it is; home: 50 Mbit/s down, 10 Mbit/s up, 40 ms per request, "
                    "emulated in each client's transport; loopback-tls: 127.0.0.1 over TLS with a pinned "
                    "self-signed certificate; both (default): loopback then home; or a comma-separated list")
    ap.add_argument("--schedule", choices=["overlap", "sync", "both"], default=None,
                    help="overlap: overlapped rounds (the run default); sync: schedule.overlap = false; "
                    "both: side by side (default both; overlap with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="testnet runs per link and schedule (default 2; "
                    "1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="testnet rounds and plain-loop steps (default 12; "
                    "6 with --quick)")
    ap.add_argument("--tiers", default="0,1", help="one client per tier (default 0,1)")
    ap.add_argument("--local-steps", type=int, default=1, help="optimizer.local_steps H of the testnet (default 1: "
                    "DisTrO); its plain loops train one inner step's sequences per step")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up on one testnet after this many seconds")
    ap.add_argument("--keep", type=Path, default=None, help="keep each testnet's output under this directory")
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    torch.set_num_threads(1)
    console = Console(width=200)
    preset = args.preset or ("tiny" if args.quick else "small")
    steps = args.steps or (6 if args.quick else 12)
    repeats = args.repeats or (1 if args.quick else 2)
    schedule_arg = args.schedule or ("overlap" if args.quick else "both")
    links = list(DEFAULT_LINKS) if args.link == "both" else args.link.split(",")
    if any(link not in LINKS for link in links):
        ap.error(f"--link {args.link}: each link must be one of {', '.join(LINKS)} (or both)")
    schedules = list(SCHEDULES) if schedule_arg == "both" else [schedule_arg]
    tiers = [int(t) for t in args.tiers.split(",")]
    if steps < 4:
        ap.error(f"--steps {steps}: need at least 4 (the first and the last round are left out)")
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    run_info: Any = None
    for link in links:
        for schedule in schedules:
            for repeat in range(repeats):
                label = f"{link}/{schedule}/{repeat + 1}"
                record: dict[str, Any] = {"link": link, "schedule": schedule, "repeat": repeat + 1,
                                          "loadavg_before": _loadavg()}
                started = time.perf_counter()
                console.log(f"[bold]{label}[/bold]: testnet, {len(tiers)} clients, {preset}, {steps} steps")
                try:
                    with tempfile.TemporaryDirectory(prefix="aftermath-overhead-") as tmp:
                        out = args.keep / label.replace("/", "-") if args.keep else Path(tmp)
                        summary, run_info, network = run_testnet(
                            out, preset=preset, tiers=tiers, steps=steps, link=link,
                            overlap=SCHEDULES[schedule], timeout=args.timeout, console=console,
                            local_steps=args.local_steps)
                    record["loadavg_after_testnet"] = _loadavg()
                    record["testnet_summary"] = {k: summary.get(k) for k in
                                                 ("steps", "replicas_consistent", "wall_seconds", "faults")}
                    console.log(f"{label}: {len(network)} clients measured; plain loops side by side")
                    jobs = [{"preset": run_info.model.preset, "tier": row["tier"],
                             "sequences": max(1, round(row["tokens_per_round"] / run_info.data.seq_len
                                                       / run_info.optimizer.local_steps)),
                             "seq_len": run_info.data.seq_len, "micro": plain_micro(run_info, row["tier"]),
                             "steps": steps, "lr": run_info.optimizer.lr} for row in network]
                    plain = side_by_side(jobs) if jobs else []
                    for row, p in zip(network, plain):
                        row["plain_tokens_per_s"] = p["tokens_per_s"]
                        row["network_over_plain"] = row["tokens_per_s_round"] / p["tokens_per_s"]
                    record.update(clients=network, plain=plain, complete=len(network) == len(tiers))
                except Exception as exc:  # noqa: BLE001 - one failed run is reported; the others still count
                    console.print(f"[red]{label} failed[/red]: {exc}")
                    record.update(clients=[], plain=[], complete=False, error=str(exc)[-2000:])
                record["loadavg_after"] = _loadavg()
                record["wall_seconds"] = round(time.perf_counter() - started, 1)
                runs.append(record)

    summary_rows = summarize(runs)
    made = tables(summary_rows)
    for title, cols, rows in made.values():
        _common.print_table(f"{title} - {preset}, tiers {args.tiers}", cols, rows, console)
    complete = bool(runs) and all(r["complete"] for r in runs)
    path = _common.write_json(args.out, {
        "benchmark": "overhead", "quick": args.quick, "complete": complete, "preset": preset, "steps": steps,
        "tiers": tiers, "local_steps": args.local_steps, "repeats": repeats, "links": {k: LINKS[k] for k in links}, "schedules": schedules,
        "seq_len": run_info.data.seq_len if run_info else None,
        "optimizer": run_info.optimizer.name if run_info else None,
        "summary": summary_rows, "runs": runs, "wall_seconds": round(time.perf_counter() - t0, 1),
        "markdown": {name: _common.markdown_table(cols, rows) for name, (_, cols, rows) in made.items()},
    })
    console.print(f"wrote {path}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
