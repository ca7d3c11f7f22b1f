"""The fused CUDA ButterflyRotate (Triton) against the PyTorch reference, and the reference's own gradients.

The reference gradcheck runs everywhere (CPU, float64). The fused-kernel tests need CUDA and
Triton and are skipped, saying so, where either is absent (CI has no GPU). Gold values come from
the reference in float64 on the same inputs; the fused kernel computes in float32.
"""

from __future__ import annotations

import math

import pytest
import torch

from bmoe_runtime.nn import butterfly
from bmoe_runtime.nn.butterfly import ButterflyRotation, active_pairs, angle_shape, butterfly_apply


def _reference_tables(angles: torch.Tensor, d: int, idx: torch.Tensor | None):
    act = active_pairs(d).to(angles.device)
    c = torch.where(act, torch.cos(angles), torch.ones_like(angles))
    s = torch.where(act, torch.sin(angles), torch.zeros_like(angles))
    return (c, s) if idx is None else (c[idx], s[idx])


@pytest.mark.parametrize("d,transpose", [(2, False), (5, True), (12, False), (12, True)])
def test_reference_gradcheck_float64(d, transpose):
    """torch.autograd.gradcheck of butterfly_apply w.r.t. x and the angles (inactive slots included: zero)."""
    g = torch.Generator().manual_seed(d)
    e = 3
    angles = (torch.rand((e, *angle_shape(d)), generator=g, dtype=torch.float64) * 2 - 1).mul(math.pi).requires_grad_()
    x = torch.randn(7, d, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 2, 1, 0, 2, 2])

    def f(x, angles):
        return butterfly_apply(x, *_reference_tables(angles, d, idx), transpose)

    assert torch.autograd.gradcheck(f, (x, angles), eps=1e-6, atol=1e-8, rtol=1e-6)


def _fused_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the fused Triton ButterflyRotate runs only on CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (it comes with CUDA builds of PyTorch)"
    return None


needs_cuda = pytest.mark.skipif(_fused_ready() is not None, reason=_fused_ready() or "")


def _bank(d: int, e: int, seed: int) -> ButterflyRotation:
    g = torch.Generator().manual_seed(seed)
    rot = ButterflyRotation(d, e, generator=g)
    with torch.no_grad():
        rot.angles.uniform_(-math.pi, math.pi, generator=g)  # far from the identity
    return rot.cuda()


def _run(rot: ButterflyRotation, x: torch.Tensor, idx: torch.Tensor, gy: torch.Tensor, transpose: bool, fused: bool):
    """(y, dx, dangles) of one rotation call on a fresh leaf copy of x."""
    butterfly.use_fused(fused)
    try:
        x = x.detach().clone().requires_grad_()
        rot.zero_grad(set_to_none=True)
        y = rot(x, idx, transpose=transpose)
        y.backward(gy.to(y.dtype))
        return y.detach(), x.grad, rot.angles.grad.clone()
    finally:
        butterfly.use_fused(True)


def _gold(rot: ButterflyRotation, x, idx, gy, transpose):
    ref = ButterflyRotation(rot.d, rot.n_experts).cuda().double()
    with torch.no_grad():
        ref.angles.copy_(rot.angles)
    return _run(ref, x.double(), idx, gy.double(), transpose, fused=False)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the gold's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@needs_cuda
@pytest.mark.parametrize("d", [48, 512, 768, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_fused_matches_reference(d, dtype, transpose):
    e, m = 64, 1000
    rot = _bank(d, e, seed=d)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, d, device="cuda", generator=g).to(dtype)
    idx = torch.randint(0, e, (m,), device="cuda", generator=g)
    idx[:300] = 7  # one expert used by many rows (atomics of many tiles into one slot)
    idx[idx == 3] = 4  # and one expert unused
    gy = torch.randn(m, d, device="cuda", generator=g)
    y, dx, da = _run(rot, x, idx, gy, transpose, fused=True)
    y_ref, dx_ref, da_ref = _run(rot, x, idx, gy, transpose, fused=False)
    y_gold, dx_gold, da_gold = _gold(rot, x, idx, gy, transpose)
    assert y.dtype == y_ref.dtype == torch.float32 and dx.dtype == dx_ref.dtype == x.dtype
    # docs/ops.md's bound for the outputs (x's bf16 rounding is shared with the gold: arithmetic is float32)
    bound = 1e-5 * (1 + x.float().abs().max().item())
    assert (y.double() - y_gold).abs().max().item() <= bound
    dx_bound = bound if dtype == torch.float32 else 2 ** -8 * dx_gold.abs().max().item()  # dx rounded to bf16
    assert (dx.double() - dx_gold).abs().max().item() <= dx_bound
    assert _err(da, da_gold) <= 2e-5  # sums over up to 300 rows per angle, float32 atomics
    assert _err(y, y_gold) <= 2 * _err(y_ref, y_gold) + 1e-6  # and no worse than the float32 reference
    assert (da[3] == 0).all()  # unused expert: no gradient
    assert (da[:, ~rot.active] == 0).all()  # identity slots of a non-power-of-two d: no gradient


@needs_cuda
def test_fused_without_expert_index_and_empty_batch():
    rot = _bank(100, 1, seed=3)
    x = torch.randn(33, 100, device="cuda")
    gy = torch.randn(33, 100, device="cuda")
    (y, dx, da), (y_ref, dx_ref, da_ref) = (_run(rot, x, None, gy, False, f) for f in (True, False))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(da, da_ref, rtol=0, atol=1e-4)
    empty = torch.zeros(0, 100, device="cuda", requires_grad=True)
    out = rot(empty)
    out.sum().backward()
    assert out.shape == (0, 100) and empty.grad.shape == (0, 100)


@needs_cuda
def test_fused_moe_layer_matches_reference():
    """A whole ButterflyMoE layer (both rotations sharing one row grouping) under bf16 autocast."""
    from bmoe_runtime.nn.moe import ButterflyMoE
    torch.manual_seed(0)
    layer = ButterflyMoE(256, 1024, n_experts=16, top_k=2, variant="butterfly", router_noise=0.0).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    outs = []
    for fused in (True, False):
        butterfly.use_fused(fused)
        try:
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().mean().backward()
            outs.append((y.float(), layer.experts.phi.angles.grad.clone(), layer.experts.weight.grad.clone()))
        finally:
            butterfly.use_fused(True)
    for a, b in zip(*outs):
        assert _err(a, b) < 2e-2  # both take the same bf16 matmul; rotations differ by float32 rounding


@needs_cuda
def test_grouped_dense_experts_match_loop():
    """IndependentExperts' sync-free grouped GEMM (bf16 autocast) against the per-expert loop in float32."""
    from bmoe_runtime.nn.moe import IndependentExperts
    torch.manual_seed(0)
    bank = IndependentExperts(256, 512, 8).cuda()
    x = torch.randn(500, 256, device="cuda", requires_grad=True)
    idx = torch.randint(0, 8, (500,), device="cuda")
    idx[idx == 5] = 6  # an expert without rows
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bank(x, idx)
    y.float().sum().backward()
    gx, gw = x.grad.clone(), bank.weight.grad.clone()
    x.grad = None
    bank.zero_grad(set_to_none=True)
    y_ref = bank(x, idx)  # no autocast: the float32 loop
    y_ref.sum().backward()
    assert _err(y, y_ref) < 1e-2 and _err(gx, x.grad) < 1e-2 and _err(gw, bank.weight.grad) < 1e-2
    assert (gw[5] == 0).all()
