"""Test hooks of the client: the one seam through which the fault and attack tests reach into a round.

The round loop tells its hooks each point of a round it passes (PHASES), hands them the batch it is about to
train and the payload it is about to commit. Production runs with `RoundHooks()`, which does nothing;
`TestHooks` kills the process at a chosen (step, phase) like `kill -9`, perturbs the replica's weights after it
applied a chosen step (so that it differs from every other replica), or turns the client into an attacker
(`--attack MODE`, hidden from --help; ATTACKS): it still holds the token and signs what it commits, but what it
commits is poisoned.
"""

from __future__ import annotations

import logging
import os
import signal
import zlib
from typing import Callable

import torch

from aftermath.errors import ConfigError
from aftermath.optim.payload import Payload, SparseCoefficients
from aftermath.round.replica import Replica

log = logging.getLogger("aftermath.client")

# The points of a round of `step`, in order:
PHASES = ("train",  # after training and encoding, before the commit (its payload travels with it)
          "commit",  # after the commit, before the accepted set is fetched
          "download",  # after fetching the accepted set, before applying it
          "apply")  # after applying, before saying so


# The attacks of a malicious client (test-only): what it does to the payload it commits, or to its batch.
ATTACKS = {
    "scale": "every value times 1e3 (bites under raw-value wires; a one-bit wire sends only the signs)",
    "flip": "every sign flipped",
    "random": "random indices and random signs",
    "replay": "another client's payload of the last round it applied (same spec), as its own",
    "constant": "its first payload again, every round",
    "other-data": "trained on data of its own choosing (uniform random tokens) instead of its assigned range",
    "region": "honest, but the embedding's signs flipped (and its values times 1e3 under raw-value wires)",
}
ATTACK_SCALE = 1e3


def parse_attack(text: str | None) -> str | None:
    """`--attack flip` (or AFTERMATH_ATTACK) -> "flip"."""
    if not text:
        return None
    if text not in ATTACKS:
        raise ConfigError(f"attack {text!r} is not known; use one of {', '.join(ATTACKS)}")
    return text


def parse_crash_at(text: str | None) -> tuple[int, str] | None:
    """`--crash-at 3:train` (or AFTERMATH_CRASH_AT) -> (3, "train")."""
    if not text:
        return None
    step, _, phase = text.partition(":")
    if not (step.isascii() and step.isdigit()) or phase not in PHASES:
        raise ConfigError(f"crash hook {text!r} must be STEP:PHASE with PHASE one of {', '.join(PHASES)}")
    return int(step), phase


class RoundHooks:
    """No hooks: what production runs with."""

    keeps_peers = False  # whether the loop should hand `tamper` the payloads of the last round it applied

    def passed(self, step: int, phase: str, replica: Replica | None) -> str | None:
        """Called at each point of PHASES; returns the name of what it did (recorded as an event), or None."""
        return None

    def training_batch(self, step: int, batch: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The tokens the client trains at `step` (its assigned batch)."""
        return batch

    def tamper(self, step: int, blob: bytes, replica: Replica, client_id: str, peers: list[Payload]) -> bytes:
        """The payload the client commits at `step` (its own, `blob`)."""
        return blob


class TestHooks(RoundHooks):
    __test__ = False  # not a pytest test class
    def __init__(self, crash_at: tuple[int, str] | None, perturb_at: int | None,
                 before_crash: Callable[[], None] = lambda: None, attack: str | None = None) -> None:
        self.crash_at = crash_at
        self.perturb_at = perturb_at
        self.before_crash = before_crash  # flush what the process would lose (its metrics)
        self.attack = attack
        self.keeps_peers = attack == "replay"
        self.first: Payload | None = None  # its first payload (constant), or its last own one (replay fallback)

    def passed(self, step: int, phase: str, replica: Replica | None) -> str | None:
        if self.crash_at == (step, phase):
            log.warning("crash hook: killing myself at step %d, phase %s", step, phase)
            self.before_crash()
            os.kill(os.getpid(), signal.SIGKILL)
        if phase == "apply" and self.perturb_at == step and replica is not None:
            with torch.no_grad():  # this replica now differs from every other
                next(replica.model.parameters()).add_(1e-3)
            return "perturbed"
        return None

    def training_batch(self, step: int, batch: torch.Tensor, vocab_size: int) -> torch.Tensor:
        if self.attack != "other-data":
            return batch
        generator = torch.Generator().manual_seed(step)
        return torch.randint(0, vocab_size, tuple(batch.shape), generator=generator, dtype=batch.dtype)

    def tamper(self, step: int, blob: bytes, replica: Replica, client_id: str, peers: list[Payload]) -> bytes:
        if self.attack in (None, "other-data"):
            return blob
        own = replica.decode(blob, step, client_id, replica.spec)
        if self.attack == "constant":
            self.first = self.first or own
            sent = self.first
        elif self.attack == "replay":
            same = [p for p in peers if p.client_id != client_id and p.spec == own.spec]
            sent = same[0] if same else (self.first or own)
            self.first = own
        else:
            sent = Payload(own.kind, own.run_id, own.step, own.client_id, own.spec,
                           {name: _poisoned(self.attack, name, item, replica, step)
                            for name, item in own.params.items()})
        relabelled = Payload(sent.kind, sent.run_id, step, client_id, sent.spec, sent.params)
        log.warning("attack hook: committing a %s payload at step %d", self.attack, step)
        return replica.rule.codec.encode(relabelled)


def _poisoned(attack: str, name: str, item: SparseCoefficients | torch.Tensor, replica: Replica,
              step: int) -> SparseCoefficients | torch.Tensor:
    if not isinstance(item, SparseCoefficients):  # a dense payload: the same attacks on the dense values
        item_values = item
    else:
        item_values = item.values
    if attack == "scale":
        values = item_values * ATTACK_SCALE
    elif attack == "flip":
        values = -item_values
    elif attack == "region":
        values = -item_values * ATTACK_SCALE if "embed" in name else item_values
    else:  # random
        generator = torch.Generator().manual_seed(zlib.crc32(f"{step}:{name}".encode()))
        signs = torch.randint(0, 2, tuple(item_values.shape), generator=generator).to(torch.float32) * 2 - 1
        values = signs * item_values.abs().mean()
        if isinstance(item, SparseCoefficients):
            chunk_numel = replica.rule.plan.params[name].chunk_numel
            n, k = item.indices.shape
            indices = torch.rand(n, chunk_numel, generator=generator).topk(k, dim=1).indices.sort(dim=1).values
            return SparseCoefficients(item.shape, indices, values)
    return SparseCoefficients(item.shape, item.indices, values) if isinstance(item, SparseCoefficients) else values
