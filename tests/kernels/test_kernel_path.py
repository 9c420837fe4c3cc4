"""flow_path, with and without its target u, on the Triton path against kernels.reference: forward and every
gradient."""

from __future__ import annotations

import pytest
import torch
from kernel_asserts import DTYPE_IDS, DTYPES, SHAPES, assert_close, data, normal, shape_id

import kernels
from kernels import reference


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _check_path(z, eps, t, gen):
    """Run both backends on copies of (z, eps, t); compare x_t, u and dz, deps, dt for random upstream grads."""
    zt, et, tt = _leaves(z, eps, t)
    x_t, u = kernels.flow_path(zt, et, tt)
    zr, er, tr = _leaves(z, eps, t)
    rx, ru = reference.flow_path(zr, er, tr)
    assert_close("x_t", x_t, rx)
    assert_close("u", u, ru)
    gx, gu = normal(z.shape, z.dtype, gen, z.device), normal(z.shape, z.dtype, gen, z.device)
    got = torch.autograd.grad((x_t, u), (zt, et, tt), (gx, gu))
    want = torch.autograd.grad((rx, ru), (zr, er, tr), (gx, gu))
    for name, g, w in zip(("dz", "deps"), got, want):
        assert_close(name, g, w)
    # dt = Σ gx·(z − ε) over each sample: n fp32 products (n = 784 for an MNIST image) that the kernel and autograd
    # add in different orders, so with cancellation the two can differ by more than a fixed fp32 tolerance (seen:
    # 1.2e-5 on a value of -0.24). Both must lie within the fp32 rounding bound around the float64 sum:
    # |error| ≤ 2·(√n + 2)·ε32·Σ|gx|·(|z| + |ε|) (Higham's probabilistic bound for the sum, plus the rounding of
    # z − ε and of each product, measured against the magnitudes that cancel; doubled). A wrong formula is off
    # by O(1). Plus the rounding of the result to t's dtype.
    g64, z64, e64 = gx.double(), z.double(), eps.double()
    _assert_sum_close("dt", got[2], want[2], g64 * (z64 - e64), g64.abs() * (z64.abs() + e64.abs()), t.shape[0])


def _assert_sum_close(name, got, want, terms, magnitudes, rows):
    terms, magnitudes = terms.reshape(rows, -1).cpu(), magnitudes.reshape(rows, -1).cpu()
    exact = terms.sum(1)
    bound = 2 * (terms.shape[1] ** 0.5 + 2) * torch.finfo(torch.float32).eps * magnitudes.sum(1)
    bound += torch.finfo(got.dtype).eps * exact.abs()  # the result's rounding to its dtype (t's: bf16 in one test)
    assert got.shape == want.shape == exact.shape, f"{name}: shapes {list(got.shape)}, {list(want.shape)}"
    for who, g in (("Triton", got), ("autograd", want)):
        err = (g.detach().double().cpu() - exact).abs()
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name} ({who}): error {err[worst]:.3g} beyond the fp32 summation bound {bound[worst]:.3g} "
            f"at row {worst} (value {float(g[worst]):.6g}, float64 sum {float(exact[worst]):.6g})"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_flow_path_matches_reference(shape, dtype, gen, device, triton_backend):
    z, eps = data(shape, dtype, gen, device), normal(shape, dtype, gen, device)
    t = torch.rand(shape[0], generator=gen).to(device)
    _check_path(z, eps, t, gen)


def test_flow_path_non_contiguous(gen, device, triton_backend):
    """Transposed z, a strided eps slice and a strided t, each read in logical (row-major) order."""
    b = 5
    z = data((b, 1, 28, 28), torch.float32, gen, device).transpose(2, 3)
    eps = normal((b, 1, 28, 56), torch.float32, gen, device)[..., ::2]
    t = torch.rand(2 * b, generator=gen).to(device)[::2]
    assert not (z.is_contiguous() or eps.is_contiguous() or t.is_contiguous())
    _check_path(z, eps, t, gen)


def test_flow_path_mixed_dtypes(gen, device, triton_backend):
    """bf16 data with fp32 noise and bf16 t: outputs take z's dtype, the math stays fp32."""
    z = data((3, 1, 28, 28), torch.bfloat16, gen, device)
    eps = normal((3, 1, 28, 28), torch.float32, gen, device)
    t = torch.rand(3, generator=gen).to(device, torch.bfloat16)
    _check_path(z, eps, t, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(7,), (1025,), (3, 1, 28, 28), (37, 1, 28, 28)], ids=shape_id)
def test_flow_path_without_target(shape, dtype, gen, device, triton_backend):
    """with_target=False: (x_t, None) on both backends, and the same x_t and gradients in z, eps, t as the reference.
    The kernel is handed x_t's buffer in place of u's: had it stored u anyway, x_t would hold z − eps and fail."""
    z, eps = data(shape, dtype, gen, device), normal(shape, dtype, gen, device)
    t = torch.rand(shape[0], generator=gen).to(device)
    zt, et, tt = _leaves(z, eps, t)
    x_t, u = kernels.flow_path(zt, et, tt, with_target=False)
    assert u is None
    zr, er, tr = _leaves(z, eps, t)
    rx, ru = reference.flow_path(zr, er, tr, with_target=False)
    assert ru is None
    assert_close("x_t", x_t, rx)
    assert_close("x_t vs with_target=True", x_t, kernels.flow_path(z, eps, t)[0])
    gx = normal(shape, dtype, gen, device)
    got = torch.autograd.grad(x_t, (zt, et, tt), gx)
    want = torch.autograd.grad(rx, (zr, er, tr), gx)
    for name, g, w in zip(("dz", "deps"), got, want):
        assert_close(name, g, w)
    g64, z64, e64 = gx.double(), z.double(), eps.double()
    _assert_sum_close("dt", got[2], want[2], g64 * (z64 - e64), g64.abs() * (z64.abs() + e64.abs()), t.shape[0])


def test_flow_path_without_target_auto_cpu(gen):
    """The default (auto) path on CPU tensors is the reference, and it skips u too."""
    z, eps = data((3, 1, 28, 28), torch.float32, gen, "cpu"), normal((3, 1, 28, 28), torch.float32, gen, "cpu")
    t = torch.rand(3, generator=gen)
    with kernels.use_backend("auto"):
        x_t, u = kernels.flow_path(z, eps, t, with_target=False)
    assert u is None
    assert torch.equal(x_t, reference.flow_path(z, eps, t)[0])


def test_flow_path_empty_batch(device, triton_backend):
    z = torch.empty(0, 1, 28, 28, device=device)
    x_t, u = kernels.flow_path(z, z, torch.empty(0, device=device))
    assert x_t.shape == u.shape == z.shape
    x_t, u = kernels.flow_path(z, z, torch.empty(0, device=device), with_target=False)
    assert x_t.shape == z.shape and u is None


def test_outputs_are_poisoned(triton_backend):
    """The premise of every forward test: inside the fixture, fresh outputs start as NaN, not zeros."""
    assert torch.empty(5).isnan().all()
    assert torch.empty_like(torch.zeros(3, dtype=torch.bfloat16), memory_format=torch.contiguous_format).isnan().all()
