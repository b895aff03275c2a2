"""The client's round loop: follow the coordinator's state and do this client's part of each phase.

    join -> (Warmup) fetch the current model of its tier, say ready
         -> (RoundTrain) tokens of its batch range -> forward/backward -> DisTrO payload -> commit with it
         -> (RoundWitness) fetch the round -> apply -> say applied
         -> (Cooldown) report the replica hash -> ... -> (Finished) exit

The client follows its own view of the run (GET /view: the same size whatever the number of clients). A round
reaches it by one of two data planes (aftermath.coordinator.distribution), with the same bits either way: the
accepted payloads (GET /rounds/{step} names them; it verifies every signature, decodes, aggregates and applies),
or the round's update blob the coordinator computed once (it applies that alone). A witness of a round applies
the update too, then, in the background, fetches the payloads and attests whether the update is their own
(POST /witness).

With overlapped rounds (`schedule.overlap`, the default) step t+1 opens as soon as step t's accepted set is
fixed: the client trains t+1 while t's results download in the background, then commits t+1, and only then
decodes, aggregates and applies t. Its weights are still before step t, so it takes the gradient where they will
be: its own payload of step t applied alone (Psyche's look-ahead; the replica is restored bit for bit after).
Time a fast client would spend waiting for a slower peer's commit goes into training. Without overlap the
client applies t in RoundWitness before t+1 opens. The next step's batch is fetched while this one trains
(`t_prefetch` and `t_download` in its RoundRecord).
Each action is idempotent (it checks what it already did), so a repeated or missed state update is harmless.
Every message is a model of aftermath.round.protocol. The warmup loads the tier's weights AND its cut of the
optimizer state from the checkpoint, so a late joiner or a resynced client applies rounds exactly as the others.

Trust and faults: the client makes an ed25519 keypair at join, signs every commitment, and verifies the
signature of every result of an accepted set before applying it. A replica the coordinator finds to differ at an
epoch end is dropped and reloaded from the checkpoint. A coordinator that stays unreachable for
`give_up_after` seconds ends the client with an error saying so. Fault injection (aftermath.faults) lives in the
transport; test hooks (crash, perturb, attack) reach the round through one seam (aftermath.client.hooks). A client
the coordinator's screen excluded ends with ExcludedError (exit status 3) and the reason.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import posixpath
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import torch

from aftermath.checkpoint.hf_dir import load_model_dir
from aftermath.checkpoint.manifest import Manifest
from aftermath.checkpoint.optimizer_state import OPTIMIZER_STATE_FILE, load_optimizer_state
from aftermath.checkpoint.schema import schema_hash
from aftermath.client.data_parallel import DataParallelGroup
from aftermath.client.decisions import DecisionCheck
from aftermath.client.hooks import RoundHooks, TestHooks
from aftermath.client.transport import CoordinatorError, Transport, Unreachable
from aftermath.crypto import SignatureError, Signer, verify_commitment
from aftermath.errors import AftermathError, CheckpointError, ConfigError, DataParallelError, ExcludedError
from aftermath.faults import FaultConfig, FaultInjector
from aftermath.metrics import MetricsWriter, peak_memory_bytes
from aftermath.model import MatFormerConfig, TierSpec, parameter_count, parse_spec, tier_spec
from aftermath.model.geometry import max_tier
from aftermath.model.geometry import region_slices
from aftermath.model.loss import chunk_tokens
from aftermath.optim.update import RoundUpdate
from aftermath.round.protocol import (AppliedRequest, CheckpointAnswer, ClientRoundView, ClientView, CommitRequest,
                                      HashAnswer, HashRequest, HeartbeatRequest, JoinAnswer, JoinRequest, OkAnswer,
                                      ReadyRequest, RoundDetail, RoundRecord, RunInfo, UpdateView, WitnessRequest)
from aftermath.round.replica import Replica, resolve_precision
from aftermath.runconfig import RunConfig, parse_run_config

log = logging.getLogger("aftermath.client")


@dataclass
class ClientOptions:
    coordinator: str
    token: str
    tier: int | None = 0  # None with spec=None: auto
    spec: str | None = None
    name: str = ""
    device: str = "cpu"  # auto, cpu, cuda or cuda:N (resolve_device)
    memory_limit: int | None = None  # bytes the step may use (--tier auto, micro-batch auto); default: free memory
    work_dir: Path = Path(".aftermath-client")
    metrics_path: Path | None = None
    threads: int | None = None  # default: the run's train.threads (each process's, with nproc > 1)
    nproc: int = 1  # processes (one per device) that compute each step together (aftermath.client.data_parallel)
    give_up_after: float = 300.0  # end with an error when the coordinator stays unreachable this long (at start too)
    on_update: Callable[[dict[str, Any]], None] | None = None  # called with each metrics record
    faults: FaultConfig | None = None  # injected latency, loss, bandwidth (aftermath.faults)
    crash_at: tuple[int, str] | None = None  # test hook: SIGKILL itself at (step, phase) (aftermath.client.hooks)
    perturb_at: int | None = None  # test hook: perturb its weights after applying this step
    attack: str | None = None  # test hook: commit poisoned payloads (aftermath.client.hooks.ATTACKS)
    ssl: Any = None  # how the coordinator's certificate is checked (aftermath.tls.client_ssl); None: system CAs
    coordinator_key: str | None = None  # the coordinator's pinned ed25519 key; None: the run info's (decisions.py)

    def hooks(self, before_crash: Callable[[], None]) -> RoundHooks:
        if self.crash_at is None and self.perturb_at is None and self.attack is None:
            return RoundHooks()
        return TestHooks(self.crash_at, self.perturb_at, before_crash, self.attack)


# ------------------------------------------------------------------------------------------ device and memory
HEADROOM = 0.85  # the share of a memory budget a step's estimate may fill: the estimate's error, allocator slack,
                 # and what a round holds beside the step (payloads, the next batch)


def resolve_device(text: str) -> torch.device:
    """The training device of `--device` (auto, cpu, cuda, cuda:N), checked before anything is joined: an absent
    or malformed device is one ConfigError naming it and the fix."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N (N = a GPU's index)")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"--device {text}: torch sees no CUDA GPU (torch {torch.__version__}, {build}); use "
                          f"--device cpu, or install a CUDA build of torch and check nvidia-smi")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text}: there are {torch.cuda.device_count()} CUDA GPU(s), indexed from 0; use "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def available_memory(device: torch.device) -> int:
    """Free memory of the training device: the GPU's own (not the host's) for a CUDA device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_memory(config: MatFormerConfig, spec: TierSpec, micro_batch: int, seq_len: int,
                    optimizer: str = "distro", *, precision: str = "fp32", checkpointing: bool = False,
                    gpu: bool = False, local: bool = False) -> int:
    """Estimated peak bytes of one training step of a sliced tier on its training device.

    On the CPU: fp32 weights, gradients, the update rule's state (AdamW/Muon 2 copies, DisTrO's momentum 1), and
    the activations. On a GPU the replica and the state stay in host memory (aftermath.round.replica): the device
    holds a training copy of the weights, the gradients and the activations. Activations, in bytes per token and
    layer, as counted from what autograd saves (`d` model width, `f` the layer's FFN width, `a` its query heads x
    head_dim): fp32 16d + 12f + 16a; bf16/fp16 18d + 6f + 8a, plus a half-precision copy of each layer's weights;
    with checkpointing only each layer's input (4d) is kept and one layer's activations are recomputed at a time.
    The loss (aftermath.model.loss) adds a vocabulary x width fp32 head gradient held from forward to backward,
    12d per token, and its larger transient: a chunk's fp32 logits (one, softmax runs in place, plus a
    half-precision copy) or, in backward, two more vocabulary x width copies (the tied embedding's gradients).
    `local` (optimizer.local_steps > 1): the inner AdamW's two moments and the round's starting weights where it
    trains, and on the CPU the weights restored after the round too."""
    params = parameter_count(config, spec)
    state = 1 if optimizer == "distro" else 2
    if local:  # the inner AdamW's moments and the round's starting weights, where it trains
        state += 3
    d, vocab, tokens = config.hidden_size, config.vocab_size, micro_batch * seq_len
    half = precision in ("bf16", "fp16")
    per_layer = []
    for g in spec.layers:
        a = g.q_heads * config.head_dim
        per_token = 18 * d + 6 * g.ffn_width + 8 * a if half else 16 * d + 12 * g.ffn_width + 16 * a
        per_layer.append(per_token * tokens)
    layer_weights = (params - vocab * d * (1 if config.tie_word_embeddings else 2)) * 2 if half else 0
    layers = len(per_layer) * 4 * d * tokens + max(per_layer) if checkpointing else sum(per_layer)
    head = vocab * d * 4
    loss = head + 12 * d * tokens + max(min(tokens, chunk_tokens(vocab)) * vocab * (6 if half else 4), 2 * head)
    held = params * 4 * ((2 + 3 * local) if gpu else 2 + state + local)  # local, CPU: the weights to restore too
    return held + layers + layer_weights + loss


def host_memory(config: MatFormerConfig, spec: TierSpec, optimizer: str = "distro") -> int:
    """A GPU client's host memory beyond torch itself: the replica's fp32 weights, the update rule's state and the
    gradients brought back from the GPU to be encoded."""
    return parameter_count(config, spec) * 4 * (2 + (1 if optimizer == "distro" else 2))


def choose_tier(config: MatFormerConfig, budget: int, micro_batch: int, seq_len: int, optimizer: str, *,
                precision: str = "fp32", gpu: bool = False, local: bool = False) -> int:
    """The widest tier whose estimated step fits `budget` bytes (raises when not even the smallest fits)."""
    def need(t: int) -> int:
        return estimate_memory(config, tier_spec(config, t), micro_batch, seq_len, optimizer, precision=precision,
                               gpu=gpu, local=local)

    for t in range(max_tier(config) + 1):
        if need(t) <= budget:
            return t
    raise ConfigError(f"even the smallest tier ({max_tier(config)}) needs about {need(max_tier(config)) / 2**20:.0f} "
                      f"MiB at micro-batch {micro_batch}, more than the {budget / 2**20:.0f} MiB usable; free memory, "
                      f"give --memory-limit, or lower train.micro_batch_size")


@dataclass(frozen=True)
class MicroBatchPlan:
    """How a client trains its share of a step: micro-batches of `size` sequences (gradients accumulate), with
    activation checkpointing per layer or not; `need`: the estimated peak bytes on the training device."""

    size: int
    checkpointing: bool
    need: int


def choose_micro_batch(config: MatFormerConfig, spec: TierSpec, budget: int, seq_len: int, optimizer: str,
                       largest: int, *, precision: str = "fp32", gpu: bool = False,
                       local: bool = False) -> MicroBatchPlan | None:
    """The largest power of two, at most `largest` (a client never trains more sequences per step), whose
    estimated step fits `budget`; with activation checkpointing only when not even 1 fits without. None when
    nothing fits. Powers of two split the usual power-of-two shares of a global batch evenly."""
    for checkpointing in (False, True):
        size = 1 << (max(1, largest).bit_length() - 1)
        while size >= 1:
            need = estimate_memory(config, spec, size, seq_len, optimizer, precision=precision,
                                   checkpointing=checkpointing, gpu=gpu, local=local)
            if need <= budget:
                return MicroBatchPlan(size, checkpointing, need)
            size //= 2
    return None


# ------------------------------------------------------------------------------------------ the client
@dataclass
class ClientState:
    model_step: int = -1  # the step the local weights are at (-1: no model yet)
    committed_step: int = -1
    applied_step: int = -1
    reported_epoch: int = -1
    ready_epoch: int = -1
    last_loss: float | None = None
    tokens: int = 0
    rounds: int = 0
    train_seconds: float = 0.0
    resynced_epoch: int = -1  # the last divergence (epoch) this client reacted to
    resyncs: int = 0


class TrainingClient:
    def __init__(self, options: ClientOptions) -> None:
        self.opts = options
        self.state = ClientState()
        self.metrics = MetricsWriter(options.metrics_path)
        self.client_id = ""
        self.run: RunConfig | None = None
        self.config: MatFormerConfig | None = None  # the universal config
        self.spec: TierSpec | None = None
        self.replica: Replica | None = None
        self.transport: Transport | None = None
        self.stream = None  # a local TokenStream when data.source = "local"
        self.data_id: str | None = None
        self.version = -1
        self.phase = ""
        self.pending_timing: dict[int, dict[str, Any]] = {}  # step -> timings of its training, until applied
        self.prefetched: dict[str, Any] = {}  # blob sha -> decoded payload of a round not applied yet
        self.details: dict[int, RoundDetail] = {}  # step -> its accepted set (payloads plane, witnesses)
        self.witnessing: set[asyncio.Task] = set()  # witness checks running in the background
        self.updates: dict[int, RoundUpdate] = {}  # step -> its decoded update blob (update plane)
        self.own_blobs: dict[str, tuple[int, bytes]] = {}  # sha -> (step, payload) of its own, until applied
        self.peer_payloads: list = []  # the last applied round's payloads, kept only for the replay attack hook
        self.overhead = 0.0  # the last round's seconds outside training on the critical path (sent at commit)
        self.batch_ahead: tuple[int, int, asyncio.Task] | None = None  # sequences [lo, hi) fetched for the next step
        self.t_prefetch = 0.0
        self.failures = 0  # refused calls and failed transfers (reported in the stats)
        self.faults = FaultInjector(options.faults) if options.faults is not None and options.faults.active else None
        self.signer = Signer()  # a fresh keypair for every join
        self.decisions: DecisionCheck | None = None  # checks the coordinator's signatures; set at join
        self.hooks = options.hooks(before_crash=self.metrics.close)
        self.device = resolve_device(options.device)
        if self.device.type == "cuda":  # fp32 matmuls (precision fp32, and the loss under fp16) in TF32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.plan: MicroBatchPlan | None = None  # chosen at the first join, kept across joins
        self.parallel: DataParallelGroup | None = None  # the other processes of this client (--nproc N)

    # ------------------------------------------------------------------ entry
    async def run_async(self) -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.opts.ssl or True)) as session:
            self.transport = Transport(self.opts.coordinator, session, faults=self.faults)
            await self._join()
            beat = asyncio.create_task(self._heartbeats())
            try:
                if self.opts.nproc > 1:  # its workers start while the heartbeats keep the session
                    self.parallel = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                        DataParallelGroup, self.opts.nproc, self.device, self.opts.threads or self.run.train.threads))
                result = await self._loop()
                if self.witnessing:  # the last rounds' verdicts, before the session closes
                    await asyncio.wait(self.witnessing, timeout=30)
                return result
            finally:
                beat.cancel()
                if self.parallel is not None:
                    self.parallel.close()
                self.metrics.close()

    def run_blocking(self) -> dict[str, Any]:
        return asyncio.run(self.run_async())

    # ------------------------------------------------------------------ joining
    async def _run_info(self) -> RunInfo:
        """The run and model config (GET /run), retried while the coordinator is starting."""
        started = time.monotonic()
        said = started
        while True:
            try:
                return await self.transport.call_model("GET", "/run", None, RunInfo, auth=False)
            except (Unreachable, CoordinatorError) as exc:
                waited = time.monotonic() - started
                if waited > self.opts.give_up_after:
                    raise Unreachable(f"cannot reach the coordinator at {self.opts.coordinator} after "
                                      f"{waited:.0f}s ({exc}); check the URL and that the coordinator runs "
                                      f"(giving up after --give-up-after {self.opts.give_up_after:g}s)") from exc
                if time.monotonic() - said >= 10:
                    said = time.monotonic()
                    log.warning("waiting for the coordinator at %s (%.0fs so far): %s", self.opts.coordinator,
                                waited, exc)
                await asyncio.sleep(0.5)

    async def _join(self) -> None:
        info = await self._run_info()
        config = MatFormerConfig.from_dict(info.model_config_)
        run = parse_run_config(info.run, source="the coordinator's run config")
        pinned = self.opts.coordinator_key
        if pinned and info.coordinator_key != pinned:  # before the token is sent
            raise ConfigError(f"the coordinator at {self.opts.coordinator} has key {info.coordinator_key[:16]}..., "
                              f"not the pinned {pinned[:16]}... (--coordinator-key): another server answers at this "
                              f"address, or the run's operator made a new identity; check the key it printed")
        self.decisions = DecisionCheck(info.coordinator_key, run.run_id)
        tier, spec_text = self.opts.tier, self.opts.spec
        budget = self.opts.memory_limit or available_memory(self.device)
        if self.spec is not None:  # a join again: the tier and micro-batch chosen at the first stay
            tier = self.spec.tier
        elif tier is None and spec_text is None:  # --tier auto
            micro = run.train.micro_batch_size
            tier = choose_tier(config, int(budget * HEADROOM), 1 if micro == "auto" else micro, run.data.seq_len,
                               run.optimizer.name, precision=resolve_precision(run.train.precision, self.device),
                               gpu=self.device.type == "cuda", local=run.optimizer.local_steps > 1)
            log.info("--tier auto: %.0f MiB available on %s -> tier %d", budget / 2**20, self.device, tier)
        spec = tier_spec(config, tier) if tier is not None else parse_spec(config, spec_text)
        self.signer = Signer()
        request = JoinRequest(token=self.opts.token, name=self.opts.name, device=str(self.device),
                              memory_bytes=budget,
                              throughput=1.0 * 2 ** (spec.tier or 0) * self.opts.nproc,
                              schema_hash=schema_hash(config),
                              public_key=self.signer.public_hex, tier=tier, spec=None if tier is not None else spec_text)
        answer = await self.transport.call_model("POST", "/join", request, JoinAnswer, auth=False)
        self.transport.auth = answer.session
        self.client_id = answer.client_id
        self.run = parse_run_config(answer.run, source="the coordinator's run config")
        self.config = MatFormerConfig.from_dict(answer.model_config_)
        self.spec = spec
        torch.set_num_threads(self.opts.threads or self.run.train.threads)
        if self.run.data.source == "local":
            from aftermath.data import TokenStream, default_data_dir

            data_dir = Path(self.run.data.dir) if self.run.data.dir else default_data_dir()
            self.stream = TokenStream(data_dir, self.run.data.seq_len, seed=self.run.seed, split="train",
                                      vocab_size=self.config.vocab_size)
        log.info("joined as %s (%s), status %s", self.client_id, spec.name, answer.status)
        self._record(event="joined", status=answer.status)
        if self.plan is None:
            self._plan_memory(budget)

    def _plan_memory(self, budget: int) -> None:
        """The micro-batch (train.micro_batch_size, or the largest that fits `budget` for "auto") and whether to
        checkpoint activations; said in the metrics (event memory_plan) and in every heartbeat's stats."""
        run, config, spec = self.run, self.config, self.spec
        gpu = self.device.type == "cuda"
        precision = resolve_precision(run.train.precision, self.device)
        common = dict(precision=precision, gpu=gpu, local=run.optimizer.local_steps > 1)
        micro = run.train.micro_batch_size
        if micro != "auto":
            plan = MicroBatchPlan(micro, False, estimate_memory(config, spec, micro, run.data.seq_len,
                                                                run.optimizer.name, **common))
        else:
            plan = choose_micro_batch(config, spec, int(budget * HEADROOM), run.data.seq_len, run.optimizer.name,
                                      run.schedule.global_batch_size, **common)
            if plan is None:  # the tier was asked for: try it at the least memory it can train in
                plan = MicroBatchPlan(1, True, estimate_memory(config, spec, 1, run.data.seq_len, run.optimizer.name,
                                                               checkpointing=True, **common))
                log.warning("%s needs about %.0f MiB at micro-batch 1 with activation checkpointing, more than the "
                            "%.0f MiB usable on %s: trying anyway (a smaller tier, or --tier auto, would fit)",
                            spec.name, plan.need / 2**20, budget * HEADROOM / 2**20, self.device)
        host = host_memory(config, spec, run.optimizer.name) if gpu else 0
        if host > available_memory(torch.device("cpu")):
            log.warning("%s keeps its replica and optimizer state in host memory: about %.0f MiB, more than the "
                        "%.0f MiB free", spec.name, host / 2**20, available_memory(torch.device("cpu")) / 2**20)
        self.plan = plan
        log.info("training on %s in %s: micro-batches of %d%s (about %.0f MiB of %.0f MiB)", self.device, precision,
                 plan.size, ", activation checkpointing" if plan.checkpointing else "", plan.need / 2**20,
                 budget / 2**20)
        self._record(event="memory_plan", device=str(self.device), precision=precision, micro_batch=plan.size,
                     micro_batch_setting=str(micro), checkpointing=plan.checkpointing, estimate_bytes=plan.need,
                     host_estimate_bytes=host, budget_bytes=budget)

    async def _heartbeats(self) -> None:
        interval = self.run.schedule.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.transport.call("POST", "/heartbeat", HeartbeatRequest(stats=self._stats()).model_dump(),
                                          timeout=10)
            except (CoordinatorError, Unreachable):  # a lost session or coordinator is the loop's to handle
                continue

    def _stats(self) -> dict[str, Any]:
        s = self.state
        t = self.transport.stats
        return {"loss": s.last_loss, "bytes_up": t.bytes_up, "bytes_down": t.bytes_down, "tokens": s.tokens,
                "tokens_per_s": round(s.tokens / s.train_seconds, 1) if s.train_seconds else None,
                "peak_memory": self._peak_memory(), "step": s.model_step, "phase": self.phase,
                "micro_batch": self.plan.size if self.plan else None,
                "precision": self.replica.precision if self.replica else None,
                "failures": self.failures, **{f"faults_{k}": v for k, v in self._faults().items()}}

    def _peak_memory(self) -> int:
        """Peak memory of the training device: the GPU's allocations on CUDA (what decides whether a step fits),
        else this process's peak RSS."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_memory_bytes()

    def _faults(self) -> dict[str, int]:
        c = self.faults.counters if self.faults is not None else None
        return {"latency": c.latency if c else 0, "dropped": c.dropped if c else 0,
                "throttled": c.throttled if c else 0}

    def _passed(self, step: int, phase: str) -> None:
        """The test hooks' one seam (aftermath.client.hooks); production hooks do nothing."""
        done = self.hooks.passed(step, phase, self.replica)
        if done is not None:
            self._record(event=done, step=step)

    def _record(self, **fields: Any) -> None:
        record = self.metrics.write(client_id=self.client_id, tier=self.spec.tier if self.spec else None,
                                    spec=self.spec.name if self.spec else None, **fields)
        if self.opts.on_update is not None:
            self.opts.on_update(record)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> dict[str, Any]:
        unreachable_since: float | None = None
        while True:
            try:
                snap = await self.transport.call_model("GET", "/view", None, ClientView, timeout=40,
                                                       params={"after": self.version, "wait": 10})
            except Unreachable as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.opts.give_up_after:
                    raise Unreachable(f"the coordinator at {self.opts.coordinator} has not answered for "
                                      f"{now - unreachable_since:.0f}s; giving up (the limit is "
                                      f"{self.opts.give_up_after:.0f}s)") from exc
                log.warning("coordinator unreachable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            except CoordinatorError as exc:
                if exc.status != 401:
                    raise
                log.warning("session lost (%s); joining again", exc.message)  # e.g. a restarted coordinator
                await self._join()
                self.version = -1
                continue
            unreachable_since = None
            self.version = snap.version
            self.phase = snap.phase
            try:
                done = await self._act(snap)
            except CoordinatorError as exc:
                if exc.status == 401:
                    log.warning("session lost (%s); joining again", exc.message)
                    await self._join()
                    continue
                if exc.status == 413:  # our payload can never fit: retrying every round would train for nothing
                    raise ConfigError(f"the coordinator refuses this client's payloads as too large ({exc.message});"
                                      f" raise network.max_blob_bytes in the run config or use a smaller tier")
                self.failures += 1
                log.warning("coordinator refused: %s", exc.message)  # e.g. too late for the round: go on
                continue
            except (SignatureError, DataParallelError, ExcludedError):
                raise  # an altered decision, a lost worker, an exclusion: asking again gets the same
            except AftermathError as exc:
                # e.g. a blob of the accepted set cannot be fetched: never apply another set; retry on the next
                # state, and if the round moves on without us, we resynchronise from the next checkpoint
                self.failures += 1
                log.warning("%s in %s; retrying", exc, snap.phase)
                await asyncio.sleep(0.5)
                self.version = -1  # ask for the state again at once
                continue
            if done:
                return self._final()

    async def _act(self, snap: ClientView) -> bool:
        phase = snap.phase
        me = snap.me
        if phase == "Finished":  # the final hash was reported in the last cooldown
            return True
        if me.status == "gone" and me.excluded:
            raise ExcludedError(f"the coordinator excluded this client ({self.client_id}) from the run: {me.excluded}")
        if me.status == "gone":
            log.warning("dropped by the coordinator; joining again")
            await self._join()
            return False
        if me.resync_epoch > self.state.resynced_epoch:
            # our replica differs from the reference: drop it; the next warmup reloads the checkpoint
            log.warning("the coordinator found our replica differs at epoch %d: resynchronising from the checkpoint",
                        me.resync_epoch)
            self.state.resynced_epoch = me.resync_epoch
            self.state.resyncs += 1
            self.replica = None
            self.state.model_step = -1
            self.prefetched, self.details, self.updates = {}, {}, {}
            self._record(event="resync", epoch=me.resync_epoch)
        if me.status != "member":
            return False  # waiting for the next epoch
        rnd, prev = snap.round, snap.previous_round
        if prev is not None and (prev.result is None or rnd is None or prev.step != rnd.step - 1):
            prev = None
        if snap.catch_up is not None and self.state.model_step == snap.catch_up.step:
            # we fell behind (the round after the one we lack has closed too): apply what we lack first
            await self._apply(snap.catch_up)
        if phase == "Warmup" and me.ready_epoch != snap.epoch:
            await self._ensure_model(snap.checkpoint.step)
            await self.transport.call("POST", "/ready", ReadyRequest(epoch=snap.epoch).model_dump())
        elif phase == "RoundTrain" and rnd is not None:
            mine = rnd.assignment
            # at step t the weights are at t, or at t - 1 while step t - 1 is still to apply (overlapped)
            fresh = self.state.model_step == rnd.step or (prev is not None and self.state.model_step == prev.step)
            if mine and not rnd.committed and self.state.committed_step < rnd.step and fresh:
                self.decisions.assignment(self.client_id, rnd)
                await self._train(rnd.step, mine[0], mine[1], prev, rnd.first)
            if prev is not None and self.state.model_step == prev.step:
                await self._apply(prev)
        elif phase == "RoundWitness" and rnd is not None and rnd.result is not None:
            if prev is not None and self.state.model_step == prev.step:
                await self._apply(prev)
            if self.state.applied_step < rnd.step and self.state.model_step == rnd.step:
                await self._apply(rnd)
        elif phase == "Cooldown":
            if self.state.reported_epoch < snap.epoch and self.state.model_step == snap.step:
                sha = await asyncio.get_running_loop().run_in_executor(None, self.replica.weights_sha256)
                request = HashRequest(epoch=snap.epoch, step=snap.step, weights_sha256=sha, stats=self._stats())
                answer = await self.transport.call_model("POST", "/hash", request, HashAnswer)
                self.state.reported_epoch = snap.epoch
                self._record(event="hash", epoch=snap.epoch, step=snap.step, weights_sha256=sha, match=answer.match)
        return False

    # ------------------------------------------------------------------ warmup: the model
    async def _ensure_model(self, checkpoint_step: int) -> None:
        """The tier's weights and optimizer state from the coordinator's checkpoint (sha256-checked files)."""
        started = time.perf_counter()
        ck = await self.transport.call_model("GET", "/checkpoint", None, CheckpointAnswer, auth=False)
        self.decisions.checkpoint(ck)
        if self.replica is not None and self.state.model_step == checkpoint_step == ck.info.step:
            # the same step is not the same model: a restarted coordinator retrains the steps after its last
            # checkpoint without us. Keep the replica only when it IS the checkpoint's.
            sha = await asyncio.get_running_loop().run_in_executor(None, self.replica.weights_sha256)
            if sha == ck.info.weights_sha256.get(self.spec.name):
                return
            log.warning("our replica at step %d is not the checkpoint's (another timeline): reloading", checkpoint_step)
        if ck.manifest is None:
            raise CheckpointError("the coordinator's checkpoint has no manifest yet; waiting for it")
        manifest = Manifest.from_json(ck.manifest, where="the coordinator's manifest")
        entry = manifest.entry(name=self.spec.name)
        if entry is None:  # a Mix'n'Match spec is exported into the checkpoint once its client joined
            raise CheckpointError(f"the coordinator's checkpoint has no {self.spec.name} export yet; waiting for it")
        local = self.opts.work_dir / self.client_id / "model"
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        # every file of the entry, and the common files, relative to the manifest's directory
        for rel in list(entry.files) + [f for f in manifest.common_files if f not in entry.files]:
            path = posixpath.normpath(posixpath.join(ck.model_dir, rel))
            data = await self.transport.get_bytes(f"/checkpoint/files/{path}", manifest.sha256[rel], auth=False)
            (local / posixpath.basename(path)).write_bytes(data)
        optimizer = self.run.optimizer.name

        def load() -> Replica:
            model = load_model_dir(local)  # the replica stays on the CPU; it trains on self.device
            state = load_optimizer_state(local / OPTIMIZER_STATE_FILE, optimizer)
            replica = Replica.build(model, self.config, self.spec, self.run, state, device=self.device,
                                    checkpointing=self.plan.checkpointing)
            replica.parallel = self.parallel
            return replica

        self.replica = await asyncio.get_running_loop().run_in_executor(None, load)
        self.prefetched, self.own_blobs, self.pending_timing, self.details, self.updates = {}, {}, {}, {}, {}
        self.state.model_step = ck.info.step
        # a fresh model at step S: nothing of step S or later is committed or applied in this timeline (after a
        # coordinator restart, the steps after its last checkpoint are trained again)
        self.state.committed_step = self.state.applied_step = self.state.model_step - 1
        if self.state.model_step != checkpoint_step:
            raise CoordinatorError(409, f"the checkpoint changed while loading (step {self.state.model_step})")
        self._record(event="model_loaded", step=self.state.model_step,
                     seconds=round(time.perf_counter() - started, 3),
                     parameters=sum(p.numel() for p in self.replica.model.parameters()))

    # ------------------------------------------------------------------ a round: train
    async def _batch(self, start: int, end: int) -> tuple[torch.Tensor, bool]:
        """Sequences [start, end) of the train split, and whether they came from the window fetched ahead."""
        if self.stream is not None:
            return await asyncio.get_running_loop().run_in_executor(None, self.stream.sequences, start, end), False
        ahead, self.batch_ahead = self.batch_ahead, None
        if ahead is not None:
            lo, hi, task = ahead
            if lo <= start and end <= hi:
                await asyncio.wait([task])
                if not task.cancelled() and task.exception() is None:
                    return task.result()[start - lo:end - lo], True
            task.cancel()
        return await self._fetch_batch(start, end), False

    def _fetch_ahead(self, first: int, start: int, end: int) -> None:
        """Fetch, in the background, a window around where this client's range of the next step will lie (its
        range of this step shifted by one global batch, with a margin for the next split), so the next step
        starts without a round trip to the data server. A range outside the window is fetched as usual."""
        if self.stream is not None:
            return
        batch = self.run.sequences_per_round
        margin = max(2, (end - start) // 4)
        lo = max(first + batch, start + batch - margin)
        hi = min(first + 2 * batch, end + batch + margin)
        if hi <= lo:
            return
        task = asyncio.create_task(self._fetch_batch(lo, hi))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed window is fetched again
        self.batch_ahead = (lo, hi, task)

    async def _fetch_batch(self, start: int, end: int) -> torch.Tensor:
        from aftermath.data.server import fetch_sequences

        await self.transport.gate("data")
        batch = await fetch_sequences(self.opts.coordinator, start, end, self.run.data.seq_len, seed=self.run.seed,
                                      split="train", session=self.transport.session)
        # the server sends 2 or 4 bytes per token
        await self.transport.received(batch.numel() * (2 if self.config.vocab_size <= 65536 else 4))
        return batch

    async def _train(self, step: int, start: int, end: int, previous: ClientRoundView | None, first: int) -> None:
        """Train and commit `step` (`first`: the step's first global sequence); `previous` (overlapped rounds):
        the round to apply next, whose results download while this step trains."""
        loop = asyncio.get_running_loop()
        if previous is not None:
            downloading = asyncio.create_task(self._prefetch(previous))
            # a failed download is retried by the apply; never leave its error unretrieved
            downloading.add_done_callback(lambda task: task.cancelled() or task.exception())
        t0 = time.perf_counter()
        batch, ahead = await self._batch(start, end)
        t_data = time.perf_counter() - t0
        self._fetch_ahead(first, start, end)
        lookahead = self._own_result(previous) if previous is not None else None
        batch = self.hooks.training_batch(step, batch, self.config.vocab_size)
        result = await loop.run_in_executor(None, functools.partial(
            self.replica.train, batch, self.plan.size, step=step, client_id=self.client_id, lookahead=lookahead))
        t1 = time.perf_counter()
        blob = await loop.run_in_executor(None, self.replica.encode, result.grads, step, self.client_id)
        blob = self.hooks.tamper(step, blob, self.replica, self.client_id, self.peer_payloads)
        t_encode = time.perf_counter() - t1
        self._passed(step, "train")
        t2 = time.perf_counter()
        sha = hashlib.sha256(blob).hexdigest()
        self.own_blobs[sha] = (step, blob)  # decoded from memory at apply time, not downloaded again
        self.state.last_loss = result.loss
        self.state.tokens += result.tokens
        self.state.train_seconds += result.seconds
        request = CommitRequest(step=step, blob=sha, sequences=result.sequences, train_seconds=result.seconds,
                                overhead_seconds=round(self.overhead, 4),
                                loss=result.loss if math.isfinite(result.loss) else 1e9, stats=self._stats(),
                                signature=self.signer.sign_commitment(self.run.run_id, step, self.client_id, sha,
                                                                      start, end))
        await self.transport.commit(request, blob)  # the payload and its commit in one request
        t_upload = time.perf_counter() - t2
        self._passed(step, "commit")
        self.state.committed_step = step
        self.state.rounds += 1
        self.pending_timing[step] = {"t_data": t_data, "batch_ahead": ahead, "t_train": result.seconds,
                                     "t_encode": t_encode, "t_upload": t_upload, "payload_bytes": len(blob),
                                     "loss": result.loss, "sequences": result.sequences, "tokens": result.tokens,
                                     "retries": result.retries, "processes": result.processes,
                                     "inner_steps": result.inner_steps}
        if previous is not None:
            await asyncio.wait([downloading])  # what it could not get, the apply fetches

    def _own_result(self, previous: ClientRoundView) -> Any:
        """This client's own payload of the step in flight, when the weights are still before it and the round
        accepted it (the look-ahead of an overlapped round); None otherwise."""
        if self.state.model_step != previous.step or not previous.committed:
            return None
        mine = next((blob for blob, (step, _) in self.own_blobs.items() if step == previous.step), None)
        if mine is None:
            return None
        return self._decode(self.own_blobs[mine][1], previous.step, self.client_id, self.spec.tier)

    # ------------------------------------------------------------------ a round: apply
    def _decode(self, data: bytes, step: int, client_id: str, tier: int | None) -> Any:
        # a Mix'n'Match sender: its spec travels in the payload (the coordinator checked it at commit)
        spec = tier_spec(self.config, tier) if tier is not None else None
        return self.replica.decode(data, step, client_id, spec)

    async def _fetch(self, sha: str, url: str | None = None) -> bytes:
        """A blob: its own from memory, else from `url` (object storage) or the coordinator."""
        return self.own_blobs[sha][1] if sha in self.own_blobs else await self.transport.get_blob(sha, url)

    async def _detail(self, step: int) -> RoundDetail:
        """Step `step`'s whole accepted set (fetched once)."""
        if step not in self.details:
            detail = await self.transport.call_model("GET", f"/rounds/{step}", None, RoundDetail)
            self.decisions.detail(detail)
            self.details = {s: d for s, d in self.details.items() if s > step - 2}
            self.details[step] = detail
        return self.details[step]

    async def _update(self, step: int, update: UpdateView) -> RoundUpdate:
        """Step `step`'s update blob, sha256-checked and decoded (fetched once)."""
        if step not in self.updates:
            data = await self.transport.get_blob(update.blob, update.url)
            decoded = await asyncio.get_running_loop().run_in_executor(None, self.replica.decode_update, data, step)
            self.updates = {s: u for s, u in self.updates.items() if s > step - 2}
            self.updates[step] = decoded
        return self.updates[step]

    async def _prefetch(self, rnd: ClientRoundView) -> None:
        """While this client trains the next step, fetch and decode what applying `rnd` needs."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        result = rnd.result
        if result.plane == "payloads":
            detail = await self._detail(rnd.step)
            for c in detail.accepted:
                if c.blob in self.prefetched:
                    continue
                data = await self._fetch(c.blob, detail.urls.get(c.blob))
                self.prefetched[c.blob] = await loop.run_in_executor(None, self._decode, data, rnd.step,
                                                                     c.client_id, c.tier)
        if result.plane == "update" and result.update is not None:
            await self._update(rnd.step, result.update)
        self.t_prefetch += time.perf_counter() - started

    async def _apply(self, rnd: ClientRoundView) -> None:
        """Apply `rnd`'s accepted set, from its payloads or its update blob, and say so. While the update of an
        'update' round is still being computed, nothing happens: its publication changes the view. A witness
        checks the update against the payloads after the fact, in the background (`_witness`)."""
        result = rnd.result
        step = rnd.step
        if result.plane == "update" and result.update is None:
            return
        self.decisions.result(step, result)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        prefetched = 0
        payloads_plane = result.plane == "payloads"
        if payloads_plane:
            detail = await self._detail(step)
            self._verify_accepted(detail)
            accepted = detail.accepted
            missing = [c for c in accepted if c.blob not in self.prefetched]
            prefetched = len(accepted) - len(missing)
            blobs = await asyncio.gather(*(self._fetch(c.blob, detail.urls.get(c.blob)) for c in missing))
        else:
            prefetched = int(step in self.updates)
            update = await self._update(step, result.update)
            self.decisions.update(step, result, update)
        t_download = time.perf_counter() - t0
        self._passed(step, "download")
        t1 = time.perf_counter()
        if payloads_plane:
            ready = {c.blob: self.prefetched.pop(c.blob) for c in accepted if c.blob in self.prefetched}

            def decode() -> list:
                for c, data in zip(missing, blobs):
                    ready[c.blob] = self._decode(data, step, c.client_id, c.tier)
                payloads = [ready[c.blob] for c in accepted]
                if any(p.step != step or p.client_id != c.client_id for p, c in zip(payloads, accepted)):
                    raise CoordinatorError(409, f"a prefetched payload does not belong to step {step}")
                return payloads

            payloads = await loop.run_in_executor(None, decode)
            if self.hooks.keeps_peers:
                self.peer_payloads = payloads
        # what is left belongs to later steps, or to results the round did not accept
        self.prefetched = {sha: p for sha, p in self.prefetched.items() if p.step > step}
        t_decode = time.perf_counter() - t1
        t2 = time.perf_counter()
        if not payloads_plane:
            await loop.run_in_executor(None, self.replica.apply_update, update, step)
            if result.witness:
                task = asyncio.create_task(self._witness(step, result.update.blob, update))
                self.witnessing.add(task)
                task.add_done_callback(self.witnessing.discard)
        else:
            # Aggregate and apply together: DisTrO streams band by band and never holds the whole update.
            await loop.run_in_executor(None, self.replica.apply, payloads, step)
        t_aggregate = time.perf_counter() - t2
        t_prefetch, self.t_prefetch = self.t_prefetch, 0.0
        self.state.model_step = step + 1
        self.state.applied_step = step
        self.own_blobs = {sha: own for sha, own in self.own_blobs.items() if own[0] > step}
        self.updates.pop(step, None)
        self._passed(step, "apply")
        timing = self.pending_timing.pop(step, {})
        # what the batch split must leave room for: the newest round's data, encode and upload, and this apply
        newest = self.pending_timing[max(self.pending_timing)] if self.pending_timing else timing
        self.overhead = sum(newest.get(k, 0.0) for k in ("t_data", "t_encode", "t_upload")) + t_download + \
            t_decode + t_aggregate
        self.pending_timing = {s: t for s, t in self.pending_timing.items() if s > step}
        stats = self._stats()
        train = timing.get("t_train")
        record = RoundRecord(
            client_id=self.client_id, tier=self.spec.tier, spec=self.spec.name, step=step, loss=timing.get("loss"),
            tokens=timing.get("tokens", 0), sequences=timing.get("sequences", 0),
            tokens_per_s=round(timing["tokens"] / train, 1) if train else None,
            bytes_up=stats["bytes_up"], bytes_down=stats["bytes_down"], peak_memory=stats["peak_memory"],
            payload_bytes=timing.get("payload_bytes"), accepted=result.accepted, t_data=timing.get("t_data"),
            batch_ahead=timing.get("batch_ahead", False),
            t_train=train, t_encode=timing.get("t_encode"), t_upload=timing.get("t_upload"),
            t_prefetch=round(t_prefetch, 4), prefetched=prefetched, t_download=round(t_download, 4),
            t_decode=round(t_decode, 4), t_aggregate=round(t_aggregate, 4),
            data_plane=result.plane,
            witness=result.witness, retries=timing.get("retries", 0), processes=timing.get("processes", 1),
            inner_steps=timing.get("inner_steps", 1), faults=self._faults())
        self._record(**record.model_dump(exclude={"time", "client_id", "tier", "spec"}))
        await self.transport.call("POST", "/applied", AppliedRequest(step=step).model_dump())

    async def _witness(self, step: int, blob: str, update: RoundUpdate) -> None:
        """Recompute step `step`'s update from its accepted payloads (signatures verified) on this client's region,
        and tell the coordinator whether the published one has the same bits. After the fact, off the round's
        critical path: a wrong update is reported (and counted in the summary), not prevented."""
        loop = asyncio.get_running_loop()
        replica = self.replica  # the check reads only its geometry; a reload meanwhile does not matter
        try:
            detail = await self._detail(step)
            self._verify_accepted(detail)
            blobs = await asyncio.gather(*(self._fetch(c.blob, detail.urls.get(c.blob)) for c in detail.accepted))

            def recompute() -> bool:
                payloads = [replica.decode(data, step, c.client_id, None if c.tier is None else
                                           tier_spec(self.config, c.tier)) for c, data in zip(detail.accepted, blobs)]
                mine = replica.round_update(payloads, step, detail.accepted_digest)
                return update.accepted == detail.accepted_digest and _same_region(mine, update)

            agrees = await loop.run_in_executor(None, recompute)
            await self.transport.call_model("POST", "/witness", WitnessRequest(step=step, update=blob, agrees=agrees),
                                            OkAnswer)
        except AftermathError as exc:  # the round goes on; a missing verdict is visible in the summary's count
            log.warning("could not witness step %d: %s", step, exc)
            return
        self._record(event="witnessed", step=step, agrees=agrees)
        if not agrees:
            log.warning("the coordinator's update of step %d differs from what its accepted payloads give: told the "
                        "coordinator", step)

    def _verify_accepted(self, detail: RoundDetail) -> None:
        """Every result of the accepted set must be signed by its client for the range it was assigned."""
        for c in detail.accepted:
            key = detail.public_keys.get(c.client_id, "")
            rng = detail.assignments.get(c.client_id)
            if not key or rng is None:
                raise SignatureError(f"the accepted result of {c.client_id!r} at step {detail.step} has no known key "
                                     f"or assignment; not applying this set")
            verify_commitment(key, c.signature, self.run.run_id, detail.step, c.client_id, c.blob, rng[0], rng[1])

    def _final(self) -> dict[str, Any]:
        stats = self._stats()
        sha = self.replica.weights_sha256() if self.replica is not None else None
        self._record(event="finished", step=self.state.model_step, weights_sha256=sha, faults=self._faults(),
                     resyncs=self.state.resyncs, **{
            k: stats[k] for k in ("loss", "bytes_up", "bytes_down", "tokens", "tokens_per_s", "peak_memory")})
        return {"client_id": self.client_id, "tier": self.spec.tier, "step": self.state.model_step,
                "weights_sha256": sha, **stats}


def _same_region(mine: RoundUpdate, published: RoundUpdate) -> bool:
    """Whether a region's own update has the published (universal) update's bits on that region."""
    return all(torch.equal(t, published.params[name][region_slices(tuple(t.shape))])
               for name, t in mine.params.items())
