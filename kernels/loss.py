"""flow_matching_loss: ``mean((v − (z − eps))²)`` without materialising ``u``, deterministic, and its backward
in one pass.

Forward, two launches and no atomics, so the same inputs give the same bits on every call:
1. one program per BLOCK elements writes the fp32 sum of its squared errors to ``partial[pid]``;
2. one program adds the partials in a fixed order (a BLOCK-wide fp32 accumulator over ceil(m / BLOCK)
   chunks, then one tree sum) and divides by N.
Backward: ``dv = g·2/N·(v − (z − eps))`` (and ``dz = −dv``, ``deps = +dv`` when they require grad) in one pass.

``fastflow::flow_matching_loss`` and ``fastflow::flow_matching_loss_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import BLOCK, NUM_WARPS, device_guard, flat

__all__ = ["flow_matching_loss"]

# Forward pass 1 reads 3 tensors and keeps nothing but one scalar per program; 4096 elements (8 warps) per
# program makes the partial buffer 1/4096 of N (16384 floats at N = 2^26), so pass 2 is a few microseconds.
SUM_BLOCK = 4096
SUM_WARPS = 8
FINISH_BLOCK = 1024


@triton.jit
def _diff(v_ptr, z_ptr, eps_ptr, offs, mask):
    """v − (z − eps) in fp32 for one block."""
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v - (z - eps)


@triton.jit
def _loss_partial_kernel(v_ptr, z_ptr, eps_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = offs < n
    d = tl.where(mask, _diff(v_ptr, z_ptr, eps_ptr, offs, mask), 0.0)
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _loss_finish_kernel(partial_ptr, out_ptr, m, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, m, BLOCK):  # fixed order: lane j adds partials j, j + BLOCK, j + 2·BLOCK, …
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < m, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / n)


@triton.jit
def _loss_bwd_kernel(
    g_ptr,  # 0-d fp32 dL/dloss
    v_ptr,
    z_ptr,
    eps_ptr,
    dv_ptr,
    dz_ptr,
    deps_ptr,
    n,
    scale,  # 2 / N
    WRITE_DV: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WRITE_DEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dv = _diff(v_ptr, z_ptr, eps_ptr, offs, mask) * (tl.load(g_ptr).to(tl.float32) * scale)
    if WRITE_DV:
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    if WRITE_DZ:
        tl.store(dz_ptr + offs, (-dv).to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DEPS:
        tl.store(deps_ptr + offs, dv.to(deps_ptr.dtype.element_ty), mask=mask)


def _forward(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    n = v.numel()
    m = triton.cdiv(n, SUM_BLOCK)
    partial = torch.empty(m, dtype=torch.float32, device=v.device)  # [m] one sum of squares per program
    out = torch.empty((), dtype=torch.float32, device=v.device)
    with device_guard(v.device):
        wrap_triton(_loss_partial_kernel)[(m,)](
            flat(v), flat(z), flat(eps), partial, n, BLOCK=SUM_BLOCK, num_warps=SUM_WARPS
        )
        wrap_triton(_loss_finish_kernel)[(1,)](partial, out, m, n, BLOCK=FINISH_BLOCK, num_warps=NUM_WARPS)
    return out


@triton_op("fastflow::flow_matching_loss", mutates_args=())
def _loss_op(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return _forward(v, z, eps)


@triton_op("fastflow::flow_matching_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: torch.Tensor,
    v: torch.Tensor,
    z: torch.Tensor,
    eps: torch.Tensor,
    need_dv: bool,
    need_dz: bool,
    need_deps: bool,
) -> list[torch.Tensor]:
    """The requested ones of (dv, dz, deps), in that order, each in its input's dtype."""
    n = v.numel()
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_dv else None
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if need_dz else None
    deps = torch.empty_like(eps, memory_format=torch.contiguous_format) if need_deps else None
    out = [g for g in (dv, dz, deps) if g is not None]
    if out:
        any_out = out[0]
        with device_guard(v.device):
            wrap_triton(_loss_bwd_kernel)[(triton.cdiv(n, BLOCK),)](
                grad,
                flat(v),
                flat(z),
                flat(eps),
                any_out if dv is None else dv,
                any_out if dz is None else dz,
                any_out if deps is None else deps,
                n,
                2.0 / n,
                WRITE_DV=dv is not None,
                WRITE_DZ=dz is not None,
                WRITE_DEPS=deps is not None,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    return out


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    v, z, eps = ctx.saved_tensors
    wanted = tuple(ctx.needs_input_grad)
    it = iter(_loss_backward_op(grad, v, z, eps, *wanted))
    return tuple(next(it) if w else None for w in wanted)


_loss_op.register_autograd(_backward, setup_context=_setup)


def flow_matching_loss(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Triton MSE as a 0-d fp32 tensor; arguments already checked by :func:`kernels.flow_matching_loss`."""
    return _loss_op(v, z, eps)
