"""Test hooks of the client: the one seam through which the fault tests reach into a round.

The round loop tells its hooks each point of a round it passes (PHASES). Production runs with `RoundHooks()`,
which does nothing; `TestHooks` kills the process at a chosen (step, phase) like `kill -9`, or perturbs the
replica's weights after it applied a chosen step, so that it differs from every other replica.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import torch

from aftermath.errors import ConfigError
from aftermath.round.replica import Replica

log = logging.getLogger("aftermath.client")

# The points of a round of `step`, in order:
PHASES = ("train",  # after training and encoding, before the commit (its payload travels with it)
          "commit",  # after the commit, before the accepted set is fetched
          "download",  # after fetching the accepted set, before applying it
          "apply")  # after applying, before saying so


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

    def passed(self, step: int, phase: str, replica: Replica | None) -> str | None:
        """Called at each point of PHASES; returns the name of what it did (recorded as an event), or None."""
        return None


class TestHooks(RoundHooks):
    def __init__(self, crash_at: tuple[int, str] | None, perturb_at: int | None,
                 before_crash: Callable[[], None] = lambda: None) -> None:
        self.crash_at = crash_at
        self.perturb_at = perturb_at
        self.before_crash = before_crash  # flush what the process would lose (its metrics)

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
