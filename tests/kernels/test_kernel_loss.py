"""flow_matching_loss on the Triton path against kernels.reference; determinism."""

from __future__ import annotations

import pytest
import torch
from kernel_asserts import DTYPE_IDS, DTYPES, SHAPES, assert_close, assert_equal, data, normal, shape_id

import kernels
from kernels import loss as loss_mod
from kernels import reference


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _check_loss(v, z, eps, gen):
    vt, zt, et = _leaves(v, z, eps)
    got = kernels.flow_matching_loss(vt, zt, et)
    vr, zr, er = _leaves(v, z, eps)
    want = reference.flow_matching_loss(vr, zr, er)
    assert got.shape == () and got.dtype == torch.float32
    # The loss is an fp32 reduction of the same (possibly low-precision) inputs on both sides: fp32 tolerance.
    assert_close("loss", got, want, torch.float32)
    g = torch.rand((), generator=gen).to(v.device) + 0.5  # an upstream gradient other than 1
    for name, a, b in zip(
        ("dv", "dz", "deps"), torch.autograd.grad(got, (vt, zt, et), g), torch.autograd.grad(want, (vr, zr, er), g)
    ):
        assert_close(name, a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_loss_matches_reference(shape, dtype, gen, device, triton_backend):
    _check_loss(
        normal(shape, dtype, gen, device), data(shape, dtype, gen, device), normal(shape, dtype, gen, device), gen
    )


def test_loss_autocast_dtypes(gen, device, triton_backend):
    """The training case: v from a bf16 network, z and eps fp32."""
    shape = (32, 1, 28, 28)
    v = normal(shape, torch.bfloat16, gen, device)
    _check_loss(v, data(shape, torch.float32, gen, device), normal(shape, torch.float32, gen, device), gen)


def test_loss_non_contiguous(gen, device, triton_backend):
    b = 6
    v = normal((b, 1, 28, 28), torch.float32, gen, device).transpose(2, 3)
    z = data((2 * b, 1, 28, 28), torch.float32, gen, device)[::2]
    eps = normal((b, 1, 28, 28), torch.float32, gen, device).permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    assert not (v.is_contiguous() or z.is_contiguous() or eps.is_contiguous())
    _check_loss(v, z, eps, gen)


def test_loss_only_v_requires_grad(gen, device, triton_backend):
    """Training: only v needs a gradient; the backward then writes dv alone."""
    shape = (3, 1, 28, 28)
    z, eps = data(shape, torch.float32, gen, device), normal(shape, torch.float32, gen, device)
    (v,) = _leaves(normal(shape, torch.float32, gen, device))
    kernels.flow_matching_loss(v, z, eps).backward()
    (vr,) = _leaves(v)
    reference.flow_matching_loss(vr, z, eps).backward()
    assert_close("dv", v.grad, vr.grad)


def test_loss_bitwise_deterministic(gen, device, triton_backend):
    shape = (129, 1, 28, 28)  # 101136 elements: 25 partial sums
    v, z, eps = (normal(shape, torch.float32, gen, device) for _ in range(3))
    first = kernels.flow_matching_loss(v, z, eps)
    for i in range(3):
        assert_equal(f"loss, call {i + 2}", kernels.flow_matching_loss(v, z, eps), first)


def test_loss_multi_chunk_finish(gen, device, triton_backend, monkeypatch):
    """Small launch blocks force 196 partials (32·784 / 128) added in 13 chunks of 16 by the fixed-order pass 2:
    the loop that N > SUM_BLOCK·FINISH_BLOCK = 2^22 takes with the real blocks, at a size the interpreter affords."""
    monkeypatch.setattr(loss_mod, "SUM_BLOCK", 128)
    monkeypatch.setattr(loss_mod, "FINISH_BLOCK", 16)
    shape = (32, 1, 28, 28)
    v, z, eps = (normal(shape, torch.float32, gen, device) for _ in range(3))
    got = kernels.flow_matching_loss(v, z, eps)
    assert_close("loss", got, reference.flow_matching_loss(v, z, eps))
    assert_equal("loss, second call", kernels.flow_matching_loss(v, z, eps), got)
