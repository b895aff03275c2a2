"""Peak memory of one training step per MatFormer tier, and the levers that shrink it.

One training step = forward, backward and optimizer step on `--batch` sequences of `--seq` tokens
(in micro-batches with gradient accumulation where a setting says so). Every measurement runs in a
FRESH subprocess with one torch thread, because a process's peak RSS only grows:

- CPU: peak RSS (getrusage ru_maxrss) over a warm-up step and a measured step, minus the RSS the same
  process had before building the model. Two baselines are reported: right after importing torch and
  aftermath ("above import"), and after a throwaway step of a 1-layer model that faults in torch's code
  and runtime buffers (~100 MiB, the same for every tier; "peak", used for the ratios, comparable with
  CUDA's max_memory_allocated);
- CUDA (`--device cuda`): torch.cuda.max_memory_allocated over the two steps, minus what was allocated before
  the model was built. Here the whole step runs on the GPU (AdamW's state included), unlike a client, which
  keeps the replica and the optimizer state in host memory (aftermath.round.replica); never run on a GPU yet.

Next to each measured peak stands an analytic breakdown from parameter counts (fp32 weights, gradients,
optimizer state); the remainder is activations, autograd buffers and allocator slack.

Settings (each measured at tiers 0, 1, 2; ratios are against tier 0 of the same setting):
  default          what a client does by default: sliced weights, FFN and head tiers, DisTrO, and the micro-batch
                   its planner picks (aftermath.client.loop.choose_micro_batch: the largest power of two whose
                   estimated step fits --budget, activation checkpointing when not even 1 fits)
  ffn+heads        sliced weights (the client builds only its tier), FFN and attention-head tiers, AdamW
  ffn-only         sliced weights, FFN-only tiers (matformer_nest_heads=False)
  runtime          universal weights, forward at the tier's spec: full-size grads and AdamW state
  distro           as ffn+heads, aftermath.optim.DistroOptimizer (fp32 momentum in the tier's shapes; the
                   step = compress + encode + decode + aggregate + sign apply, a lone client's round)
  runtime-distro   as runtime, DistroOptimizer (its momentum stays in the tier's shapes)
  ckpt             as ffn+heads, activation checkpointing per layer
  micro            as ffn+heads, micro-batches of --micro-batch with gradient accumulation (same tokens)
  ckpt+micro       both levers
  distro+ckpt+micro  both levers with DisTrO

`--precision fp32,bf16` measures each case in each precision (bf16: torch.autocast around the forward and the
loss, fp32 weights, as the client does: aftermath.round.replica.training_loss). Each CPU row also carries the
client's estimate of its peak (aftermath.client.loop.estimate_memory) and its error against the measurement.
`--plot PATH` draws tier t / tier 0 against tier 0's parameter count (from this run, or from `--from-json`
files without measuring).

Run:  .venv/bin/python bench/memory.py --out bench/results/memory.json
Quick check (under a minute):  .venv/bin/python bench/memory.py --quick --out /tmp/memory.json
(--quick forks each measurement from one process that imported torch once, see ForkServer; full runs start a
fresh interpreter per measurement.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

MIB = 2**20
FP32 = 4


@dataclass(frozen=True)
class Setting:
    """How the client holds and trains its tier; everything but the tier itself."""

    key: str
    holding: str = "sliced"  # "sliced": only the tier's weights; "runtime": universal weights, tier spec at forward
    heads: str = "nested"  # "nested": attention heads shrink with the tier; "ffn-only": they do not
    optimizer: str = "adamw"  # "adamw": 2 fp32 states per held param; "distro": DistroOptimizer (momentum, tier shapes)
    checkpointing: bool = False
    micro: str = "whole"  # "whole": the batch at once; "fixed": micro-batches of --micro-batch with gradient
                          # accumulation; "auto": the client's planner picks them for --budget

    def describe(self) -> str:
        parts = ["universal weights, runtime slicing" if self.holding == "runtime" else "sliced weights",
                 "FFN-only tiers" if self.heads == "ffn-only" else "FFN+head tiers",
                 "AdamW" if self.optimizer == "adamw" else "DisTrO"]
        if self.checkpointing:
            parts.append("activation checkpointing")
        if self.micro == "fixed":
            parts.append("micro-batches + accumulation")
        if self.micro == "auto":
            parts.append("the client's auto micro-batch")
        return ", ".join(parts)


SETTINGS = {s.key: s for s in [
    Setting("default", optimizer="distro", micro="auto"),
    Setting("ffn+heads"),
    Setting("ffn-only", heads="ffn-only"),
    Setting("runtime", holding="runtime"),
    Setting("distro", optimizer="distro"),
    Setting("runtime-distro", holding="runtime", optimizer="distro"),
    Setting("ckpt", checkpointing=True),
    Setting("micro", micro="fixed"),
    Setting("ckpt+micro", checkpointing=True, micro="fixed"),
    Setting("distro+ckpt+micro", optimizer="distro", checkpointing=True, micro="fixed"),
]}
BASELINE = "ffn+heads"
QUICK_SETTINGS = ["ffn+heads", "runtime", "distro+ckpt+micro"]


@dataclass(frozen=True)
class Case:
    """One measurement: a setting at one tier of one preset, in one precision, with its micro-batches decided."""

    preset: str
    tier: int
    setting: Setting
    seq: int
    batch: int
    micro_batch_size: int
    checkpointing: bool
    precision: str
    device: str

    @property
    def accumulation(self) -> int:
        return -(-self.batch // self.micro_batch_size)

    def identity(self) -> tuple:
        """Cases with equal identity measure the same thing: at tier 0, holding and head nesting do not matter."""
        s = self.setting
        holding, heads = ("sliced", "nested") if self.tier == 0 else (s.holding, s.heads)
        return (self.preset, self.tier, holding, heads, s.optimizer, self.checkpointing, self.micro_batch_size,
                self.seq, self.batch, self.precision, self.device)


# ------------------------------------------------------------------------------------------- child side
def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Optimizer:
    """The optimizer step of one client: AdamW, or a whole DisTrO round for a lone client.

    DisTrO (aftermath.optim.DistroOptimizer): momentum in the tier's shapes; the step compresses the
    gradients into a payload, frees them, decodes the payload, aggregates it onto the client's parameter
    shapes and applies the sign update, streamed band by band (`aggregate_and_apply`, as the replicas do) —
    what a client does in a round, with only its own payload.
    """

    def __init__(self, kind: str, model: Any, config: Any, spec: Any) -> None:
        import torch

        self.kind = kind
        self.named = dict(model.named_parameters())
        if kind == "adamw":
            self.adamw = torch.optim.AdamW(self.named.values(), lr=1e-4, weight_decay=0.0)
        else:
            from aftermath.optim import DistroConfig, DistroOptimizer

            self.distro = DistroOptimizer(DistroConfig(lr=1e-4), config.base(), spec, self.named)

    def state_bytes(self) -> int:
        if self.kind == "adamw":
            return 2 * sum(p.numel() for p in self.named.values()) * FP32
        return sum(t.numel() * t.element_size() for t in self.distro.momentum.values())

    def zero_grad(self) -> None:
        for p in self.named.values():
            p.grad = None

    def step(self, step: int) -> None:
        if self.kind == "adamw":
            self.adamw.step()
            return
        from aftermath.optim import decode_payload

        # the momentum lives on the CPU, as the client's (aftermath.round.replica.Replica.encode)
        data = self.distro.encode({n: None if p.grad is None else p.grad.cpu() for n, p in self.named.items()},
                                  step, "bench", "client")
        self.zero_grad()  # the gradients are in the momentum now
        self.distro.aggregate_and_apply([decode_payload(data, self.distro.expectation("bench", step))], step)


def _warm_up(optimizer: str, checkpointing: bool, precision: str, device: Any) -> None:
    """Two training steps of a throwaway 1-layer model, full and at a smaller spec: loads torch's kernels."""
    import torch

    from aftermath.model import build_model, preset_config, tier_spec
    from aftermath.round.replica import training_loss

    config = preset_config("tiny", num_hidden_layers=1, vocab_size=256)
    model = build_model(config, seed=0).to(device)
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)).to(device)
    for step, t in enumerate((0, 1)):
        spec = tier_spec(config, t)
        opt = _Optimizer(optimizer, model, config, spec)
        opt.zero_grad()
        training_loss(model, ids, spec, precision).backward()
        opt.step(step)


def measure(case: Case) -> dict[str, Any]:
    """Run the warm-up and the measured step of `case` in THIS process; return the numbers (bytes)."""
    import gc
    import resource

    import torch

    from aftermath.client.loop import estimate_memory
    from aftermath.model import build_model, parameter_count, preset_config, sliced_config, tier_spec
    from aftermath.round.replica import training_loss

    torch.set_num_threads(1)
    s = case.setting
    device = torch.device(case.device)
    if device.type == "cuda":
        torch.cuda.init()
    config = preset_config(case.preset, matformer_nest_heads=(s.heads == "nested"))
    spec = tier_spec(config, case.tier)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (case.batch, case.seq + 1), generator=gen)
    gc.collect()

    # Baseline 1 (the brief's): torch and aftermath imported, nothing built.
    import_rss = _current_rss()
    # Baseline 2: after one throwaway training step of a 1-layer model through the same code paths. The
    # first step faults in ~100 MiB of torch's code and runtime buffers, the same for every tier and
    # invisible to CUDA's max_memory_allocated; subtracting it leaves the memory the tier itself needs.
    _warm_up(s.optimizer, case.checkpointing, case.precision, device)
    gc.collect()
    base_rss = _current_rss()
    warm_peak = _peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    if s.holding == "sliced":
        model = build_model(sliced_config(config, spec), seed=0)
        run_spec = None
    else:
        model = build_model(config, seed=0)
        run_spec = spec
    model.activation_checkpointing = case.checkpointing
    model.to(device)
    ids = ids.to(device)
    gc.collect()
    after_build_rss = _current_rss()

    opt = _Optimizer(s.optimizer, model, config, spec)

    mb = case.micro_batch_size
    step_seconds = []
    # The warm-up step allocates the gradients and the optimizer state; it runs on a single short sequence
    # because its activations are not what we measure (its peak is below the measured step's).
    warm_ids = ids[:1, :17]
    steps = [[warm_ids], [ids[lo:lo + mb] for lo in range(0, case.batch, mb)]]
    for step, micro_batches in enumerate(steps):
        start = time.perf_counter()
        opt.zero_grad()
        n = sum(part.shape[0] for part in micro_batches)
        for part in micro_batches:  # weighed as aftermath.round.replica.Replica.train does
            loss = training_loss(model, part, run_spec, case.precision) * (part.shape[0] / n)
            loss.backward()
            del loss
        opt.step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)

    held = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "params_held": held,
        "params_tier": parameter_count(config, spec),
        "weights_bytes": held * FP32,
        "grads_bytes": held * FP32,  # a view's gradient accumulates into a full-size .grad
        "optimizer_bytes": opt.state_bytes(),
        "step_seconds": step_seconds[-1],
        "loss_finite": bool(torch.isfinite(model.loss(warm_ids[:, :-1], warm_ids[:, 1:], run_spec)).item()),
        # the client's own estimate, for what it trains: a sliced tier (CPU: everything in one memory)
        "estimate_bytes": estimate_memory(config, spec, mb, case.seq, s.optimizer, precision=case.precision,
                                          checkpointing=case.checkpointing)
        if s.holding == "sliced" and device.type == "cpu" else None,
    }
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base_cuda
        result["baseline_bytes"] = base_cuda
    else:
        peak = _peak_rss()
        result["peak_bytes"] = peak - base_rss
        result["peak_above_import_bytes"] = peak - import_rss
        result["import_rss_bytes"] = import_rss
        result["warm_up_bytes"] = base_rss - import_rss
        result["after_build_bytes"] = after_build_rss - base_rss
        # ru_maxrss only rises: if the warm-up's peak was never exceeded, the step's peak is unknown.
        result["peak_reliable"] = peak > warm_peak
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime  # this process's CPU, imports included
    return result


def _case_to_json(case: Case) -> str:
    return json.dumps(dataclasses.asdict(case))


def _case_from_json(text: str) -> Case:
    data = json.loads(text)
    data["setting"] = Setting(**data["setting"])
    return Case(**data)


# ------------------------------------------------------------------------------------------ parent side
def run_case(case: Case) -> dict[str, Any]:
    """Measure `case` in a fresh Python process (peak RSS only grows, so each measurement needs its own)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", _case_to_json(case)],
        capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {case.preset} tier {case.tier} {case.setting.key} {case.precision} "
                           f"failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ForkServer:
    """--quick: every measurement runs in its own process, forked from one server process that imported torch,
    torch._dynamo (AdamW imports it) and aftermath once: ~5 s of CPU less per measurement than a fresh
    interpreter. The forked process has done nothing but import, so it starts like a fresh one; its
    peak RSS is its own. Full runs keep fresh interpreters (`run_case`), as the published numbers were taken."""

    PRELOAD = ["torch", "torch._dynamo", "psutil", "aftermath.model", "aftermath.optim"]

    def __init__(self) -> None:
        import multiprocessing

        # one torch thread in the server and so in every process forked from it (set before it imports torch)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(self.PRELOAD)

    def run_case(self, case: Case) -> dict[str, Any]:
        with self.context.Pool(1, maxtasksperchild=1) as pool:
            try:
                return pool.apply(measure, (case,))
            except Exception as exc:
                raise RuntimeError(f"measurement {case.preset} tier {case.tier} {case.setting.key} failed: {exc!r}")


def _micro_batches(setting: Setting, preset: str, tier: int, seq: int, batch: int, micro_batch: int,
                   precision: str, device: str, budget: int) -> tuple[int, bool]:
    """(micro-batch size, activation checkpointing) of a case: the setting's own, or the client's plan."""
    if setting.micro == "whole":
        return batch, setting.checkpointing
    if setting.micro == "fixed":
        return micro_batch, setting.checkpointing
    from aftermath.client.loop import HEADROOM, choose_micro_batch
    from aftermath.model import preset_config, tier_spec

    config = preset_config(preset)
    plan = choose_micro_batch(config, tier_spec(config, tier), int(budget * HEADROOM), seq, setting.optimizer,
                              batch, precision=precision, gpu=device.startswith("cuda"))
    if plan is None:
        raise SystemExit(f"error: {preset} tier {tier} does not fit --budget {budget / MIB:.0f} MiB at all")
    return plan.size, plan.checkpointing


def build_cases(presets: list[str], tiers: list[int], settings: list[str], seq: int, batch: int,
                micro_batch: int, device: str, precisions: list[str], budget: int) -> list[Case]:
    if batch % micro_batch:
        raise SystemExit(f"error: --batch {batch} is not a multiple of --micro-batch {micro_batch}")
    unknown = [k for k in settings if k not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if 0 not in tiers:
        raise SystemExit("error: --tiers must include 0 (ratios are against tier 0)")
    wrong = [x for x in precisions if x not in ("fp32", "bf16", "fp16")]
    if wrong:
        raise SystemExit(f"error: --precision {wrong} is not one of fp32, bf16, fp16")
    return [Case(p, t, SETTINGS[k], seq, batch,
                 *_micro_batches(SETTINGS[k], p, t, seq, batch, micro_batch, x, device, budget), x, device)
            for p in presets for x in precisions for k in settings for t in tiers]


def _line(r: dict[str, Any]) -> tuple[str, str, str]:
    """The (preset, setting, precision) a row belongs to: its ratios are against tier 0 of the same line."""
    return r["preset"], r["setting"], r.get("precision", "fp32")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratio against tier 0 of its own line and against tier 0 of the baseline setting, and the
    error of the client's estimate."""
    by_key = {(*_line(r), r["tier"]): r for r in rows}
    for r in rows:
        preset, _, precision = _line(r)
        own0 = by_key.get((*_line(r), 0))
        base0 = by_key.get((preset, BASELINE, precision, 0))
        r["ratio_vs_tier0"] = r["peak_bytes"] / own0["peak_bytes"] if own0 else None
        r["ratio_vs_baseline_tier0"] = r["peak_bytes"] / base0["peak_bytes"] if base0 else None
        if "peak_above_import_bytes" in r and own0:
            r["ratio_above_import_vs_tier0"] = r["peak_above_import_bytes"] / own0["peak_above_import_bytes"]
        if r.get("estimate_bytes") is not None:
            r["estimate_error"] = r["estimate_bytes"] / r["peak_bytes"] - 1
    return rows


def ratio_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (preset, setting, precision): tier t / tier 0 peaks, and tier-0 peak in MiB."""
    out = []
    for preset, setting, precision in dict.fromkeys(_line(r) for r in rows):
        tiers = {r["tier"]: r for r in rows if _line(r) == (preset, setting, precision)}
        line = {"preset": preset, "setting": setting, "precision": precision,
                "describe": SETTINGS[setting].describe(),
                "params_tier0": tiers[0]["params_tier"] if 0 in tiers else None,
                "tier0_peak_mib": tiers[0]["peak_bytes"] / MIB if 0 in tiers else None}
        for t, r in sorted(tiers.items()):
            if t:
                line[f"tier{t}_over_tier0"] = r["ratio_vs_tier0"]
                line[f"tier{t}_over_baseline_tier0"] = r["ratio_vs_baseline_tier0"]
                line[f"tier{t}_over_tier0_above_import"] = r.get("ratio_above_import_vs_tier0")
        out.append(line)
    return out


def detail_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per measurement: the analytic breakdown (MiB from parameter counts), the rest, the measured peaks, and the
    client's estimate."""
    columns = ["preset", "setting", "prec", "tier", "micro", "params M", "weights", "grads", "opt state", "rest",
               "peak", "peak above import", "/ tier0", f"/ {BASELINE} tier0", "estimate", "est. error"]
    table = []
    for r in rows:
        analytic = r["weights_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
        above_import = r.get("peak_above_import_bytes")
        estimate = r.get("estimate_bytes")
        micro = f"{r['micro_batch']}{'+ckpt' if r['checkpointing'] else ''}"
        table.append([r["preset"], r["setting"], r.get("precision", "fp32"), r["tier"], micro,
                      round(r["params_held"] / 1e6, 1),
                      round(r["weights_bytes"] / MIB), round(r["grads_bytes"] / MIB),
                      round(r["optimizer_bytes"] / MIB), round((r["peak_bytes"] - analytic) / MIB),
                      round(r["peak_bytes"] / MIB), None if above_import is None else round(above_import / MIB),
                      r["ratio_vs_tier0"], r["ratio_vs_baseline_tier0"],
                      None if estimate is None else round(estimate / MIB),
                      None if estimate is None else f"{r['estimate_error']:+.0%}"])
    return columns, table


def summary_table(ratios: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per line: tier-0 peak and each tier's ratio (also against the import baseline, and vs plain tier 0)."""
    tiers = sorted({int(k[4:k.index("_")]) for line in ratios for k in line
                    if k.startswith("tier") and k.endswith("_over_tier0")})
    columns = ["preset", "setting", "prec", "tier0 MiB"]
    for t in tiers:
        columns += [f"t{t}/t0", f"t{t}/t0 above import", f"t{t}/{BASELINE} t0"]
    rows = []
    for line in ratios:
        row = [line["preset"], line["setting"], line["precision"],
               None if line["tier0_peak_mib"] is None else round(line["tier0_peak_mib"])]
        for t in tiers:
            row += [line.get(f"tier{t}_over_tier0"), line.get(f"tier{t}_over_tier0_above_import"),
                    line.get(f"tier{t}_over_baseline_tier0")]
        rows.append(row)
    return columns, rows


TARGETS = {("gpt2-124m", 1): 0.65, ("gpt2-124m", 2): 0.50, ("gpt2-350m", 1): 0.62}  # issue 22's goals


def plot_ratios(ratios: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG: tier t / tier 0 peak against tier 0's parameter count, a panel per tier, a line per (setting,
    precision) measured at two presets or more; the tier's share of the parameters and issue 22's targets
    for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aftermath.model import parameter_count, preset_config, tier_spec

    lines: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
    presets: dict[str, float] = {}
    for line in ratios:
        if line.get("params_tier0"):
            presets[line["preset"]] = line["params_tier0"]
            for t in (1, 2):
                if line.get(f"tier{t}_over_tier0") is not None:
                    lines.setdefault((line["setting"], line["precision"]), {}).setdefault(t, []).append(
                        (line["params_tier0"], line[f"tier{t}_over_tier0"]))
    lines = {k: v for k, v in lines.items() if max(len(points) for points in v.values()) >= 2}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t, ax in zip((1, 2), axes):
        for i, ((setting, precision), by_tier) in enumerate(sorted(lines.items())):
            points = sorted(by_tier.get(t, []))
            ax.plot([x / 1e6 for x, _ in points], [y for _, y in points], color=colors[i % len(colors)],
                    marker="o", linestyle="-" if precision == "fp32" else "--", label=f"{setting}, {precision}")
        shares = sorted((params, parameter_count(preset_config(name), tier_spec(preset_config(name), t)) / params)
                        for name, params in presets.items())
        ax.plot([x / 1e6 for x, _ in shares], [y for _, y in shares], color="black", linestyle=":",
                label="parameters of tier t / tier 0")
        for (name, tier), goal in TARGETS.items():
            if tier == t and name in presets:
                ax.scatter([presets[name] / 1e6], [goal], marker="x", s=80, color="red", zorder=5,
                           label="issue 22 target" if name == "gpt2-124m" else None)
        ax.set_xscale("log")
        ax.set_xlabel("parameters of tier 0 (millions, log scale)")
        ax.set_title(f"tier {t}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("peak of tier t / peak of tier 0 (one training step)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Memory of a MatFormer tier against the full model, by model size")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,gpt2-124m", help="comma-separated presets (default small,gpt2-124m)")
    p.add_argument("--tiers", default="0,1,2", help="comma-separated tiers, must include 0 (default 0,1,2)")
    p.add_argument("--settings", help=f"comma-separated settings from {list(SETTINGS)} (default: all; "
                   f"--quick: {','.join(QUICK_SETTINGS)})")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per training step (default 4)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per micro-batch in the 'micro' settings (default 1; --batch/--micro-batch accumulations)")
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    p.add_argument("--precision", default="fp32", help="comma-separated precisions of the forward: fp32, bf16, fp16 "
                   "(default fp32)")
    p.add_argument("--budget", type=float, help="MiB the 'default' setting's micro-batch planner may plan for "
                   "(default: this machine's available memory, as a client's)")
    p.add_argument("--plot", help="write a PNG of tier t / tier 0 against parameter count to this file")
    p.add_argument("--from-json", help="comma-separated result files to plot (with --plot) instead of measuring")
    p.add_argument("--quick", action="store_true",
                   help=f"a check that it still runs: small preset, tiers 0 and 1, seq 64 x batch 2, settings "
                   f"{QUICK_SETTINGS}, measurements forked from one process that imported torch once")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(measure(_case_from_json(args.child))))
        return 0

    if args.from_json:
        if not args.plot:
            raise SystemExit("error: --from-json only plots: give --plot PATH")
        rows = [r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())["rows"]]
        print(f"wrote {plot_ratios(ratio_table(summarise(rows)), args.plot)}")
        return 0
    if args.quick:
        args.presets, args.tiers, args.seq, args.batch = "small", "0,1", 64, 2
        args.settings = args.settings or ",".join(QUICK_SETTINGS)
    args.settings = args.settings or ",".join(SETTINGS)
    if args.budget is not None:
        budget = int(args.budget * MIB)
    else:
        import psutil

        budget = psutil.virtual_memory().available
    cases = build_cases(args.presets.split(","), [int(t) for t in args.tiers.split(",")],
                        args.settings.split(","), args.seq, args.batch, args.micro_batch, args.device,
                        args.precision.split(","), budget)

    from rich.console import Console

    # A pipe gets rich's 80 columns by default; the tables need more.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    measured: dict[tuple, dict[str, Any]] = {}
    rows = []
    started = time.perf_counter()
    unique = len({c.identity() for c in cases})
    server = ForkServer() if args.quick else None
    for case in cases:
        ident = case.identity()
        if ident not in measured:
            t0 = time.perf_counter()
            measured[ident] = server.run_case(case) if server else run_case(case)
            console.print(
                f"[{len(measured)}/{unique}] {case.preset} tier {case.tier} {case.setting.key} {case.precision}: "
                f"peak {measured[ident]['peak_bytes'] / MIB:,.0f} MiB above baseline "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        rows.append({"preset": case.preset, "tier": case.tier, "setting": case.setting.key,
                     "seq": case.seq, "batch": case.batch, "micro_batch": case.micro_batch_size,
                     "accumulation": case.accumulation, "device": case.device, "precision": case.precision,
                     "checkpointing": case.checkpointing, "optimizer": case.setting.optimizer,
                     "holding": case.setting.holding, "heads": case.setting.heads, **measured[ident]})
        if args.out:  # keep what is measured so far should a long run be stopped
            _common.write_json(args.out, {"benchmark": "memory", "complete": False, "rows": rows})
    summarise(rows)
    ratios = ratio_table(rows)

    unit = "peak RSS above baseline" if args.device == "cpu" else "max_memory_allocated"
    columns, table = detail_table(rows)
    _common.print_table(f"Memory of one training step, MiB ({unit}; seq {args.seq} x batch {args.batch})",
                        columns, table, console)
    ratio_columns, ratio_rows = summary_table(ratios)
    _common.print_table("Peak of tier t / peak of tier 0", ratio_columns, ratio_rows, console)
    for key in dict.fromkeys(r["setting"] for r in rows):
        console.print(f"  {key}: {SETTINGS[key].describe()}")
    console.print(f"{len(measured)} measurements in {time.perf_counter() - started:.0f} s")
    if args.out:
        path = _common.write_json(args.out, {
            "benchmark": "memory",
            "complete": True,
            "unit": "bytes",
            "measure": unit,
            "settings": {k: dataclasses.asdict(s) | {"describe": s.describe()} for k, s in SETTINGS.items()},
            "budget_bytes": budget,
            "rows": rows,
            "ratios": ratios,
            "markdown": {"detail": _common.markdown_table(columns, table),
                         "ratios": _common.markdown_table(ratio_columns, ratio_rows)},
        })
        console.print(f"wrote {path}")
    if args.plot:
        console.print(f"wrote {plot_ratios(ratios, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
