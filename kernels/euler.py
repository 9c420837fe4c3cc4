"""euler_step_ and guided_euler_step_: the sampler's fused in-place update.

``x ← x + h·v`` and ``x ← x + h·(v_uncond + w·(v_cond − v_uncond))``: one read of each input, one write of x,
fp32 accumulation into the fp32 state x whatever v's dtype. ``h`` and ``w`` arrive as 1-element fp32 tensors
that the kernel loads, so a new step size never recompiles a graph or re-specialises the kernel.

``fastflow::euler_step_`` and ``fastflow::guided_euler_step_`` (both mutate ``x``; not differentiable: sampling
runs under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import BLOCK, NUM_WARPS, device_guard, flat

__all__ = ["euler_step_", "guided_euler_step_"]


@triton.jit
def _euler_kernel(
    x_ptr,  # fp32, updated in place
    v_ptr,  # v, or v_cond when GUIDED
    vu_ptr,  # v_uncond; unused unless GUIDED
    h_ptr,  # [1] fp32
    w_ptr,  # [1] fp32; unused unless GUIDED
    n,
    GUIDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = vu + tl.load(w_ptr) * (v - vu)
    tl.store(x_ptr + offs, x + v * tl.load(h_ptr), mask=mask)


def _launch(x: torch.Tensor, v: torch.Tensor, vu: torch.Tensor, h: torch.Tensor, w: torch.Tensor, guided: bool):
    n = x.numel()
    if not n:
        return
    # A strided x is updated through a contiguous copy and written back: the kernel indexes flat memory.
    xc = x if x.is_contiguous() else x.contiguous()
    vf = flat(v)
    with device_guard(x.device):
        wrap_triton(_euler_kernel)[(triton.cdiv(n, BLOCK),)](
            xc, vf, flat(vu) if guided else vf, h, w, n, GUIDED=guided, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    if xc is not x:
        x.copy_(xc)


@triton_op("fastflow::euler_step_", mutates_args={"x"})
def _euler_op(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> None:
    _launch(x, v, v, h, h, guided=False)


@triton_op("fastflow::guided_euler_step_", mutates_args={"x"})
def _guided_op(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    _launch(x, v_cond, v_uncond, h, w, guided=True)


def euler_step_(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Triton ``x ← x + h·v``; ``h`` a 1-element fp32 tensor on x's device. Returns ``x``."""
    _euler_op(x, v, h)
    return x


def guided_euler_step_(x, v_cond, v_uncond, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton ``x ← x + h·(v_uncond + w·(v_cond − v_uncond))``; ``h``, ``w`` 1-element fp32 tensors. Returns ``x``."""
    _guided_op(x, v_cond, v_uncond, h, w)
    return x
