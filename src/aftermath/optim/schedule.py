"""Learning-rate schedules: constant, and linear warmup followed by a cosine decay.

The cosine schedule is clamped: after `total_steps` it stays at its final value (it does not climb
back up, as an unclamped cosine would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aftermath.errors import ConfigError

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """`lr(step)` for step = 0, 1, 2, ...

    constant: peak_lr after a linear warmup of `warmup_steps` (none by default).
    cosine:   linear warmup from peak_lr/warmup_steps to peak_lr over `warmup_steps`, then
              final + (peak - final) * (1 + cos(pi * progress)) / 2 with progress going 0 -> 1 over the
              steps warmup_steps .. total_steps; final = peak_lr * final_fraction; clamped afterwards.
    """

    peak_lr: float
    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    final_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"lr schedule {self.kind!r} is not known; use one of {SCHEDULES}")
        if not (isinstance(self.peak_lr, (int, float)) and math.isfinite(self.peak_lr) and self.peak_lr >= 0):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.peak_lr!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(f"final_fraction must lie in [0, 1], got {self.final_fraction}")
        if self.kind == "cosine" and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"a cosine schedule needs total_steps ({self.total_steps}) > warmup_steps ({self.warmup_steps}); "
                f"set total_steps to the length of the run"
            )

    def lr(self, step: int) -> float:
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        final = self.peak_lr * self.final_fraction
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return final + (self.peak_lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
