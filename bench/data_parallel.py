"""What `client --nproc N` costs and gains: the step time of one client's share computed by one process or by two
(aftermath.client.data_parallel), against two plain processes that each compute half the batch side by side
with no communication at all (what two processes sharing these cores can do at best: the contention is not
the data parallelism's cost).

    python bench/data_parallel.py                       # small preset, tier 0, 8 x 128 tokens, 3 repeats
    python bench/data_parallel.py --preset tiny --steps 3 --repeats 2 --out bench/results/dp-quick.json

Arms, interleaved within each repeat so that the machine's load falls on all of them alike:
- one 1t: one process, one torch thread, the whole batch;
- one 2t: one process, two torch threads;
- dp 2x1t: `--nproc 2` (rank 0 and one worker, one thread each; weights broadcast and gradients all-reduced
  every step);
- plain 2x1t: two independent processes, each half the batch, synchronised by a barrier at every step (the
  step time is the slower one's).
Prints a table (min and median seconds per step) and writes JSON with every step's time and the load average.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

from aftermath.client.data_parallel import DataParallelGroup  # noqa: E402
from aftermath.model import build_model, preset_config, tier_spec  # noqa: E402
from aftermath.round.replica import Replica  # noqa: E402
from aftermath.runconfig import RunConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--tier", type=int, default=0, help="tier the client trains (default 0)")
    p.add_argument("--batch", type=int, default=8, help="sequences of the client's share per step (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm and repeat (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every arm (default 3)")
    p.add_argument("--out", default="bench/results/data_parallel.json", help="JSON output")
    return p.parse_args()


def make_replica(args: argparse.Namespace) -> tuple[Replica, torch.Tensor]:
    config = preset_config(args.preset)
    # objective "own": every arm computes the same single group, so the arms differ only in who computes it
    run = RunConfig().with_overrides({"train.objective": "own", "optimizer.warmup_steps": 0})
    replica = Replica.build(build_model(config, seed=0), config, tier_spec(config, args.tier), run)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    return replica, batch


def timed_steps(replica: Replica, batch: torch.Tensor, args: argparse.Namespace) -> list[float]:
    replica.train(batch, args.micro, step=0, client_id="bench")  # warm-up, untimed
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        replica.train(batch, args.micro, step=step, client_id="bench")
        times.append(time.perf_counter() - t0)
    return times


def _plain_half(args: argparse.Namespace, half: int, barrier, results) -> None:
    torch.set_num_threads(1)
    replica, batch = make_replica(args)
    rows = batch[half::2]
    replica.train(rows, args.micro, step=0, client_id="bench")
    for step in range(args.steps):
        barrier.wait()
        t0 = time.perf_counter()
        replica.train(rows, args.micro, step=step, client_id="bench")
        results.put((half, step, time.perf_counter() - t0))


def plain_side_by_side(args: argparse.Namespace) -> list[float]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_plain_half, args=(args, h, barrier, results)) for h in range(2)]
    for p in procs:
        p.start()
    per_step: dict[int, float] = {}
    for _ in range(2 * args.steps):
        _, step, seconds = results.get(timeout=600)
        per_step[step] = max(per_step.get(step, 0.0), seconds)
    for p in procs:
        p.join()
    return [per_step[s] for s in range(args.steps)]


def main() -> None:
    args = parse_args()
    replica, batch = make_replica(args)
    arms: dict[str, list[float]] = {"one 1t": [], "one 2t": [], "dp 2x1t": [], "plain 2x1t": []}
    loads = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats} (load {os.getloadavg()[0]:.2f})", flush=True)
        loads.append(os.getloadavg())
        for threads in (1, 2):
            torch.set_num_threads(threads)
            replica.parallel = None
            arms[f"one {threads}t"] += timed_steps(replica, batch, args)
        torch.set_num_threads(1)
        group = DataParallelGroup(2, torch.device("cpu"), threads=1)
        try:
            replica.parallel = group
            arms["dp 2x1t"] += timed_steps(replica, batch, args)
        finally:
            replica.parallel = None
            group.close()
        arms["plain 2x1t"] += plain_side_by_side(args)
    base = statistics.median(arms["one 1t"])
    rows = [[name, min(t), statistics.median(t), base / statistics.median(t)] for name, t in arms.items()]
    title = (f"{args.preset} tier {args.tier}, {args.batch} x {args.seq} tokens per step, micro {args.micro}: "
             f"seconds per step ({args.repeats} x {args.steps} steps)")
    _common.print_table(title, ["arm", "min s", "median s", "speed-up vs one 1t"], rows)
    dp, plain = statistics.median(arms["dp 2x1t"]), statistics.median(arms["plain 2x1t"])
    print(f"data parallelism's own cost (dp - plain, medians): {dp - plain:+.3f} s per step "
          f"({(dp - plain) / plain:+.1%})")
    params = sum(p.numel() for p in replica.model.parameters())
    path = _common.write_json(args.out, {"preset": args.preset, "tier": args.tier, "batch": args.batch,
                                         "seq_len": args.seq, "micro_batch": args.micro, "parameters": params,
                                         "load_average": loads, "seconds_per_step": arms,
                                         "table": _common.markdown_table(
                                             ["arm", "min s", "median s", "speed-up vs one 1t"], rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
