"""Co-training versus training alone: does a tier-0 client gain from training together with tier-1 clients, and
does the tier-1 submodel beat a tier-1-width model trained alone? Held-out loss at equal steps.

The protocol is simulated IN ONE PROCESS with the network's own replica objects (aftermath.round.replica), so
an arm is fast and deterministic: every simulated client holds a Replica (tier 0: the universal model; tier t:
`sliced_model` of the same initial weights) with the run's update rule (DisTrO, or AdamW / Muon for
`--optimizer adamw|muon`). Each step every client trains on its own disjoint slice of the global batch and encodes a payload (real
bytes); every replica decodes all payloads (strict), aggregates them (region-normalised) and applies them, as
the network client does. After the run the replicas must agree bit for bit on the region they share (checked: a
cheap proof that the simulation is the protocol).

Data: step s, slot k reads sequences [s*G + k*b, s*G + (k+1)*b) of the train split (b = --batch, G = 4b), so a
client's share is the same sequences in every arm it appears in:
  L+S      tier 0 on slot 0, tier 1 on slot 1                (the fork's L+S)
  1+3      tier 0 on slot 0, three tier 1 on slots 1, 2, 3    (the fork's L+SSS)
  L-own    tier 0 alone on slot 0 (L's share of the tokens)
  L-all    tier 0 alone on slots 0 and 1 (all the tokens of L+S)
  S-own    a tier-1-width model alone on slot 1 (S's share)
  S-all    a tier-1-width model alone on slots 0 and 1 (all the tokens of L+S: the federated baseline)
  S-distill a tier-1-width model on slot 1 (S's share, S's steps) distilled from L-all's final model of the same
           seed (the best large model at equal total data): loss (1 - w) CE + w KL(teacher || student), w =
           --kd-weight; L-all runs first in the same invocation, or its saved model is reused (--teacher-dir)
  L+S2     tier-aware shares: tier 0 on slot 0, tier 1 on slots 1 and 2 (the small client is ~2x faster)
  S-own2   a tier-1-width model alone on slots 1 and 2
  L+S-help, 1+3-help   L+S and 1+3 in helper mode (the fork's disabled suffix sampling): on a share of the steps
           (--helper-share) each tier-1 client trains its prefix plus one window of --helper-window FFN neurons of
           the suffix per layer (the step's window, drawn per layer from the step), and its payload covers exactly
           that region; aggregation stays region-normalised (see SuffixWindows)
Held-out loss: `aftermath.evaluate` on the first --eval-batches x --eval-batch sequences of the val split, at
tier 0 and tier 1 of whichever model the arm holds.

Run:   .venv/bin/python bench/cotrain.py --out bench/results/cotrain.json      (small preset: long on a CPU)
Quick: .venv/bin/python bench/cotrain.py --quick --out /tmp/cotrain.json       (tiny preset, under a minute)
LR sweep: --lrs 3e-4,1e-3,3e-3 runs every arm at every learning rate.
More seeds later: --merge A.json B.json --out C.json combines earlier runs (same settings) into one report.
Wire and schedule: --topk, --one-bit, --chunk, --overlap (each step's gradient taken one step stale, as the
network's overlapped rounds do).
Muon: --orthogonalizer newton_schulz|polar_express, --muon-lr, --muon-bands nested|whole (whole: standard
whole-matrix Muon, tier-0-only arms).
Remedies: --apply-mode raw, --average-over covering, --joint (tier-0 clients train loss(tier 0) + loss(tier 1)
on the same batch, MatFormer's joint objective), --arms L+S2,S-own2 (tier-aware shares).
Local steps (issue 15): --local-steps H --inner-lr LR: each round is H inner AdamW steps per client and one
compressed pseudo-gradient (the network's own Replica.train); --steps counts inner steps, so arms compare at equal
tokens with H = 1, and --lr is the outer (sign-apply) lr.
Every exported tier trained (issue 23): --objectives own,sampled:0.5 runs each arm under each `train.objective`
(sampled:S = own_share S; the network's own code, Replica.train), evaluates tier 2 and the Mix'n'Match specs
between the tiers too, and --eval-every N records learning curves (--plot PNG draws them).
Claims at scale (issue 16): --arms L+S,1+3,L-own,L-all,S-own,S-all,S-distill,L+S-help --schedule cosine (the
network's lr schedule); --kd-weight for S-distill, --helper-window and --helper-share for the helper arms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SLOTS_PER_STEP = 4  # the global batch holds 4 slots of --batch sequences
EXPORT_TIERS = (0, 1, 2)  # what the run exports, so what the sampled objective trains and what is evaluated


@dataclass(frozen=True)
class ClientPlan:
    tier: int
    slots: tuple[int, ...]
    helper: bool = False  # helper mode: on some steps it also trains a window of the FFN suffix (see SuffixWindows)


ARMS: dict[str, tuple[ClientPlan, ...]] = {
    "L+S": (ClientPlan(0, (0,)), ClientPlan(1, (1,))),
    "1+3": (ClientPlan(0, (0,)), ClientPlan(1, (1,)), ClientPlan(1, (2,)), ClientPlan(1, (3,))),
    "L-own": (ClientPlan(0, (0,)),),
    "L-all": (ClientPlan(0, (0, 1)),),
    "S-own": (ClientPlan(1, (1,)),),
    "S-all": (ClientPlan(1, (0, 1)),),
    "S-distill": (ClientPlan(1, (1,)),),
    "L+S-help": (ClientPlan(0, (0,)), ClientPlan(1, (1,), helper=True)),
    "1+3-help": (ClientPlan(0, (0,)), *(ClientPlan(1, (k,), helper=True) for k in (1, 2, 3))),
    "L+S2": (ClientPlan(0, (0,)), ClientPlan(1, (1, 2))),
    "S-own2": (ClientPlan(1, (1, 2)),),
}
DEFAULT_ARMS = ("L+S", "1+3", "L-own", "L-all", "S-own")
TEACHER_ARM = {"S-distill": "L-all"}  # an arm distilled from another arm's final model (same settings and seed)


@dataclass(frozen=True)
class Settings:
    preset: str = "small"
    steps: int = 300
    seq_len: int = 128
    batch: int = 8  # sequences per slot
    optimizer: str = "distro"  # distro | adamw | muon
    lr: float = 1e-3
    schedule: str = "constant"  # optimizer.schedule: constant, or cosine down to 0.1 x lr at the last step
    apply_mode: str = "sign"
    average_over: str = "selected"
    topk: int = 32
    one_bit: bool = False  # 1-bit signs on the wire instead of raw values
    value_dtype: str = "float32"  # wire type of raw values (one_bit False): float32 | bfloat16 | float16
    chunk: int = 64
    momentum_decay: float = 0.999
    overlap: bool = False  # step s's gradient is taken before step s-1 is applied (the overlapped round)
    lookahead: bool = False  # overlapped: the gradient is taken at the weights plus the client's own guess of s-1
    joint: bool = False  # tier-0 clients also train the tier-1 width (sum of the two losses)
    objective: str = "own"  # train.objective: own | sampled | sum (every exported tier trained)
    own_share: float = 0.5  # train.own_share (sampled, sum)
    eval_every: int = 0  # > 0: held-out loss of every evaluated spec every this many steps (learning curves)
    orthogonalizer: str = "newton_schulz"  # muon
    muon_lr: float = 0.02
    muon_bands: str = "nested"
    eval_batches: int = 16
    eval_batch: int = 16
    threads: int = 1
    local_steps: int = 1  # optimizer.local_steps: `steps` counts inner steps, a round takes local_steps of them
    inner_lr: float = 1e-3  # optimizer.inner_lr (local_steps > 1)
    kd_weight: float = 0.5  # S-distill: the KL term's weight (the rest is cross-entropy on the tokens)
    helper_window: int = 64  # helper mode: FFN neurons of the suffix a helper trains on a helper step, per layer
    helper_share: float = 0.5  # helper mode: the share of steps that are helper steps


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int
    settings: Settings
    teacher: str | None = None  # L-all: where to save its final model; S-distill: where to load its teacher from


def teacher_path(directory: Path, settings: Settings, seed: int) -> Path:
    """Where L-all's final model of `settings` and `seed` is kept: named by a hash of every setting, so that a
    teacher trained under other settings is never reused."""
    import hashlib
    import json

    # what the teacher's training does not depend on stays out of the key
    trained = {k: v for k, v in asdict(settings).items() if k not in ("kd_weight", "eval_every", "eval_batches")}
    key = hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"L-all-{key}-seed{seed}.pt"


class SuffixWindows:
    """Helper mode in the simulation. On a helper step, layer l's window is FFN neurons [a_l, a_l + w) of the suffix
    (outside tier 1's prefix [0, W/2)); a_l is drawn from the seed, the step and the layer. Every universal tensor
    (the tier-0 replica's weights and momentum, each helper's suffix momentum) has the window's neurons swapped
    with neurons [W/2, W/2 + w) before the step and back after it: a permutation of FFN neurons (gate/up rows,
    down columns) computes the same function, and with w and a_l multiples of the DCT chunk it moves whole chunks,
    so the step in the swapped frame is the step with the window in place. In that frame the helper's region
    (prefix plus window) is the prefix spec `spec` (FFN width W/2 + w, tier 1's heads), so the protocol's own
    payloads and region-normalised aggregation carry it unchanged. Simplification: the helper reads the window's
    weights from the tier-0 replica (a network helper would need them sent)."""

    def __init__(self, cfg: Any, tier1: Any, width: int, share: float, seed: int, chunk: int) -> None:
        from aftermath.model.geometry import mix_spec

        self.full = cfg.matformer_base_intermediate_size
        self.half = tier1.ffn_widths[0]
        self.width = width
        self.share = share
        self.seed = seed
        if width <= 0 or width % chunk or (self.full - self.half) % width:
            raise ValueError(f"--helper-window {width} must be a positive multiple of the chunk {chunk} that "
                             f"divides the suffix width {self.full - self.half}")
        self.windows = (self.full - self.half) // width
        self.layers = cfg.num_hidden_layers
        self.spec = mix_spec(cfg, "helper", [self.half + width] * self.layers, list(tier1.q_heads))

    def starts(self, step: int) -> list[int] | None:
        """Each layer's window start at `step`, or None when `step` is not a helper step."""
        from aftermath.round.objective import unit_draw

        if unit_draw(self.seed, "helper-step", step) >= self.share:
            return None
        return [self.half + self.width * int(unit_draw(self.seed, "helper-window", step, layer) * self.windows)
                for layer in range(self.layers)]

    def swap(self, tensors: dict[str, Any], starts: list[int]) -> None:
        """Swap each layer's window with neurons [W/2, W/2 + w) in universal-shaped `tensors`, in place (its own
        inverse)."""
        import torch

        with torch.no_grad():
            for layer, a in enumerate(starts):
                if a == self.half:
                    continue
                for kind, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                    t = tensors.get(f"model.layers.{layer}.mlp.{kind}.weight")
                    if t is None:
                        continue
                    here = t.narrow(dim, self.half, self.width).clone()
                    t.narrow(dim, self.half, self.width).copy_(t.narrow(dim, a, self.width))
                    t.narrow(dim, a, self.width).copy_(here)

    def train(self, universal: Any, client: dict, seqs: Any, step: int, cfg: Any, run: Any) -> tuple[bytes, float]:
        """A helper step of `client` in the swapped frame: the prefix-plus-window model cut from `universal`, trained
        by the network's own Replica (objective included), its DisTrO momentum joined from the client's prefix
        momentum and its suffix momentum (kept in `client["suffix_momentum"]`, universal-shaped) and split back."""
        from aftermath.model.geometry import region_slices
        from aftermath.model.slicing import sliced_model
        from aftermath.round.replica import Replica

        replica = Replica.build(sliced_model(universal, self.spec), cfg, self.spec, run)
        own, store = client["replica"].rule.momentum, client["suffix_momentum"]
        joined = replica.rule.momentum
        for name, m in joined.items():
            m.copy_(store[name][region_slices(tuple(m.shape))])
            m[region_slices(tuple(own[name].shape))] = own[name]
        trained = replica.train(seqs, seqs.shape[0], step=step, client_id=client["id"])
        blob = replica.encode(trained.grads, step, client["id"])
        for name, m in joined.items():
            store[name][region_slices(tuple(m.shape))] = m
            own[name].copy_(m[region_slices(tuple(own[name].shape))])
        return blob, trained.loss


def run_config(s: Settings, run_id: str) -> Any:
    """The run config an arm's replicas are built from (no warmup; every arm of a run has the same schedule)."""
    from aftermath.runconfig import RunConfig

    overrides = {"run_id": run_id, "model.preset": s.preset, "optimizer.name": s.optimizer, "optimizer.lr": s.lr,
                 "optimizer.schedule": s.schedule, "optimizer.warmup_steps": 0,
                 "schedule.total_steps": s.steps // s.local_steps, "optimizer.local_steps": s.local_steps,
                 "optimizer.inner_lr": s.inner_lr,
                 "data.seq_len": s.seq_len, "train.objective": s.objective, "train.own_share": s.own_share,
                 "model.export_tiers": list(EXPORT_TIERS)}
    if s.optimizer == "distro":
        overrides["optimizer.distro"] = {"topk": s.topk, "one_bit": s.one_bit, "chunk": s.chunk,
                                         "value_dtype": s.value_dtype,
                                         "momentum_decay": s.momentum_decay,
                                         "apply_mode": s.apply_mode, "average_over": s.average_over}
    if s.optimizer == "muon":
        overrides["optimizer.dense"] = {"orthogonalizer": s.orthogonalizer, "muon_lr": s.muon_lr,
                                        "muon_bands": s.muon_bands}
    return RunConfig().with_overrides(overrides)


def run_job(job: Job) -> dict[str, Any]:
    """Train one arm for one seed; return the held-out losses and the replica-agreement check."""
    import torch

    from aftermath.data import TokenStream, default_data_dir
    from aftermath.evaluate import evaluate
    from aftermath.model import build_model, param_shapes, preset_config, tier_spec
    from aftermath.model.slicing import sliced_model
    from aftermath.round.objective import mix_specs_between
    from aftermath.round.replica import Replica

    s = job.settings
    torch.set_num_threads(s.threads)
    start = time.perf_counter()
    cfg = preset_config(s.preset)
    run_id = f"cotrain-{job.arm.replace('+', '.')}-{job.seed}"
    run = run_config(s, run_id)
    data_dir = default_data_dir()
    train = TokenStream(data_dir, s.seq_len, seed=job.seed, split="train", vocab_size=cfg.vocab_size)
    val = TokenStream(data_dir, s.seq_len, seed=0, split="val", vocab_size=cfg.vocab_size)
    init = build_model(cfg, seed=1000 + job.seed)
    specs = {t: tier_spec(cfg, t) for t in EXPORT_TIERS}
    if (s.objective != "own" or s.local_steps > 1) and (s.lookahead or s.joint or s.overlap):
        raise ValueError("--objectives other than own and --local-steps train through Replica.train: not with "
                         "--lookahead, --joint or --overlap")
    if s.steps % s.local_steps:
        raise ValueError(f"--steps {s.steps} must be a multiple of --local-steps {s.local_steps}")
    inner = s.local_steps

    clients = []
    for i, plan in enumerate(ARMS[job.arm]):
        model = init if plan.tier == 0 else sliced_model(init, specs[plan.tier])
        if plan.tier == 0 and any(c["plan"].tier == 0 for c in clients):
            raise ValueError("one tier-0 client per arm")
        clients.append({"id": f"c{i}", "plan": plan, "model": model, "spec": specs[plan.tier],
                        "replica": Replica.build(model, cfg, specs[plan.tier], run)})

    teacher = None
    if job.arm in TEACHER_ARM:
        if inner > 1 or s.lookahead or s.overlap or s.joint:
            raise ValueError(f"{job.arm} trains without --local-steps, --lookahead, --overlap and --joint")
        teacher = build_model(cfg)
        teacher.load_state_dict(torch.load(job.teacher, weights_only=True))
        teacher.eval()

    tier0 = next((c for c in clients if c["plan"].tier == 0), None)  # the arm's tier-0 client, if it has one
    helpers = [c for c in clients if c["plan"].helper]
    windows = None
    if helpers:
        if s.optimizer != "distro" or inner > 1 or s.lookahead or s.overlap or s.joint or tier0 is None:
            raise ValueError(f"{job.arm}: helper mode is simulated for DisTrO with a tier-0 client, without "
                             "--local-steps, --lookahead, --overlap and --joint")
        windows = SuffixWindows(cfg, specs[1], s.helper_window, s.helper_share, job.seed, s.chunk)
        for c in helpers:
            c["suffix_momentum"] = {n: torch.zeros(sh) for n, sh in param_shapes(cfg, specs[0]).items()}

    stride = SLOTS_PER_STEP * s.batch
    train_losses: list[tuple[int, float]] = []

    def apply_all(step: int, blobs: list) -> None:
        # every replica decodes and applies the same accepted set, as the network client does
        for c in clients:
            replica = c["replica"]
            replica.apply([replica.decode(data, step, cid, spec) for cid, spec, data in blobs], step)

    pending: tuple[int, list] | None = None  # overlapped: the step still to apply, and its payloads
    universal = tier0["model"] if tier0 is not None else None
    holder = universal if universal is not None else clients[0]["model"]
    # held-out loss at every exported tier the arm's model holds and the Mix'n'Match specs between them
    evaluated = [sp for sp in [*specs.values(), *mix_specs_between(cfg, EXPORT_TIERS)] if sp.fits_within(holder.spec)]
    curve: list[dict[str, Any]] = []

    def held_out() -> dict[str, float]:
        return {sp.name: evaluate(holder, val, sp, s.eval_batches, s.eval_batch).loss for sp in evaluated}

    def lookahead(c: dict, pending: tuple[int, list]) -> dict:
        step, blobs = pending
        replica = c["replica"]
        own = next(replica.decode(data, step, cid, spec) for cid, spec, data in blobs if cid == c["id"])
        update = replica.rule.aggregate([own])
        lr = replica.rule.schedule.lr(step)
        saved = {n: p.detach().clone() for n, p in c["model"].named_parameters()}
        with torch.no_grad():
            for n, p in c["model"].named_parameters():
                u = update[n]
                p[tuple(slice(0, d) for d in u.shape)] -= lr * torch.sign(u)
        return saved
    # a round (step) trains `inner` steps' worth of data: with local steps a client's batch is its slots of
    # inner steps step*inner .. step*inner + inner - 1, in order, which Replica.train splits into its inner batches
    for step in range(s.steps // inner):
        blobs = []
        step_loss = 0.0
        starts = windows.starts(step) if windows else None
        if starts:
            frame = [dict(universal.named_parameters()), tier0["replica"].rule.momentum,
                     *(c["suffix_momentum"] for c in helpers)]
            for tensors in frame:
                windows.swap(tensors, starts)
        for c in clients:
            model, plan = c["model"], c["plan"]
            seqs = torch.cat([train.sequences(i * stride + k * s.batch, i * stride + (k + 1) * s.batch)
                              for i in range(step * inner, (step + 1) * inner) for k in plan.slots])
            for p in model.parameters():
                p.grad = None
            saved = None
            if s.lookahead and pending is not None:
                # the gradient is taken where this client expects the weights once the step in flight lands:
                # the sign of its own last payload, at that step's lr (its replica is restored right after)
                saved = lookahead(c, pending)
            if starts and plan.helper:
                blob, loss = windows.train(universal, c, seqs, step, cfg, run)
                step_loss += loss
                blobs.append((c["id"], windows.spec, blob))
                continue
            if teacher is not None:
                step_loss += distill_backward(c["replica"], model, teacher, seqs, step, c["id"], s.kd_weight)
                grads = {n: p.grad for n, p in model.named_parameters()}
            elif s.objective == "own" and inner == 1:
                loss = model.loss(seqs[:, :-1], seqs[:, 1:])
                total = loss
                if s.joint and plan.tier == 0:
                    total = loss + model.loss(seqs[:, :-1], seqs[:, 1:], specs[1])
                total.backward()
                if saved is not None:
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            p.copy_(saved[n])
                step_loss += float(loss.detach())
                grads = {n: p.grad for n, p in model.named_parameters()}
            else:  # the network client's own training step, objective included
                trained = c["replica"].train(seqs, seqs.shape[0] // inner, step=step, client_id=c["id"])
                step_loss += trained.loss
                grads = trained.grads
            blobs.append((c["id"], c["spec"], c["replica"].encode(grads, step, c["id"])))
        if pending is not None:
            apply_all(*pending)
            pending = None
        if s.overlap:
            pending = (step, blobs)
        else:
            apply_all(step, blobs)
        if starts:
            for tensors in frame:
                windows.swap(tensors, starts)
        done = (step + 1) * inner  # inner steps trained so far: the x axis of every arm
        if step % 10 == 0 or done == s.steps:
            train_losses.append((step * inner, step_loss / len(clients)))
        if s.eval_every and done % s.eval_every < inner and done < s.steps:
            curve.append({"step": done, "val_loss": held_out()})

    if pending is not None:
        apply_all(*pending)
    if job.arm in TEACHER_ARM.values() and job.teacher:
        path = Path(job.teacher)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(universal.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a distilled arm never reads half a teacher
    # the replicas agree on the region they share (tier-0 client's universal weights vs each tier-1 replica)
    max_diff = 0.0
    if universal is not None:
        full = dict(universal.named_parameters())
        for c in clients:
            if c["plan"].tier == 0:
                continue
            for name, shape in param_shapes(cfg, c["spec"]).items():
                region = full[name].detach()[tuple(slice(0, d) for d in shape)]
                own = dict(c["model"].named_parameters())[name].detach()
                max_diff = max(max_diff, float((region - own).abs().max()))

    final = held_out()
    curve.append({"step": s.steps, "val_loss": final})
    result: dict[str, Any] = {"arm": job.arm, "seed": job.seed, "lr": s.lr, "objective": objective_label(s),
                              "tier0_loss": final.get("tier0"), "tier1_loss": final["tier1"],
                              "val_loss": final, "curve": curve}
    result.update(replicas_max_abs_diff=max_diff, train_losses=train_losses,
                  tokens_per_step={f"tier{c['plan'].tier}": len(c["plan"].slots) * s.batch * s.seq_len
                                   for c in clients},
                  seconds=round(time.perf_counter() - start, 1))
    return result


def distill_backward(replica: Any, model: Any, teacher: Any, seqs: Any, step: int, client_id: str,
                     kd_weight: float) -> float:
    """S-distill's gradient of one step into `model`'s .grad: every sequence at the spec the run's objective gives
    it (`replica.sequence_groups`, as S-own trains), loss (1 - w) CE + w KL(teacher at tier 0 || student) per
    token. Returns the step's cross-entropy."""
    import torch
    import torch.nn.functional as F

    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    with torch.no_grad():
        soft = F.log_softmax(teacher(inputs).float(), dim=-1)
    n = seqs.shape[0]
    for p in model.parameters():
        p.grad = None
    ce_sum = 0.0
    for group in replica.sequence_groups(n, step, client_id):
        rows = list(group.rows)
        logp = F.log_softmax(model(inputs[rows], None if group.spec == model.spec else group.spec), dim=-1)
        ce = F.nll_loss(logp.flatten(0, 1), targets[rows].flatten())
        kl = F.kl_div(logp.flatten(0, 1), soft[rows].flatten(0, 1), log_target=True, reduction="batchmean")
        ((1.0 - kd_weight) * ce + kd_weight * kl).mul(len(rows) / n * group.weight).backward()
        ce_sum += float(ce.detach()) * len(rows) * group.weight
    return ce_sum / n


def objective_label(s: Settings) -> str:
    return "own" if s.objective == "own" else f"{s.objective}:{s.own_share:g}"


def parse_objectives(text: str) -> list[tuple[str, float]]:
    """`own,sampled:0.5` -> [("own", 0.5), ("sampled", 0.5)]."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, share = item.partition(":")
        if name not in ("own", "sampled", "sum"):
            raise SystemExit(f"error: --objectives item {item!r}: use own, sampled[:SHARE] or sum[:SHARE], "
                             "e.g. own,sampled:0.5")
        try:
            value = float(share) if share else 0.5
        except ValueError:
            raise SystemExit(f"error: --objectives item {item!r}: the share after ':' must be a number in (0, 1]")
        if not 0 < value <= 1:
            raise SystemExit(f"error: --objectives item {item!r}: the share must be in (0, 1]")
        out.append((name, value))
    return out


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread per (arm, lr, objective) over the seeds."""
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["lr"], r.get("objective", "own")), []).append(r)
    rows = []
    for (arm, lr, objective), rs in groups.items():
        row: dict[str, Any] = {"arm": arm, "lr": lr, "objective": objective, "seeds": len(rs)}
        for key in ("tier0_loss", "tier1_loss"):
            vals = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.fmean(vals) if vals else None
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        row["seconds"] = statistics.fmean(r["seconds"] for r in rs)
        # how far the arm's tier 1 is behind its tier 0, seed by seed (tiers separate when this beats the spread)
        gaps = [r["tier1_loss"] - r["tier0_loss"] for r in rs if r["tier0_loss"] is not None]
        row["tier_gap"] = statistics.fmean(gaps) if gaps else None
        row["tier_gap_std"] = statistics.stdev(gaps) if len(gaps) > 1 else (0.0 if gaps else None)
        row["replicas_agree"] = all(r["replicas_max_abs_diff"] == 0.0 for r in rs)
        rows.append(row)
    order = list(ARMS)
    rows.sort(key=lambda r: (r["lr"], r["objective"], order.index(r["arm"])))
    return rows


def objective_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 23's view per (arm, lr, objective): the mean final held-out loss of every evaluated spec, whether
    each spec's mean learning curve fell at every evaluation, and each spec against tier 1."""
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in results:
        if "curve" in r:
            groups.setdefault((r["arm"], r["lr"], r.get("objective", "own")), []).append(r)
    rows = []
    for (arm, lr, objective), rs in sorted(groups.items()):
        names = list(rs[0]["val_loss"])
        steps = [p["step"] for p in rs[0]["curve"]]
        mean_curve = {n: [statistics.fmean(r["curve"][i]["val_loss"][n] for r in rs) for i in range(len(steps))]
                      for n in names}
        final = {n: mean_curve[n][-1] for n in names}
        rows.append({"arm": arm, "lr": lr, "objective": objective, "seeds": len(rs), "steps": steps,
                     "final": final, "curve": mean_curve,
                     "monotone": {n: all(b < a for a, b in zip(c, c[1:])) for n, c in mean_curve.items()},
                     "vs_tier1": {n: final[n] / final["tier1"] - 1 for n in names}})
    return rows


def plot_curves(rows: list[dict[str, Any]], path: str) -> list[str]:
    """Learning curves (held-out loss against step, mean over seeds): PATH has every evaluated spec, one panel per
    arm and objective; PATH's `-tiers` sibling has tier 0 and tier 1 of every arm side by side. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(rows))
    grid = -(-len(rows) // columns)
    fig, axes = plt.subplots(grid, columns, figsize=(5 * columns, 4 * grid), sharey=True, squeeze=False)
    for ax, row in zip(axes.flat, rows):
        for name, curve in row["curve"].items():
            ax.plot(row["steps"], curve, marker="o", ms=3, label=name,
                    linestyle="-" if name.startswith("tier") else "--")
        ax.set_title(f"{row['arm']}, objective {row['objective']} ({row['seeds']} seed(s))")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out loss")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

    tiers_path = str(Path(path).with_name(Path(path).stem + "-tiers" + Path(path).suffix))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, tier in zip(axes, ("tier0", "tier1")):
        for row in rows:
            if tier in row["curve"]:
                ax.plot(row["steps"], row["curve"][tier], marker="o", ms=3, label=f"{row['arm']} ({row['objective']})")
        ax.set_title(f"{tier}: held-out loss, mean over seeds")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss")
    fig.tight_layout()
    fig.savefig(tiers_path, dpi=100)
    plt.close(fig)
    return [path, tiers_path]


def claims(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per lr and seed: does the co-trained arm beat training alone? (positive gain = co-training is better)."""
    out = []
    for objective in sorted({r.get("objective", "own") for r in results}):
        subset = [r for r in results if r.get("objective", "own") == objective]
        out += [dict(g, objective=objective) for g in _claims(subset)]
    return out


def _claims(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["arm"], r["lr"], r["seed"]): r for r in results}
    out = []
    pairs = [("L+S", "tier0_loss", "L-own", "L-all"), ("1+3", "tier0_loss", "L-own", "L-all"),
             ("L+S2", "tier0_loss", "L-own", "L-all"),
             ("L+S", "tier1_loss", "S-own", None), ("1+3", "tier1_loss", "S-own", None),
             ("L+S", "tier1_loss", "S-all", None), ("L+S", "tier1_loss", "S-distill", None),
             ("L+S-help", "tier0_loss", "L+S", None), ("L+S-help", "tier1_loss", "L+S", None),
             ("1+3-help", "tier0_loss", "1+3", None), ("1+3-help", "tier1_loss", "1+3", None),
             ("L+S2", "tier1_loss", "S-own2", None)]
    lrs = sorted({r["lr"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    for lr in lrs:
        for arm, key, alone, best in pairs:
            gains, fractions = [], []
            for seed in seeds:
                a, b = by.get((arm, lr, seed)), by.get((alone, lr, seed))
                if a is None or b is None:
                    continue
                gains.append(b[key] - a[key])
                c = by.get((best, lr, seed)) if best else None
                if c is not None and b[key] != c[key]:
                    fractions.append((b[key] - a[key]) / (b[key] - c[key]))
            if gains:
                out.append({"lr": lr, "arm": arm, "tier": key[4], "versus": alone, "seeds": len(gains),
                            "gain_mean": statistics.fmean(gains), "wins": sum(g > 0 for g in gains),
                            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                            "fraction_of_all_tokens_gain": statistics.fmean(fractions) if fractions else None})
    return out


def report(results: list[dict[str, Any]], settings: Settings, quick: bool, lrs: list[float], seeds: list[int],
           arms: list[str], label: str, out: str, wall: float, console: Any, plot: str | None = None) -> Path:
    """Print the tables and write the JSON of a set of runs."""
    rows = summarise(results)
    gains = claims(results)

    def pm(mean: float | None, std: float | None) -> str | None:
        return None if mean is None else f"{mean:.4f} ± {std:.4f}"

    table_cols = ["arm", "lr", "objective", "seeds", "tier-0 val loss", "tier-1 val loss", "tier 1 - tier 0",
                  "replicas agree", "s/run"]
    table_rows = [[r["arm"], f"{r['lr']:g}", r["objective"], r["seeds"], pm(r["tier0_loss"], r["tier0_loss_std"]),
                   pm(r["tier1_loss"], r["tier1_loss_std"]), pm(r.get("tier_gap"), r.get("tier_gap_std")),
                   "yes" if r["replicas_agree"] else "NO", round(r["seconds"])] for r in rows]
    wire = (f"top-{settings.topk}{' 1-bit' if settings.one_bit else ' ' + settings.value_dtype}, "
            f"chunk {settings.chunk}, "
            f"decay {settings.momentum_decay:g}"
            f"{', overlapped' if settings.overlap else ''}{' + look-ahead' if settings.lookahead else ''}")
    if settings.optimizer == "muon":
        wire = f"{settings.orthogonalizer}, muon lr {settings.muon_lr:g}, {settings.muon_bands} bands"
    elif settings.optimizer == "adamw":
        wire = "dense gradients"
    if settings.local_steps > 1:
        wire += f", {settings.local_steps} local AdamW steps per round at inner lr {settings.inner_lr:g}"
    _common.print_table(f"Held-out loss after {settings.steps} steps ({settings.optimizer}, {settings.schedule} lr, "
                        f"{wire}, {settings.apply_mode}, "
                        f"{settings.average_over}{', joint' if settings.joint else ''})", table_cols, table_rows,
                        console)
    claim_cols = ["lr", "co-trained", "tier", "versus", "gain (nats, ± over seeds)", "wins", "share of L-all gain"]
    claim_rows = [[f"{g['lr']:g}", g["arm"], g["tier"], g["versus"], f"{g['gain_mean']:+.4f} ± {g['gain_std']:.4f}",
                   f"{g['wins']}/{g['seeds']}",
                   None if g["fraction_of_all_tokens_gain"] is None else f"{g['fraction_of_all_tokens_gain']:.2f}"]
                  for g in gains]
    if claim_rows:
        _common.print_table("Co-training gain over training alone (positive = co-training better)", claim_cols,
                            claim_rows, console)
    tiers = objective_rows(results)
    names = list(dict.fromkeys(n for t in tiers for n in t["final"]))  # an arm without tier 0 lacks its specs
    tier_cols = ["arm", "objective", "seeds", *names, *(f"{n} vs tier1" for n in names if n not in ("tier0", "tier1")),
                 "fell at every evaluation"]
    tier_rows = [[t["arm"], t["objective"], t["seeds"],
                  *(f"{t['final'][n]:.4f}" if n in t["final"] else "-" for n in names),
                  *(f"{t['vs_tier1'][n]:+.1%}" if n in t["final"] else "-" for n in names if n not in ("tier0", "tier1")),
                  ", ".join(n for n in names if t["monotone"].get(n)) or "none"] for t in tiers]
    if tier_rows:
        _common.print_table(f"Every evaluated spec, held-out loss at step {settings.steps} (mean over seeds)",
                            tier_cols, tier_rows, console)
    if plot and tiers:
        console.print(f"wrote {', '.join(plot_curves(tiers, plot))}")
    path = _common.write_json(out, {
        "benchmark": "cotrain", "label": label, "quick": quick, "complete": True,
        "settings": asdict(settings), "lrs": lrs, "seeds": seeds, "arms": arms,
        "wall_seconds": round(wall, 1), "rows": rows, "claims": gains, "tiers": tiers, "runs": results,
        "markdown": {"table": _common.markdown_table(table_cols, table_rows),
                     "claims": _common.markdown_table(claim_cols, claim_rows),
                     "tiers": _common.markdown_table(tier_cols, tier_rows)},
    })
    return path


def merge(paths: list[str], out: str, label: str, plot: str | None = None) -> int:
    """Combine the runs of earlier result files (their settings must agree) into one report."""
    import json

    from rich.console import Console

    datas = [json.loads(Path(p).read_text()) for p in paths]
    first = datas[0]["settings"]
    for p, d in zip(paths, datas):
        differ = {k for k in first if k not in ("lr", "objective", "own_share")
                  and d["settings"].get(k, first[k]) != first[k]}
        if differ:
            raise SystemExit(f"error: {p} was run with other settings ({sorted(differ)}); merge only runs that differ "
                             "in seeds or arms")
    results = [r for d in datas for r in d["runs"]]
    settings = Settings(**first)
    report(results, settings, False, sorted({r["lr"] for r in results}), sorted({r["seed"] for r in results}),
           sorted({r["arm"] for r in results}, key=list(ARMS).index), label or datas[0].get("label", ""), out,
           sum(d["wall_seconds"] for d in datas), Console(width=200), plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 20 steps, one seed: checks that it runs")
    ap.add_argument("--preset", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per arm (default 300)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per client share per step (default 8)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--optimizer", default="distro", choices=["distro", "adamw", "muon"])
    ap.add_argument("--orthogonalizer", default="newton_schulz", choices=["newton_schulz", "polar_express"],
                    help="Muon's orthogonaliser (default newton_schulz)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak lr for the banded matrices (default "
                    "0.02; --lr is then AdamW's, for the embedding and the norms)")
    ap.add_argument("--muon-bands", default="nested", choices=["nested", "whole"],
                    help="nested: each band between tier boundaries (any tier); whole: whole matrices (tier 0 only)")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default 1e-3 distro, 3e-3 adamw)")
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                    help="lr schedule: constant (default), or cosine down to 0.1 x lr at the last step (the network's)")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs: run every arm at each (an lr sweep)")
    ap.add_argument("--apply-mode", default="sign", choices=["sign", "raw"])
    ap.add_argument("--average-over", default="selected", choices=["selected", "covering"])
    ap.add_argument("--topk", type=int, default=32, help="DisTrO coefficients kept per chunk")
    ap.add_argument("--one-bit", action="store_true", help="send 1-bit signs instead of raw values")
    ap.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="wire type of the raw values without --one-bit (default float32)")
    ap.add_argument("--chunk", type=int, default=64, help="DisTrO chunk size")
    ap.add_argument("--momentum-decay", type=float, default=0.999, help="DisTrO momentum decay (default 0.999)")
    ap.add_argument("--overlap", action="store_true",
                    help="overlapped rounds: each step's gradient is taken before the previous step is applied")
    ap.add_argument("--lookahead", action="store_true",
                    help="with --overlap: take the gradient at the weights moved by the client's own last update")
    ap.add_argument("--local-steps", type=int, default=1, help="optimizer.local_steps H (distro): each round "
                    "is H inner AdamW steps per client, and --steps counts inner steps (equal tokens with H = 1)")
    ap.add_argument("--inner-lr", type=float, default=1e-3, help="optimizer.inner_lr with --local-steps > 1")
    ap.add_argument("--joint", action="store_true", help="tier-0 clients train loss(tier 0) + loss(tier 1)")
    ap.add_argument("--objectives", default="own", help="comma-separated train.objective values to run every arm "
                    "under: own, sampled[:OWN_SHARE], sum[:OWN_SHARE] (default own; e.g. own,sampled:0.5)")
    ap.add_argument("--eval-every", type=int, default=0, help="record held-out loss of every evaluated spec every "
                    "N steps (learning curves; default 0: at the end only)")
    ap.add_argument("--plot", default=None, help="write the learning curves (needs --eval-every) to this PNG")
    ap.add_argument("--kd-weight", type=float, default=0.5, help="S-distill: weight of the KL term against the "
                    "teacher (the rest is cross-entropy; default 0.5)")
    ap.add_argument("--helper-window", type=int, default=64, help="helper arms: FFN neurons of the suffix a "
                    "helper trains per layer on a helper step (a multiple of --chunk; default 64)")
    ap.add_argument("--helper-share", type=float, default=0.5, help="helper arms: the share of steps that are "
                    "helper steps (default 0.5)")
    ap.add_argument("--teacher-dir", default=None, help="where L-all's final models are kept for S-distill "
                    "(default: the aftermath cache's cotrain-teachers)")
    ap.add_argument("--eval-batches", type=int, default=None, help="val batches of --eval-batch (default 16)")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in this many processes at once")
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. 'raw apply')")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="run nothing: combine the runs of earlier --out files (same settings, e.g. more seeds)")
    ap.add_argument("--out", default="bench/results/cotrain.json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.label, args.plot)

    quick = args.quick
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    default_lr = 1e-3 if args.optimizer == "distro" else 3e-3
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr or default_lr]
    settings = Settings(
        preset=args.preset or ("tiny" if quick else "small"), steps=args.steps or (20 if quick else 300),
        seq_len=args.seq_len or (32 if quick else 128), batch=args.batch or (4 if quick else 8),
        optimizer=args.optimizer, lr=lrs[0], schedule=args.schedule, orthogonalizer=args.orthogonalizer,
        muon_lr=args.muon_lr,
        muon_bands=args.muon_bands, apply_mode=args.apply_mode, average_over=args.average_over,
        topk=args.topk, one_bit=args.one_bit, value_dtype=args.value_dtype, chunk=args.chunk, momentum_decay=args.momentum_decay,
        overlap=args.overlap, lookahead=args.lookahead, joint=args.joint, eval_every=args.eval_every,
        local_steps=args.local_steps, inner_lr=args.inner_lr, kd_weight=args.kd_weight,
        helper_window=args.helper_window, helper_share=args.helper_share,
        eval_batches=args.eval_batches or (2 if quick else 16),
        eval_batch=8 if quick else 16)
    seeds = [int(x) for x in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    objectives = parse_objectives(args.objectives)
    from aftermath.data.cache import cache_root
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else cache_root() / "cotrain-teachers"
    jobs = []
    for lr in lrs:
        for name, share in objectives:
            for seed in seeds:
                for arm in arms:
                    job_settings = replace(settings, lr=lr, objective=name, own_share=share)
                    saved = None
                    if arm in TEACHER_ARM or (arm in TEACHER_ARM.values() and any(a in TEACHER_ARM for a in arms)):
                        saved = str(teacher_path(teacher_dir, job_settings, seed))
                    jobs.append(Job(arm, seed, job_settings, saved))
    missing = [j for j in jobs if j.arm in TEACHER_ARM and TEACHER_ARM[j.arm] not in arms
               and not Path(j.teacher).is_file()]
    if missing:
        ap.error(f"{missing[0].arm} distils {TEACHER_ARM[missing[0].arm]}'s final model, which is not saved for these "
                 f"settings (seed {missing[0].seed}): add {TEACHER_ARM[missing[0].arm]} to --arms")
    # longest first, so two workers finish together
    weight = {a: sum(len(c.slots) * (1.0 if c.tier == 0 else 0.6) for c in ARMS[a]) for a in ARMS}
    weight.update({a: weight[a] + 0.5 for a in TEACHER_ARM})  # the teacher's forward
    jobs.sort(key=lambda j: -weight[j.arm])

    from rich.console import Console
    console = Console(width=200)
    console.print(f"co-training benchmark: {len(jobs)} runs ({len(arms)} arms x {len(seeds)} seeds x {len(lrs)} "
                  f"lrs), {settings.preset}, {settings.steps} steps, {args.jobs} processes")
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("spawn")
    # a distilled arm waits for its teacher's job (the same settings and seed) when this run trains the teacher
    waiting = [j for j in jobs if j.arm in TEACHER_ARM and TEACHER_ARM[j.arm] in arms]
    with ctx.Pool(max(1, min(args.jobs, len(jobs)))) as pool:
        running = [(j, pool.apply_async(run_job, (j,))) for j in jobs if j not in waiting]
        while running:
            done = [(j, a) for j, a in running if a.ready()]
            if not done:
                time.sleep(0.5)
                continue
            for j, a in done:
                running.remove((j, a))
                released = [w for w in waiting if TEACHER_ARM[w.arm] == j.arm and w.teacher == j.teacher]
                for w in released:
                    waiting.remove(w)
                    running.append((w, pool.apply_async(run_job, (w,))))
                r = a.get()
                results.append(r)
                console.print(f"  [{len(results)}/{len(jobs)}] {r['arm']:9s} seed {r['seed']} lr {r['lr']:g}: "
                              f"tier0 {r['tier0_loss'] if r['tier0_loss'] is None else round(r['tier0_loss'], 4)}  "
                              f"tier1 {r['tier1_loss']:.4f}  ({r['seconds']:.0f} s)")
    path = report(results, settings, quick, lrs, seeds, arms, args.label, args.out, time.perf_counter() - t0, console,
                  args.plot)
    console.print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
