"""One replica of the model: the weights of one tier (or the universal weights) and the run's update rule for
that tier, with the operations of a round that touch them: train a batch, encode the update, decode and apply
the accepted set, hash the weights, save and restore the replica state. The client holds a sliced tier, the
coordinator the universal replica; both build it with `Replica.build`.

Where things live. The replica itself (fp32 weights and the update rule's state) is always on the CPU, and every
replica applies a round there with the same code: that is what keeps a GPU client's replica bit-identical to a
CPU client's and to the coordinator's. A client that trains on a GPU (`device`) holds a second copy of the
weights there (`compute`), refreshed from the replica before each round; only the gradient is computed on it, in
the run's `train.precision` (torch.autocast, fp32 master weights), and it goes back to the CPU to be encoded.
With optimizer.local_steps > 1 the training weights (on the CPU, the replica's own, restored afterwards) take
the round's inner AdamW steps, and what goes back is the pseudo-gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from aftermath.errors import ConfigError, PayloadError
from aftermath.model import MatFormerConfig, MatFormerLM, TierSpec, param_shapes
from aftermath.model.loss import chunked_cross_entropy
from aftermath.optim import DenseConfig, DenseOptimizer, DistroConfig, DistroOptimizer, Payload, PayloadCodec
from aftermath.optim.rule import UpdateRule
from aftermath.optim.update import RoundUpdate, decode_update
from aftermath.round.objective import SequenceGroup, narrower_exported, split_batch
from aftermath.runconfig import RunConfig

log = logging.getLogger("aftermath.replica")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def optimizer_config(run: RunConfig) -> DistroConfig | DenseConfig:
    """The optimizer settings of a run (the [optimizer] section, with the run's length for the schedule)."""
    opt = run.optimizer
    # a short run (tests, a quick testnet) keeps its warmup shorter than itself
    warmup = min(opt.warmup_steps, max(0, run.schedule.total_steps - 1))
    common = dict(lr=opt.lr, schedule=opt.schedule, warmup_steps=warmup,
                  total_steps=run.schedule.total_steps, final_lr_fraction=opt.final_lr_fraction,
                  weight_decay=opt.weight_decay)
    try:
        if opt.name == "distro":
            if "local_steps" in opt.distro:
                raise ConfigError("local_steps is set as optimizer.local_steps, not in [optimizer.distro]")
            return DistroConfig(**common, local_steps=opt.local_steps, **opt.distro)
        return DenseConfig(algorithm=opt.name, **common, **opt.dense)
    except TypeError as exc:
        section = "distro" if opt.name == "distro" else "dense"
        raise ConfigError(f"[optimizer.{section}] has a key the {opt.name} optimizer does not know: {exc}") from exc


def build_update_rule(run: RunConfig, universal: MatFormerConfig, spec: TierSpec,
                      params: dict[str, torch.Tensor]) -> UpdateRule:
    """The run's update rule (keyed by optimizer.name) for a replica of `spec` holding `params`."""
    config = optimizer_config(run)
    if isinstance(config, DistroConfig):
        return DistroOptimizer(config, universal, spec, params)
    return DenseOptimizer(config, universal, spec, params)


def build_codec(run: RunConfig, universal: MatFormerConfig) -> PayloadCodec:
    """The codec that checks the run's payloads from its geometry alone (no model, no optimizer state)."""
    config = optimizer_config(run)
    return PayloadCodec.for_model(universal, config.wire(), config.chunk, config.min_chunk)


def weights_sha256(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """The replica hash: sha256 over the tensors in sorted-name order, each as its UTF-8 name followed by its
    raw little-endian bytes (in `dtype` if given, the checkpoint's dtype). Recomputable from a tier directory."""
    if sys.byteorder != "little":  # raw bytes are defined little-endian
        raise ConfigError("weights_sha256 needs a little-endian machine")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        if dtype is not None:
            t = t.to(dtype)
        h.update(name.encode("utf-8"))
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _device_copy(model: MatFormerLM, device: torch.device) -> MatFormerLM:
    """An empty model of `model`'s geometry on `device` (its weights are copied in before each step), with
    `model`'s buffers (RoPE frequencies): built there, they could differ in the last bit."""
    with torch.device(device):
        copy = MatFormerLM(model.config)
    with torch.no_grad():
        for dst, src in zip(copy.buffers(), model.buffers()):
            dst.copy_(src)
    return copy


def region_state(model: MatFormerLM, universal: MatFormerConfig, spec: TierSpec) -> dict[str, torch.Tensor]:
    """The tensors of `spec` held by `model` (sliced views when the model is wider than the spec)."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    return {name: state[name][tuple(slice(0, s) for s in shape)]
            for name, shape in param_shapes(universal, spec).items()}


def resolve_precision(setting: str, device: torch.device) -> str:
    """`train.precision` on `device`: auto = bf16 on a CUDA GPU that has it (compute capability 8 or more), fp16 on
    an older GPU (whose tensor cores are fp16's), fp32 on the CPU (most CPUs have no fast bf16 matmuls; one that
    does, AMX or AVX512-BF16, is better off with an explicit "bf16")."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def training_loss(model: MatFormerLM, part: torch.Tensor, spec: TierSpec | None, precision: str) -> torch.Tensor:
    """The mean next-token loss of `part` ([n, seq_len + 1] token ids) at `spec`, the forward in `precision`
    (weights stay fp32: autocast computes the matmuls in bf16 / fp16). Backward is the caller's."""
    dtype = AUTOCAST_DTYPES.get(precision)
    device = part.device.type
    with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
        hidden = model.hidden_states(part[:, :-1], spec)
    # The chunked loss computes its gradient in forward, (softmax - one-hot) / tokens, below fp16's smallest
    # number (~6e-8) for most of a 50k vocabulary: under fp16 it runs in fp32; bf16 has fp32's range.
    with torch.autocast(device, dtype=dtype) if precision == "bf16" else contextlib.nullcontext():
        return chunked_cross_entropy(hidden, model.head_weight(), part[:, 1:])


def backward_groups(model: MatFormerLM, batch: torch.Tensor, groups: list[SequenceGroup],
                    rows: list[Sequence[int]], micro_batch_size: int, precision: str, scale: float) -> list[float]:
    """Forward/backward of the rows `rows[i]` of `batch` at `groups[i]`'s spec, in micro-batches, accumulating into
    the parameters' `.grad`; each sequence's loss counts `group.weight / len(batch)` (times the loss `scale`). Run
    on every row, it is the whole step's gradient; run by each process of a data-parallel client on its share of
    the rows, the sum over processes is. Returns each group's sum of sequence losses over `rows`."""
    n = batch.shape[0]
    sums = []
    for group, mine in zip(groups, rows):
        spec = None if model.spec == group.spec else group.spec
        part_rows = batch if len(mine) == n else batch[list(mine)]
        total = 0.0
        for lo in range(0, part_rows.shape[0], micro_batch_size):
            part = part_rows[lo: lo + micro_batch_size]
            loss = training_loss(model, part, spec, precision)
            (loss * (part.shape[0] / n * group.weight * scale)).backward()
            total += loss.item() * part.shape[0]
        sums.append(total)
    return sums


class ParallelBackward(Protocol):
    """Where a client's step is computed by several processes (aftermath.client.data_parallel): `backward` leaves
    the whole batch's gradient in `model`'s `.grad` (as `backward_groups` over every row would) and returns each
    group's loss sum. `world`: how many processes compute."""

    world: int

    def backward(self, model: MatFormerLM, batch: torch.Tensor, groups: list[SequenceGroup],
                 micro_batch_size: int, precision: str, scale: float) -> list[float]: ...


@dataclass
class LossScale:
    """fp16's dynamic loss scale. The loss is multiplied by `scale` before backward so that small gradients do not
    flush to zero in fp16; a step whose gradients overflow is computed again at half the scale (so the payload
    always carries this batch's gradient), and `growth_interval` good steps in a row double it. Powers of two:
    unscaling is exact."""

    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    good_steps: int = 0

    def unscale(self, grads: list[torch.Tensor]) -> bool:
        """Divide `grads` by the scale in place; False (scale halved, nothing divided) when one is not finite and
        the step must run again. At scale 1 there is nothing left to halve: the overflow is fp16's range in
        forward, not the scale; the gradients are zeroed (the step is skipped, the payload stays valid)."""
        if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for g in grads:
                g.div_(self.scale)
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0
            return True
        self.good_steps = 0
        if self.scale > 1:
            self.scale /= 2
            return False
        log.warning("fp16: the gradients are not finite even unscaled; this client sends zero gradients this step "
                    "(set train.precision = \"bf16\" or \"fp32\" if it recurs)")
        for g in grads:
            g.zero_()
        return True


@dataclass
class TrainResult:
    grads: dict[str, torch.Tensor | None]
    loss: float
    sequences: int
    tokens: int
    seconds: float
    retries: int = 0  # fp16: forward/backward passes run again at a lower loss scale after an overflow
    processes: int = 1  # the processes that computed it (a data-parallel client's N)
    inner_steps: int = 1  # optimizer.local_steps: the inner steps taken (fewer when the share has fewer sequences)


def inner_batches(sequences: int, local_steps: int) -> list[range]:
    """The rows of a client's share each inner step trains: `local_steps` contiguous parts, sizes differing by
    at most one (a share smaller than `local_steps` takes one step per sequence)."""
    base, extra = divmod(sequences, local_steps)
    out, lo = [], 0
    for h in range(local_steps):
        size = base + (1 if h < extra else 0)
        if size:
            out.append(range(lo, lo + size))
        lo += size
    return out


class Replica:
    """A model holding `spec`'s weights (or wider: the universal model) and the run's update rule for `spec`."""

    def __init__(self, model: MatFormerLM, universal: MatFormerConfig, spec: TierSpec, run: RunConfig,
                 rule: UpdateRule, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 checkpointing: bool = False) -> None:
        if next(model.parameters()).device.type != "cpu":
            raise ConfigError("a replica's weights live on the CPU (the apply path is the same on every replica); "
                              "pass `device` for where it trains")
        self.model = model
        self.universal = universal
        self.spec = spec
        self.run = run
        self.rule = rule
        self.dtype = dtype  # the checkpoint dtype the replica hash is taken in
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(run.train.precision, self.device)
        self.loss_scale = LossScale() if self.precision == "fp16" else None
        self.compute = model if self.device.type == "cpu" else _device_copy(model, self.device)
        self.compute.activation_checkpointing = checkpointing
        self.parallel: ParallelBackward | None = None  # set by a data-parallel client (`client --nproc N`)
        self.local_steps = run.optimizer.local_steps
        # optimizer.local_steps > 1: the inner AdamW over the compute weights. Its state is this client's alone,
        # kept across rounds (as DiLoCo's inner optimizer is) and never part of the replica or a checkpoint.
        self.inner: torch.optim.AdamW | None = None

    @classmethod
    def build(cls, model: MatFormerLM, universal: MatFormerConfig, spec: TierSpec, run: RunConfig,
              state: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
              checkpointing: bool = False) -> "Replica":
        """The replica of `spec` around `model` (on the CPU), with the replica state of a checkpoint when given;
        it trains on `device` (default the CPU), with activation checkpointing per layer if asked."""
        rule = build_update_rule(run, universal, spec, {n: p.data for n, p in model.named_parameters()})
        if state is not None:
            rule.load_state_dict(state)
        return cls(model, universal, spec, run, rule, device=device, checkpointing=checkpointing)

    # ------------------------------------------------------------------ training
    def train(self, batch: torch.Tensor, micro_batch_size: int, *, step: int, client_id: str,
              lookahead: Payload | None = None) -> TrainResult:
        """Forward/backward of `batch` ([n, seq_len + 1] token ids), client `client_id`'s share of `step`, at
        this replica's spec, in micro-batches. Under `train.objective` "sampled" or "sum" the exported tiers
        inside this spec train too (aftermath.round.objective; "sampled" picks each sequence's tier from the
        step and the client).

        `lookahead` (overlapped rounds): this replica's own payload of the step still in flight. The gradient is
        then taken where the weights are expected once that step lands (the payload applied alone, as Psyche's
        look-ahead does), and the weights are restored bit for bit afterwards. Only for an update rule whose
        apply reads no state (DisTrO): applying a payload must leave nothing behind but the weights.

        With optimizer.local_steps H > 1 the round is H inner AdamW steps, one per part of `batch`
        (`inner_batches`), and what is returned as `grads` is the pseudo-gradient: the weights at the round's
        start minus after the H steps. The replica's weights are restored bit for bit afterwards: only the
        round's aggregate moves them."""
        start = time.perf_counter()
        self.compute.train()
        lookahead_used = lookahead is not None and not self.rule.state_dict()
        saved = None
        if lookahead_used or (self.local_steps > 1 and self.compute is self.model):
            saved = {n: p.detach().clone() for n, p in self.rule.params.items()}
        if lookahead_used:
            self.rule.aggregate_and_apply([lookahead], lookahead.step)
        try:
            if self.compute is not self.model:
                with torch.no_grad():  # the replica's weights now, the look-ahead's included
                    for name, p in self.compute.named_parameters():
                        p.copy_(self.rule.params[name])
            batch = batch.to(self.device)
            if self.local_steps == 1:
                groups = self.sequence_groups(batch.shape[0], step, client_id)
                result = self._forward_backward(batch, micro_batch_size, groups)
            else:
                result = self._local_round(batch, micro_batch_size, step, client_id)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for n, p in self.rule.params.items():
                        p.copy_(saved[n])
        result.seconds = time.perf_counter() - start
        return result

    def _local_round(self, batch: torch.Tensor, micro_batch_size: int, step: int, client_id: str) -> TrainResult:
        """H inner AdamW steps on the compute weights from where they are; returns the pseudo-gradient."""
        model = self.compute
        begin = {n: p.detach().clone() for n, p in model.named_parameters()}
        if self.inner is None:
            self.inner = torch.optim.AdamW(model.parameters(), lr=self.run.optimizer.inner_lr, betas=(0.9, 0.95),
                                           eps=1e-8, weight_decay=0.0)
        # the inner lr follows the run's warmup and schedule shape, scaled to inner_lr at its peak
        schedule = self.rule.schedule
        for group in self.inner.param_groups:
            group["lr"] = self.run.optimizer.inner_lr * schedule.lr(step) / schedule.peak_lr
        n = batch.shape[0]
        loss_sum, retries = 0.0, 0
        parts = inner_batches(n, self.local_steps)
        for h, rows in enumerate(parts):
            part = batch[rows.start:rows.stop]
            # each inner step draws its own tiers under the sampled objective
            groups = self.sequence_groups(len(rows), step * self.local_steps + h, client_id)
            inner = self._forward_backward(part, micro_batch_size, groups)
            self.inner.step()
            loss_sum += inner.loss * len(rows)
            retries += inner.retries
        with torch.no_grad():
            pseudo: dict[str, torch.Tensor | None] = {}
            for name, p in model.named_parameters():
                p.grad = None
                pseudo[name] = begin[name].sub_(p)
        return TrainResult(grads=pseudo, loss=loss_sum / max(1, n), sequences=n, tokens=n * (batch.shape[1] - 1),
                           seconds=0.0, retries=retries, processes=1 if self.parallel is None else self.parallel.world,
                           inner_steps=len(parts))

    def sequence_groups(self, sequences: int, step: int, client_id: str) -> list[SequenceGroup]:
        """Which rows of a batch of `sequences` train at which spec under the run's objective (own first)."""
        train = self.run.train
        narrower = narrower_exported(self.universal, self.spec, self.run.model.export_tiers)
        return split_batch(train.objective, train.own_share, self.spec, narrower, sequences, self.run.seed,
                           self.run.run_id, step, client_id)

    def _forward_backward(self, batch: torch.Tensor, micro_batch_size: int,
                          groups: list[SequenceGroup]) -> TrainResult:
        model = self.compute
        n = batch.shape[0]
        retries = 0
        while True:
            for p in model.parameters():
                p.grad = None
            scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
            if self.parallel is None:
                sums = backward_groups(model, batch, groups, [g.rows for g in groups], micro_batch_size,
                                       self.precision, scale)
            else:
                sums = self.parallel.backward(model, batch, groups, micro_batch_size, self.precision, scale)
            grads = {name: p.grad for name, p in model.named_parameters()}
            if self.loss_scale is None or self.loss_scale.unscale([g for g in grads.values() if g is not None]):
                break
            retries += 1
            log.info("fp16: gradients overflowed; computing the step again at loss scale %g", self.loss_scale.scale)
        # the loss reported is the own spec's (what the metrics compare across clients of a tier)
        own = groups[0] if groups[0].spec == self.spec else None
        loss = sums[0] / len(own.rows) if own is not None else sum(sums) / n
        return TrainResult(grads=grads, loss=loss, sequences=n, tokens=n * (batch.shape[1] - 1), seconds=0.0,
                           retries=retries, processes=1 if self.parallel is None else self.parallel.world)

    def encode(self, grads: dict[str, torch.Tensor | None], step: int, client_id: str) -> bytes:
        # the sender state (DisTrO's momentum) lives on the CPU, whatever device trains
        cpu = {n: None if g is None else g.detach().cpu() for n, g in grads.items()}
        return self.rule.encode(cpu, step, self.run.run_id, client_id)

    # ------------------------------------------------------------------ receiving
    def decode(self, data: bytes, step: int, client_id: str, spec: TierSpec | None) -> Payload:
        """Validate and decode one peer's payload (raises PayloadError naming what is wrong). `spec` None: a
        Mix'n'Match sender, whose spec travels in the payload."""
        return self.rule.codec.decode(data, self.run.run_id, step, client_id, spec, self.run.network.max_blob_bytes)

    def apply(self, payloads: list[Payload], step: int) -> None:
        """Aggregate the round's accepted set and apply it (the same bits on every replica, whatever the order
        the payloads are given in). On a PayloadError nothing has been applied."""
        if any(p.step != step for p in payloads):
            raise PayloadError(f"a payload of another step was given to aggregate step {step}")
        self.rule.aggregate_and_apply(sorted(payloads, key=lambda p: p.client_id), step)

    def round_update(self, payloads: list[Payload], step: int, accepted: str) -> RoundUpdate:
        """The round's update computed from its accepted set (`accepted`: its accepted_digest), in this replica's
        shapes: the universal replica's is the blob the coordinator publishes. Nothing is applied."""
        if any(p.step != step for p in payloads):
            raise PayloadError(f"a payload of another step was given to aggregate step {step}")
        return self.rule.round_update(sorted(payloads, key=lambda p: p.client_id), step, self.run.run_id, accepted)

    def decode_update(self, data: bytes, step: int) -> RoundUpdate:
        """Validate and decode the coordinator's update blob of `step` (raises PayloadError)."""
        return decode_update(data, self.rule.codec.plan, run_id=self.run.run_id, step=step,
                             kind=self.rule.update_kind)

    def apply_update(self, update: RoundUpdate, step: int) -> None:
        """Apply a round's update: the same bits as `apply` of the payloads it was computed from."""
        if update.step != step:
            raise PayloadError(f"the update of step {update.step} was given to apply step {step}")
        self.rule.apply_update(update, step)

    # ------------------------------------------------------------------ identity and state
    def weights_sha256(self, spec: TierSpec | None = None) -> str:
        return weights_sha256(region_state(self.model, self.universal, spec or self.spec), self.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The replica state beyond the weights: what the update rule's apply reads (see aftermath.optim.rule)."""
        return self.rule.state_dict()
