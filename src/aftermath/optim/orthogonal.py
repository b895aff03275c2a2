"""Orthogonalisers for Muon: approximations of the polar factor U V^T of a matrix G = U S V^T.

Both are odd matrix polynomials iterated on X_0 = G / ||G||_F (so every singular value lies in (0, 1]):
X <- a X + b (X X^T) X + c (X X^T)^2 X, which maps each singular value s to p(s) = a s + b s^3 + c s^5 and keeps
the singular vectors. They differ in the coefficients:

- Newton-Schulz (Keller Jordan's quintic): the same (3.4445, -4.7750, 2.0315) every iteration, tuned to grow
  small singular values fast; it does not converge to 1 but leaves them scattered in about [0.7, 1.2].
- Polar Express (Amsel, Persson, Musco & Gower, 2025): iteration t uses the odd quintic that is minimax-optimal
  (closest to 1 in the max norm) on the interval [lo_t, hi_t] that holds the singular values after t - 1
  iterations, starting from [lower, 1]. The composition is the optimal one among greedy choices and converges
  to 1 (quadratically, then cubically once the interval is tight). The paper's two guards for finite
  precision are kept: each fit is made on [max(lo, cushion * hi), hi], so early polynomials do not chase
  the smallest singular values with huge coefficients, then rescaled to centre on 1 over [lo, hi]; and every
  iteration but the last is evaluated at s / safety (a 1% margin), so rounding that pushes a singular value
  a little past the interval cannot be amplified.

The coefficients are derived here (`optimal_quintic`, a Remez exchange in float64) rather than copied; tests
check them against the values the paper publishes. The iteration runs in float32 or bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from aftermath.errors import ConfigError

ORTHOGONALIZERS = ("newton_schulz", "polar_express")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_LOWER = 1e-3  # singular values (after Frobenius normalisation) the first fit aims to lift
POLAR_EXPRESS_CUSHION = 0.02407327424182761  # the paper's cushion
POLAR_EXPRESS_SAFETY = 1.01

Quintic = tuple[float, float, float]


def _value(q: Quintic, x: float) -> float:
    a, b, c = q
    return a * x + b * x**3 + c * x**5


def optimal_quintic(lo: float, hi: float) -> Quintic:
    """The odd quintic p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| over [lo, hi] (0 < lo <= hi).

    Remez exchange: the optimum's error equioscillates on four points, lo < x1 < x2 < hi, with p below 1 at lo
    and x2 and above 1 at x1 and hi. Solve for (a, b, c, E) on the current points, move x1 and x2 to the
    interior extrema of the error (roots of p'), repeat until E stops changing."""
    if not 0.0 < lo <= hi:
        raise ConfigError(f"optimal_quintic needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    if lo / hi > 1.0 - 5e-6:
        # interval too tight for the linear system: the limit is the quintic with p(hi) = 1, p'(hi) = p''(hi) = 0
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    x1, x2 = lo + (hi - lo) / 4, lo + 3 * (hi - lo) / 4
    error, previous = math.inf, None
    for _ in range(100):
        points = np.array([lo, x1, x2, hi])
        signs = np.array([1.0, -1.0, 1.0, -1.0])  # p + sign * E = 1
        system = np.stack([points, points**3, points**5, signs], axis=1)
        a, b, c, error = np.linalg.solve(system, np.ones(4))
        if previous is not None and abs(previous - error) <= 1e-15:
            break
        previous = error
        # interior extrema of p: 5c y^2 + 3b y + a = 0 with y = x^2
        roots = np.roots([5 * c, 3 * b, a])
        ys = sorted(float(y.real) for y in roots if abs(y.imag) < 1e-12 and lo**2 < y.real < hi**2)
        if len(ys) != 2:
            raise ArithmeticError(f"Remez lost the alternation on [{lo}, {hi}]")
        x1, x2 = math.sqrt(ys[0]), math.sqrt(ys[1])
    return float(a), float(b), float(c)


def polar_express_coefficients(steps: int, lower: float = POLAR_EXPRESS_LOWER,
                               cushion: float = POLAR_EXPRESS_CUSHION,
                               safety: float = POLAR_EXPRESS_SAFETY) -> tuple[Quintic, ...]:
    """The greedy optimal composition for singular values in [lower, 1]: one quintic per iteration."""
    if steps < 1:
        raise ConfigError(f"the orthogonaliser needs at least 1 iteration, got {steps}")
    lo, hi = lower, 1.0
    chosen: list[Quintic] = []
    for _ in range(steps):
        q = optimal_quintic(max(lo, cushion * hi), hi)
        # centre on 1 over the true interval: p(lo) and p(hi) = max p land at 1 -/+ the same error
        scale = 2.0 / (_value(q, lo) + _value(q, hi))
        q = (q[0] * scale, q[1] * scale, q[2] * scale)
        chosen.append(q)
        lo = _value(q, lo)
        hi = 2.0 - lo
    guarded = [(a / safety, b / safety**3, c / safety**5) for a, b, c in chosen[:-1]]
    return tuple(guarded + chosen[-1:])


def singular_value_bounds(coefficients: tuple[Quintic, ...], lower: float) -> tuple[float, float]:
    """Where singular values that start in [lower, 1] end after the iterations, in exact arithmetic: the image
    of [lower, 1] under the composed polynomials, taken on a fine geometric grid of the interval."""
    grid = np.concatenate([np.geomspace(lower, 1.0, 20001), [1.0]])
    for a, b, c in coefficients:
        grid = a * grid + b * grid**3 + c * grid**5
    return float(grid.min()), float(grid.max())


@dataclass(frozen=True)
class Orthogonalizer:
    """One of ORTHOGONALIZERS with its iteration count and compute dtype; `__call__` orthogonalises a matrix."""

    name: str = "newton_schulz"
    steps: int = 5
    dtype: str = "float32"
    coefficients: tuple[Quintic, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in ORTHOGONALIZERS:
            raise ConfigError(f"orthogonalizer {self.name!r} is not known; use one of {ORTHOGONALIZERS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"orthogonalizer dtype {self.dtype!r} is not known; use one of {sorted(DTYPES)}")
        if self.steps < 1:
            raise ConfigError(f"the orthogonaliser needs at least 1 iteration, got steps={self.steps}")
        chosen = ((NEWTON_SCHULZ,) * self.steps if self.name == "newton_schulz"
                  else polar_express_coefficients(self.steps))
        object.__setattr__(self, "coefficients", chosen)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """The approximate polar factor of `g` (2-D), returned in float32 whatever the compute dtype."""
        return orthogonalize(g, self.coefficients, DTYPES[self.dtype])


def orthogonalize(g: torch.Tensor, coefficients: tuple[Quintic, ...], dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Iterate the odd quintics on g / ||g||_F, working on the wide orientation (X X^T the smaller Gram)."""
    x = g.to(torch.float32)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = (x / (x.norm() + 1e-7)).to(dtype)
    for a, b, c in coefficients:
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    x = x.to(torch.float32)
    return (x.T if transposed else x).contiguous()
