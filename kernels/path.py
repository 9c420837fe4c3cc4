"""flow_path: ``x_t = t·z + (1 − t)·eps`` and ``u = z − eps`` in one pass, and the seeded variant that draws
``eps`` inside the kernel (Philox, ``tl.randn``) so that it is never read from memory.

Kernel, launcher and ``torch.library`` registration (``fastflow::flow_path``, ``fastflow::flow_path_seeded``,
their backward ``fastflow::flow_path_backward``) live here; the public entry points and the dispatch are in
:mod:`kernels`. The math is fp32 whatever the storage dtype; outputs take z's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import BLOCK, NUM_WARPS, flat
from .philox import philox_normal

__all__ = ["flow_path", "flow_path_seeded"]


@triton.jit
def _flow_path_fwd_kernel(
    z_ptr,
    eps_ptr,  # unused when SEEDED
    t_ptr,  # [B]
    state_ptr,  # int64 [2] = (seed, offset); unused unless SEEDED
    xt_ptr,
    u_ptr,
    n,
    per_sample,  # elements per sample: t index = flat index // per_sample
    SEEDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64: no overflow past 2^31
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SEEDED:
        eps = tl.randn(tl.load(state_ptr), tl.load(state_ptr + 1) + offs)
    else:
        eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs // per_sample, mask=mask, other=0.0).to(tl.float32)
    x_t = t * z + (1.0 - t) * eps
    tl.store(xt_ptr + offs, x_t.to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offs, (z - eps).to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flow_path_bwd_kernel(
    gx_ptr,  # dL/dx_t
    gu_ptr,  # dL/du
    t_ptr,
    dz_ptr,
    deps_ptr,  # unused unless WRITE_DEPS
    n,
    per_sample,
    WRITE_DEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs // per_sample, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, (t * gx + gu).to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DEPS:
        tl.store(deps_ptr + offs, ((1.0 - t) * gx - gu).to(deps_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, state: torch.Tensor, seeded: bool):
    x_t = torch.empty_like(z, memory_format=torch.contiguous_format)
    u = torch.empty_like(z, memory_format=torch.contiguous_format)
    n = z.numel()
    if n:
        zf, tf = flat(z), flat(t)
        ef = zf if seeded else flat(eps)
        wrap_triton(_flow_path_fwd_kernel)[(triton.cdiv(n, BLOCK),)](
            zf, ef, tf, state, x_t, u, n, n // z.shape[0], SEEDED=seeded, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return x_t, u


@triton_op("fastflow::flow_path", mutates_args=())
def _flow_path_op(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(z, eps, t, t, seeded=False)  # t stands in for the unused Philox state


@triton_op("fastflow::flow_path_seeded", mutates_args=())
def _flow_path_seeded_op(z: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(z, z, t, state, seeded=True)


@triton_op("fastflow::flow_path_backward", mutates_args=())
def _flow_path_backward_op(
    gx: torch.Tensor, gu: torch.Tensor, t: torch.Tensor, dz_dtype: torch.dtype, deps_dtype: torch.dtype, need_deps: bool
) -> list[torch.Tensor]:
    """(dz, deps) with dz = t·gx + gu and deps = (1 − t)·gx − gu, one pass; deps only when ``need_deps``."""
    dz = torch.empty(gx.shape, dtype=dz_dtype, device=gx.device)
    deps = torch.empty(gx.shape if need_deps else (0,), dtype=deps_dtype, device=gx.device)
    n = gx.numel()
    if n:
        wrap_triton(_flow_path_bwd_kernel)[(triton.cdiv(n, BLOCK),)](
            flat(gx),
            flat(gu),
            flat(t),
            dz,
            deps if need_deps else dz,
            n,
            n // gx.shape[0],
            WRITE_DEPS=need_deps,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return [dz, deps] if need_deps else [dz]


def _grads(gx, gu, t, shape, z_dtype, eps_dtype, need_deps) -> tuple[list[torch.Tensor], torch.Tensor]:
    gx = torch.zeros(shape, dtype=z_dtype, device=t.device) if gx is None else gx
    gu = torch.zeros_like(gx) if gu is None else gu
    return _flow_path_backward_op(gx, gu, t, z_dtype, eps_dtype, need_deps), gx


def _dt(gx: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dL/dt[b] = Σ_j gx[b, j]·(z − eps)[b, j], summed in fp32 by torch: t is never learned in fastflow, so this
    per-sample reduction is the rare path and is left to torch rather than given its own kernel."""
    return (gx.float() * u).reshape(gx.shape[0], -1).sum(1).to(t.dtype)


def _setup(ctx, inputs, output):
    z, eps, t = inputs
    ctx.shape, ctx.z_dtype, ctx.eps_dtype = z.shape, z.dtype, eps.dtype
    need_t = ctx.needs_input_grad[2]
    ctx.save_for_backward(t, z if need_t else None, eps if need_t else None)


def _backward(ctx, gx, gu):
    t, z, eps = ctx.saved_tensors
    need_z, need_eps, need_t = ctx.needs_input_grad
    dz = deps = dt = None
    if need_z or need_eps:
        out, gx = _grads(gx, gu, t, ctx.shape, ctx.z_dtype, ctx.eps_dtype, need_eps)
        dz = out[0] if need_z else None
        deps = out[1] if need_eps else None
    if need_t and gx is not None:
        dt = _dt(gx, z.float() - eps.float(), t)
    return dz, deps, dt


_flow_path_op.register_autograd(_backward, setup_context=_setup)


def _setup_seeded(ctx, inputs, output):
    z, t, state = inputs
    ctx.shape, ctx.z_dtype = z.shape, z.dtype
    ctx.save_for_backward(t, state, z if ctx.needs_input_grad[1] else None)


def _backward_seeded(ctx, gx, gu):
    t, state, z = ctx.saved_tensors
    need_z, need_t, _ = ctx.needs_input_grad
    dz = dt = None
    if need_z:
        out, gx = _grads(gx, gu, t, ctx.shape, ctx.z_dtype, ctx.z_dtype, False)
        dz = out[0]
    if need_t and gx is not None:
        eps = philox_normal(state, z.numel(), torch.float32).view(z.shape)  # re-drawn, bit-identical
        dt = _dt(gx, z.float() - eps, t)
    return dz, dt, None


_flow_path_seeded_op.register_autograd(_backward_seeded, setup_context=_setup_seeded)


def flow_path(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(x_t, u)``; arguments already checked by :func:`kernels.flow_path`."""
    return _flow_path_op(z, eps, t)


def flow_path_seeded(z: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(x_t, u)`` with ``eps`` drawn in the kernel; ``state`` is int64 ``[seed, offset]`` on z's device."""
    return _flow_path_seeded_op(z, t, state)
