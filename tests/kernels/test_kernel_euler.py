"""euler_step_ and guided_euler_step_ on the Triton path against kernels.reference.

An in-place op has no fresh output to poison, so the inputs are built to expose an unwritten element instead:
v is bounded away from zero (|v| >= 0.5) and h >= 0.1, so every element must move by >= 0.05, and a strided x
sits inside a NaN-filled buffer whose other elements must stay NaN (nothing written outside x).
"""

from __future__ import annotations

import pytest
import torch
from kernel_asserts import DTYPE_IDS, DTYPES, SHAPES, assert_close, away_from_zero, data, shape_id

import kernels
from kernels import reference


def _h(gen, device, as_tensor=True):
    h = 0.1 + 0.8 * torch.rand((), generator=gen)
    return h.to(device) if as_tensor else float(h)


def _check_moved(x_new: torch.Tensor, x_old: torch.Tensor):
    unmoved = int((x_new == x_old).sum())
    assert unmoved == 0, f"x: {unmoved}/{x_new.numel()} elements left unchanged by the step"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_euler_step_matches_reference(shape, dtype, gen, device, triton_backend):
    x0 = data(shape, torch.float32, gen, device)
    v = away_from_zero(shape, dtype, gen, device)
    h = _h(gen, device)
    x = x0.clone()
    out = kernels.euler_step_(x, v, h)
    assert out is x
    _check_moved(x, x0)
    assert_close("x", x, reference.euler_step_(x0.clone(), v, h))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_guided_euler_step_matches_reference(shape, dtype, gen, device, triton_backend):
    x0 = data(shape, torch.float32, gen, device)
    # v_cond − v_uncond has v_uncond's sign and w >= 0, so the guided field keeps |v| >= 0.5 after rounding.
    v_uncond = away_from_zero(shape, torch.float32, gen, device)
    v_cond = (v_uncond + v_uncond.sign() * torch.rand(shape, generator=gen).to(device)).to(dtype)
    v_uncond = v_uncond.to(dtype)
    h, w = _h(gen, device), (3 * torch.rand((), generator=gen)).to(device)
    x = x0.clone()
    assert kernels.guided_euler_step_(x, v_cond, v_uncond, h, w) is x
    _check_moved(x, x0)
    assert_close("x", x, reference.guided_euler_step_(x0.clone(), v_cond, v_uncond, h, w))


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_euler_non_contiguous(guided, gen, device, triton_backend):
    b = 7
    buf = torch.full((b, 2, 28, 28), float("nan"), device=device)
    x = buf[:, 0]  # [b, 28, 28] strided: every other 784-block of buf
    x.copy_(data((b, 28, 28), torch.float32, gen, device))
    x0 = x.clone()
    v = away_from_zero((b, 28, 28), torch.bfloat16, gen, device).transpose(1, 2)
    vu = away_from_zero((b, 28, 56), torch.float32, gen, device)[..., ::2]
    vu.copy_(vu.abs() * v.float().sign())  # same sign as v: the guided field stays away from zero
    assert not (x.is_contiguous() or v.is_contiguous() or vu.is_contiguous())
    h = _h(gen, device)
    if guided:
        kernels.guided_euler_step_(x, v, vu, h, 0.5)
        want = reference.guided_euler_step_(x0.clone(), v, vu, h, 0.5)
    else:
        kernels.euler_step_(x, v, h)
        want = reference.euler_step_(x0.clone(), v, h)
    _check_moved(x, x0)
    assert_close("x", x, want)
    assert buf[:, 1].isnan().all(), "the step wrote outside x"


def test_euler_float_and_tensor_scalars_agree(gen, device, triton_backend):
    shape = (3, 1, 28, 28)
    x0, vc, vu = (
        data(shape, torch.float32, gen, device),
        *(away_from_zero(shape, torch.float32, gen, device) for _ in range(2)),
    )
    h = _h(gen, device, as_tensor=False)
    a, b = x0.clone(), x0.clone()
    kernels.guided_euler_step_(a, vc, vu, h, 2.0)
    kernels.guided_euler_step_(
        b, vc, vu, torch.tensor(h, device=device), torch.tensor(2.0, dtype=torch.float64, device=device)
    )
    assert torch.equal(a, b)
    kernels.euler_step_(a, vc, h)
    kernels.euler_step_(b, vc, torch.tensor([h], device=device))  # a 1-element tensor is a scalar too
    assert torch.equal(a, b)


def test_euler_empty(device, triton_backend):
    x = torch.empty(0, 1, 28, 28, device=device)
    assert kernels.euler_step_(x, x.clone(), 0.1) is x
