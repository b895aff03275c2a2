"""Muon's orthogonalisers against an SVD reference: the Polar Express coefficients derived here match the paper,
each fit is minimax-optimal, and the iterations land the singular values of random and ill-conditioned matrices
where the derivation says, in float32 and bfloat16."""

import numpy as np
import pytest
import torch

from aftermath.errors import ConfigError
from aftermath.optim.orthogonal import (NEWTON_SCHULZ, POLAR_EXPRESS_LOWER, Orthogonalizer, optimal_quintic,
                                        polar_express_coefficients, singular_value_bounds)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Amsel, Persson, Musco & Gower (2025), the coefficients they publish for Muon (lower bound 1e-3, the paper's
# cushion), before their 1.01 safety factor
PAPER = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
]


def test_derived_coefficients_are_the_papers():
    derived = polar_express_coefficients(len(PAPER), safety=1.0)
    assert np.allclose(np.array(derived), np.array(PAPER), rtol=1e-9, atol=0)
    guarded = polar_express_coefficients(3)
    a, b, c = PAPER[0]
    assert np.allclose(guarded[0], (a / 1.01, b / 1.01**3, c / 1.01**5), rtol=1e-9)
    assert np.allclose(guarded[-1], PAPER[2], rtol=1e-9)  # the last iteration lands on 1: no margin


@pytest.mark.parametrize("lo,hi", [(1e-3, 1.0), (0.05, 1.0), (0.5, 1.3), (0.9, 1.0)])
def test_each_fit_is_minimax_optimal(lo, hi):
    q = np.array(optimal_quintic(lo, hi))
    grid = np.linspace(lo, hi, 200001)

    def worst(coef):
        return np.abs(1 - (coef[0] * grid + coef[1] * grid**3 + coef[2] * grid**5)).max()

    best = worst(q)
    # equioscillation: the error reaches its maximum at lo (p below 1) and at hi (p above 1)
    p_lo, p_hi = (q[0] * x + q[1] * x**3 + q[2] * x**5 for x in (lo, hi))
    assert np.isclose(1 - p_lo, best, rtol=1e-6) and np.isclose(p_hi - 1, best, rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(200):  # no nearby quintic does better
        assert worst(q * (1 + 1e-4 * rng.standard_normal(3))) >= best * (1 - 1e-9)


def matrix_with_spectrum(rows, cols, singular_values, seed):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=gen, dtype=torch.float64))
    return (u * torch.as_tensor(singular_values, dtype=torch.float64)) @ v.T, u, v


def polar_error(out, u, v):
    """Spectral-norm distance of `out` from the exact polar factor U V^T."""
    return float(torch.linalg.matrix_norm(out.double() - u @ v.T, ord=2))


# dtype -> tolerance around the derived interval (float32 rounding; bfloat16's 8-bit mantissa), and on the
# distance from U V^T, where bfloat16 also perturbs the singular vectors (measured: up to 0.11 beyond the interval)
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.05}
POLAR_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(128, 128), (64, 192), (256, 96)])
def test_singular_values_land_where_the_derivation_says(dtype, shape):
    k = min(shape)
    # the design interval: singular values spanning a factor 1e3
    spectrum = np.geomspace(POLAR_EXPRESS_LOWER, 1.0, k)
    g, u, v = matrix_with_spectrum(*shape, spectrum, seed=sum(shape))
    tol = TOLERANCE[dtype]
    for name in ("polar_express", "newton_schulz"):
        orth = Orthogonalizer(name, 5, dtype)
        # after Frobenius normalisation the spectrum lies in [s_min / ||s||, s_max / ||s||], within [start, 1]
        start = spectrum.min() / np.linalg.norm(spectrum)
        lo, hi = singular_value_bounds(orth.coefficients, start)
        out = orth(g.float())
        assert out.dtype == torch.float32 and out.shape == shape
        s = torch.linalg.svdvals(out.double()).numpy()
        assert s.min() >= lo - tol and s.max() <= hi + tol, (name, s.min(), s.max(), lo, hi)
        assert polar_error(out, u, v) <= max(1 - lo, hi - 1) + POLAR_TOLERANCE[dtype]


def test_polar_express_is_closer_to_the_polar_factor_than_newton_schulz():
    # condition number 100; normalised, the smallest singular value is 2.6e-3, inside the design interval
    spectrum = np.geomspace(1.0, 1e-2, 128)
    g, u, v = matrix_with_spectrum(128, 256, spectrum, seed=3)
    errors = {name: polar_error(Orthogonalizer(name, 5)(g.float()), u, v)
              for name in ("polar_express", "newton_schulz")}
    assert errors["polar_express"] < 0.15 and errors["newton_schulz"] > 0.3, errors  # measured 0.124, 0.318
    # and Polar Express converges: two more iterations reach float32 rounding, Newton-Schulz stays put
    assert polar_error(Orthogonalizer("polar_express", 7)(g.float()), u, v) < 1e-4
    assert polar_error(Orthogonalizer("newton_schulz", 7)(g.float()), u, v) > 0.3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ill_conditioned_matrices_stay_bounded(dtype):
    # condition number 1e8 and an exactly rank-deficient part: tiny singular values cannot be lifted in 5
    # iterations, but nothing may exceed the derived upper bound or turn into NaN
    spectrum = np.concatenate([np.geomspace(1.0, 1e-8, 60), np.zeros(4)])
    g, u, v = matrix_with_spectrum(64, 160, spectrum, seed=5)
    for name in ("polar_express", "newton_schulz"):
        orth = Orthogonalizer(name, 5, dtype)
        out = orth(g.float())
        assert torch.isfinite(out).all()
        s = torch.linalg.svdvals(out.double()).numpy()
        _, hi = singular_value_bounds(orth.coefficients, 1e-9)
        assert s.max() <= hi + TOLERANCE[dtype], (name, s.max(), hi)
        # the well-conditioned head of the spectrum is orthogonalised as the derivation says: out v_i = p(s_i) u_i
        big = torch.as_tensor(spectrum >= 0.05)
        lo, hi = singular_value_bounds(orth.coefficients, 0.05 / np.linalg.norm(spectrum))
        head_error = float(torch.linalg.matrix_norm(out.double() @ v[:, big] - u[:, big], ord=2))
        assert head_error <= max(1 - lo, hi - 1) + POLAR_TOLERANCE[dtype], (name, head_error, lo, hi)


def test_derived_interval_after_five_iterations():
    # the stated accuracy of the two orthogonalisers from the design interval [1e-3, 1]
    pe = singular_value_bounds(polar_express_coefficients(5), POLAR_EXPRESS_LOWER)
    ns = singular_value_bounds((NEWTON_SCHULZ,) * 5, POLAR_EXPRESS_LOWER)
    assert 0.85 < pe[0] < pe[1] < 1.13
    assert ns[0] < 0.5 and ns[1] > 1.2


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="polar_express"):
        Orthogonalizer("polar", 5)
    with pytest.raises(ConfigError, match="dtype"):
        Orthogonalizer("polar_express", 5, "float8")
    with pytest.raises(ConfigError, match="at least 1"):
        Orthogonalizer("polar_express", 0)
