"""Property tests: every op equals its reference for arbitrary shapes, dtypes and layouts (hypothesis).

Few examples (the interpreter costs ~5 ms per 1024-element program), small shapes, no deadline.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_asserts import DTYPES, TRITON_DEVICE, assert_close, away_from_zero, data, poisoned_outputs

import kernels
from kernels import reference

pytestmark = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton path needs TRITON_INTERPRET=1 or a CUDA GPU")


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 9))
    inner = draw(st.lists(st.integers(1, 40), min_size=0, max_size=3))
    return dict(
        shape=(batch, *inner),
        dtype=draw(st.sampled_from(DTYPES)),
        transpose=draw(st.booleans()),  # read a transposed (non-contiguous) view when there are >= 2 dims
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(case, n, maker=data):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    out = []
    for i in range(n):
        x = maker(shape, case["dtype"], gen, TRITON_DEVICE)
        if case["transpose"] and len(shape) >= 2 and i % 2 == 0:  # every other input strided
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        out.append(x)
    return gen, out


@settings(max_examples=12, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(case=cases())
def test_flow_path_property(case):
    gen, (z, eps) = _inputs(case, 2)
    t = torch.rand(z.shape[0], generator=gen).to(TRITON_DEVICE)
    with poisoned_outputs(), kernels.use_backend("triton"):
        x_t, u = kernels.flow_path(z, eps, t)
    rx, ru = reference.flow_path(z, eps, t)
    assert_close("x_t", x_t, rx)
    assert_close("u", u, ru)


@settings(max_examples=12, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(case=cases())
def test_loss_property(case):
    _, (v, z, eps) = _inputs(case, 3)
    v = v.detach().requires_grad_()
    with poisoned_outputs(), kernels.use_backend("triton"):
        loss = kernels.flow_matching_loss(v, z, eps)
        (dv,) = torch.autograd.grad(loss, v)
    vr = v.detach().requires_grad_()
    want = reference.flow_matching_loss(vr, z, eps)
    assert_close("loss", loss, want, torch.float32)
    assert_close("dv", dv, torch.autograd.grad(want, vr)[0])


@settings(max_examples=12, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(case=cases(), guided=st.booleans())
def test_euler_property(case, guided):
    gen, (vc, vu) = _inputs(case, 2, away_from_zero)
    # Same signs and |vu| in [0.25, 0.75): the guided field 1.5·vc − 0.5·vu is at least 1.5·0.5 − 0.5·0.75 = 0.375
    # in size. (|vu| up to 1.5 let it reach 0: bf16 rounds vu = 1.49 to 1.5, and 1.5·0.5 − 0.5·1.5 = 0 leaves x as
    # it was, which the check below took for an unwritten element; seen once in CI-like runs.)
    vu = (vu.float().abs() * 0.5 * vc.float().sign()).to(vc.dtype)
    x0 = torch.rand(case["shape"], generator=gen).to(TRITON_DEVICE)
    x = x0.clone()
    with kernels.use_backend("triton"):
        if guided:
            kernels.guided_euler_step_(x, vc, vu, 0.25, 1.5)
        else:
            kernels.euler_step_(x, vc, torch.tensor(0.25, device=TRITON_DEVICE))  # h on x's device, as on CUDA
    want = (
        reference.guided_euler_step_(x0.clone(), vc, vu, 0.25, 1.5)
        if guided
        else reference.euler_step_(x0.clone(), vc, 0.25)
    )
    assert (x != x0).all(), "an element was left unwritten"
    assert_close("x", x, want)
