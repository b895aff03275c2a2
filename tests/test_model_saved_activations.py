"""The norm and SwiGLU keep less for backward than autograd's own graph of the same operations, with the same
forward bits and correct gradients."""

import pytest
import torch
import torch.nn.functional as F

from aftermath.model.transformer import RMSNorm, _RMSNormFunction, _SwiGLUFunction

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def composite_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def composite_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct tensors autograd keeps for backward of fn(*inputs) (inputs that are kept count too)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    gate = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_forward_bits_and_gradients_as_the_composite(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 32, generator=gen).to(dtype).requires_grad_()
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    want = composite_rms_norm(x, norm.weight, 1e-6)
    got = norm(x)
    assert torch.equal(got, want)
    upstream = torch.randn(got.shape, generator=gen).to(got.dtype)
    g_want = torch.autograd.grad(want, (x, norm.weight), upstream)
    g_got = torch.autograd.grad(got, (x, norm.weight), upstream)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)

    gate, up = (torch.randn(3, 16, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    want, got = composite_swiglu(gate, up), _SwiGLUFunction.apply(gate, up)
    assert torch.equal(got, want)
    upstream = torch.randn(got.shape, generator=gen).to(dtype)
    for a, b in zip(torch.autograd.grad(got, (gate, up), upstream), torch.autograd.grad(want, (gate, up), upstream)):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def test_each_keeps_one_activation_less_than_the_composite():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.ones(256, requires_grad=True)
    activation = x.numel() * 4
    composite, fused = saved_bytes(composite_rms_norm, x, w, 1e-6), saved_bytes(_RMSNormFunction.apply, x, w, 1e-6)
    assert composite - fused >= activation  # the normalised copy of x is not kept
    gate, up = torch.randn(64, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    assert saved_bytes(composite_swiglu, gate, up) - saved_bytes(_SwiGLUFunction.apply, gate, up) >= activation
