"""Data parallelism inside one client (`aftermath client --nproc N`): N processes, one per device, compute each
step's gradient together; the coordinator sees one client, one identity and one payload.

Rank 0 is the client (it joins, holds the replica, encodes, commits and applies); ranks 1..N-1 are worker
processes that hold only a training copy of the tier's weights. For each forward/backward (a step, or an fp16
retry) rank 0 broadcasts an order (the model's geometry, the step's sequence groups, micro-batch, precision and
loss scale), the batch and its current weights; every rank runs `backward_groups` on its share of each group's
rows (row r, r+N, r+2N, ... for rank r) with the whole batch's normalisation, and the gradients are summed with
an all-reduce. So the gradient rank 0 encodes is the whole batch's, equal to a one-process client's up to the
order of fp32 additions; the replicas are untouched by any of this (they apply rounds as always), so they stay
bit-identical to everyone's.

Weights travel every step instead of each worker keeping a replica: a worker then needs no optimizer state, no
payloads and no checkpoint. The broadcast of the tier's weights and the all-reduce of its gradients stay on one
machine (gloo over loopback TCP, NCCL between GPUs): about 5% of a step on 2 CPU cores at 15M parameters
(bench/data_parallel.py). Backend: NCCL on CUDA devices, gloo on the CPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aftermath.errors import ConfigError, DataParallelError
from aftermath.model import MatFormerConfig, MatFormerLM
from aftermath.round.objective import SequenceGroup
from aftermath.round.replica import backward_groups

log = logging.getLogger("aftermath.data_parallel")

# A worker waits in a broadcast between steps for as long as rank 0 waits for its round (warmup, slow peers), so
# the collectives' timeout is long; a process that dies closes its connections, which the others see at once.
COLLECTIVE_TIMEOUT = timedelta(hours=24)
START_TIMEOUT = 300.0  # seconds for every worker to start and meet rank 0


def rank_devices(device: torch.device, nproc: int) -> list[torch.device]:
    """The device of each rank: the CPU for all of them, or N consecutive GPUs from `device`'s index."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be 1 or more (the processes of this client)")
    if device.type != "cuda":
        return [device] * nproc
    first = device.index or 0
    count = torch.cuda.device_count()
    if first + nproc > count:
        raise ConfigError(f"--nproc {nproc} from {device} needs GPUs cuda:{first} to cuda:{first + nproc - 1}, but "
                          f"torch sees {count}; lower --nproc or start from a lower --device cuda:N")
    return [torch.device("cuda", first + r) for r in range(nproc)]


@dataclass(frozen=True)
class BackwardOrder:
    """What rank 0 tells the workers before each forward/backward (pickled by broadcast_object_list)."""

    config: dict[str, Any]  # the training copy's MatFormerConfig (a worker rebuilds its model when it changes)
    checkpointing: bool
    groups: list[SequenceGroup]
    batch_shape: tuple[int, int]
    micro_batch_size: int
    precision: str
    scale: float


def shard(rows: tuple[int, ...], rank: int, world: int) -> tuple[int, ...]:
    """Rank `rank`'s rows of a group: every `world`-th row from its own offset (balanced to within one row)."""
    return rows[rank::world]


def _steps_group(world: int) -> dist.ProcessGroup:
    """The group the steps run in. The default group (made with START_TIMEOUT, so a worker that never starts is
    an error within minutes) only makes this one, whose collectives may wait as long as a round does."""
    return dist.new_group(list(range(world)), timeout=COLLECTIVE_TIMEOUT)


def _meet(model: MatFormerLM, batch: torch.Tensor, order: BackwardOrder, group: dist.ProcessGroup, rank: int,
          world: int) -> list[float]:
    """Every rank's part of one forward/backward, after the order: the batch and the weights from rank 0, this
    rank's share of the gradient, then the sums. Leaves the summed gradient in `model`'s .grad."""
    dist.broadcast(batch, src=0, group=group)
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for work in [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]:
        work.wait()
    params = list(model.parameters())
    for p in params:
        p.grad = None
    sums = backward_groups(model, batch, order.groups, [shard(g.rows, rank, world) for g in order.groups],
                           order.micro_batch_size, order.precision, order.scale)
    # a parameter no rank touched keeps grad None, as in one process; the others are summed (zeros where a rank
    # had no rows for it)
    had = [0.0 if p.grad is None else 1.0 for p in params]
    totals = torch.tensor(sums + had, dtype=torch.float64, device=batch.device)
    dist.all_reduce(totals, group=group)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for work in [dist.all_reduce(g, group=group, async_op=True) for g in grads]:
        work.wait()
    totals = totals.tolist()
    for p, g, used in zip(params, grads, totals[len(sums):]):
        p.grad = g if used > 0 else None
    return totals[:len(sums)]


class DataParallelGroup:
    """Rank 0's side: starts the workers, and is the replica's `parallel` (aftermath.round.replica)."""

    def __init__(self, nproc: int, device: torch.device, threads: int) -> None:
        self.devices = rank_devices(device, nproc)
        self.world = nproc
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._rendezvous = tempfile.mkdtemp(prefix="aftermath-dp-")
        init_method = Path(self._rendezvous, "store").as_uri()
        context = multiprocessing.get_context("spawn")
        self.workers = [context.Process(target=_worker_main, name=f"aftermath-dp-{r}", daemon=True,
                                        args=(r, nproc, self.backend, init_method, str(self.devices[r]), threads,
                                              os.getpid()))
                        for r in range(1, nproc)]
        for w in self.workers:
            w.start()
        if device.type == "cuda":
            torch.cuda.set_device(self.devices[0])
        try:
            dist.init_process_group(self.backend, init_method=init_method, rank=0, world_size=nproc,
                                    timeout=timedelta(seconds=START_TIMEOUT))
            self.group = _steps_group(nproc)
        except Exception as exc:  # a worker that could not start: said in one line, no process left behind
            self._stop_workers()
            raise DataParallelError(f"--nproc {nproc}: the worker processes did not meet rank 0 ({exc})") from None
        log.info("data parallel: %d processes (%s) on %s", nproc, self.backend,
                 ", ".join(str(d) for d in self.devices))

    def backward(self, model: MatFormerLM, batch: torch.Tensor, groups: list[SequenceGroup],
                 micro_batch_size: int, precision: str, scale: float) -> list[float]:
        order = BackwardOrder(config=model.config.to_dict(), checkpointing=model.activation_checkpointing,
                              groups=groups, batch_shape=tuple(batch.shape), micro_batch_size=micro_batch_size,
                              precision=precision, scale=scale)
        try:
            dist.broadcast_object_list([order], src=0, group=self.group)
            return _meet(model, batch.to(torch.long).contiguous(), order, self.group, 0, self.world)
        except (RuntimeError, dist.DistBackendError) as exc:
            dead = [w.name for w in self.workers if not w.is_alive()]
            raise DataParallelError(f"a data-parallel worker stopped ({', '.join(dead) or 'connection lost'}: "
                                    f"{str(exc).splitlines()[0][:200]}); see its log above, then restart the "
                                    f"client") from None

    def close(self) -> None:
        """Tell the workers to stop and wait for them (a worker whose rank 0 is gone stops by itself)."""
        if dist.is_initialized():
            try:
                dist.broadcast_object_list([None], src=0, group=self.group)
            except (RuntimeError, dist.DistBackendError):
                pass
            self._stop_workers()
            dist.destroy_process_group()
        else:
            self._stop_workers()
        shutil.rmtree(self._rendezvous, ignore_errors=True)

    def _stop_workers(self) -> None:
        for w in self.workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
                w.join()


def _watch_parent(parent: int) -> None:
    """End this worker when rank 0 is gone (killed, crashed): it would otherwise wait in a broadcast forever."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def _worker_main(rank: int, world: int, backend: str, init_method: str, device_name: str, threads: int,
                 parent: int) -> None:
    """A worker process: meet rank 0, then run its share of every forward/backward until told to stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=START_TIMEOUT))
    group = _steps_group(world)
    model: MatFormerLM | None = None
    config: dict[str, Any] | None = None
    try:
        while True:
            box: list[BackwardOrder | None] = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            order = box[0]
            if order is None:
                return
            if order.config != config:
                config = order.config
                with torch.device(device):
                    model = MatFormerLM(MatFormerConfig.from_dict(config))
            model.activation_checkpointing = order.checkpointing
            model.train()
            batch = torch.empty(order.batch_shape, dtype=torch.long, device=device)
            _meet(model, batch, order, group, rank, world)
    except (RuntimeError, dist.DistBackendError) as exc:  # rank 0 is gone (killed, or stopped with an error)
        log.warning("rank 0 of this client stopped (%s); this worker stops too", str(exc).splitlines()[0][:200])
    finally:
        dist.destroy_process_group()
