"""flow_path: ``x_t = t·z + (1 − t)·eps`` and ``u = z − eps`` in one pass, or ``x_t`` alone.

Kernel, launcher and ``torch.library`` registration (``fastflow::flow_path`` for ``(x_t, u)``,
``fastflow::flow_path_xt`` for ``x_t`` alone, their backward ``fastflow::flow_path_backward``) live here; the
public entry point and the dispatch are in :mod:`kernels`. The math is fp32 whatever the storage dtype; outputs take
z's dtype. Training reads x_t only (its loss recomputes z − eps in registers), so ``flow_path_xt`` skips the store
of u: 12 B per fp32 element instead of 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import BLOCK, NUM_WARPS, device_guard, flat

__all__ = ["flow_path"]

# The backward's warps when dz and deps differ in width (z fp32 with eps bf16/fp16, or the reverse). With 4 warps
# (8 elements per thread per tensor) Triton gives the 32-bit and the 16-bit tensor different register layouts and
# converts between them through 4 KiB of shared memory; on an odd shape (no int divisible by 16: scalar loads,
# 64-bit addresses) ptxas 12.9 (Triton 3.8) then held the sm_90 binary at 56 registers and spilled (24 B stored,
# 28 B loaded), and the sm_90 reverse case took 69 registers. 8 warps (4 elements per thread, the same BLOCK and grid)
# give both tensors one layout: no shared memory, at most 32 registers per thread on sm_80 and sm_90, no spill
# (`python -m bench aot`, docs/kernels-aot.md). Same-width launches keep NUM_WARPS and their binaries: 4 warps need
# no conversion there, and the common fp32 path (MNIST shapes) stays at 32 registers on both targets.
MIXED_WIDTH_WARPS = 2 * NUM_WARPS


@triton.jit
def _flow_path_fwd_kernel(
    z_ptr,
    eps_ptr,
    t_ptr,  # [B]
    xt_ptr,
    u_ptr,  # unused unless WRITE_U
    n,
    per_sample,  # elements per sample: t index = flat index // per_sample
    WRITE_U: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64: no overflow past 2^31
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs // per_sample, mask=mask, other=0.0).to(tl.float32)
    x_t = t * z + (1.0 - t) * eps
    tl.store(xt_ptr + offs, x_t.to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_U:
        tl.store(u_ptr + offs, (z - eps).to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flow_path_bwd_kernel(
    gx_ptr,  # dL/dx_t
    gu_ptr,  # dL/du; unused unless HAS_GU
    t_ptr,
    dz_ptr,
    deps_ptr,  # unused unless WRITE_DEPS
    n,
    per_sample,
    HAS_GU: tl.constexpr,
    WRITE_DEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs // per_sample, mask=mask, other=0.0).to(tl.float32)
    dz = t * gx
    deps = (1.0 - t) * gx
    if HAS_GU:
        gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dz + gu
        deps = deps - gu
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DEPS:
        tl.store(deps_ptr + offs, deps.to(deps_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(
    z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, write_u: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x_t = torch.empty_like(z, memory_format=torch.contiguous_format)
    u = torch.empty_like(z, memory_format=torch.contiguous_format) if write_u else None
    n = z.numel()
    if n:
        with device_guard(z.device):
            wrap_triton(_flow_path_fwd_kernel)[(triton.cdiv(n, BLOCK),)](
                flat(z),
                flat(eps),
                flat(t),
                x_t,
                x_t if u is None else u,
                n,
                n // z.shape[0],
                WRITE_U=write_u,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    return x_t, u


@triton_op("fastflow::flow_path", mutates_args=())
def _flow_path_op(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(z, eps, t, write_u=True)


@triton_op("fastflow::flow_path_xt", mutates_args=())
def _flow_path_xt_op(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(z, eps, t, write_u=False)[0]


@triton_op("fastflow::flow_path_backward", mutates_args=())
def _flow_path_backward_op(
    gx: torch.Tensor,
    gu: torch.Tensor,
    t: torch.Tensor,
    dz_dtype: torch.dtype,
    deps_dtype: torch.dtype,
    has_gu: bool,
    need_deps: bool,
) -> list[torch.Tensor]:
    """(dz, deps) with dz = t·gx + gu and deps = (1 − t)·gx − gu, one pass; gu is read only when ``has_gu``
    (``gx`` stands in otherwise), deps is written only when ``need_deps``."""
    dz = torch.empty(gx.shape, dtype=dz_dtype, device=gx.device)
    deps = torch.empty(gx.shape if need_deps else (0,), dtype=deps_dtype, device=gx.device)
    n = gx.numel()
    mixed = need_deps and deps.element_size() != dz.element_size()
    if n:
        with device_guard(gx.device):
            wrap_triton(_flow_path_bwd_kernel)[(triton.cdiv(n, BLOCK),)](
                flat(gx),
                flat(gu),
                flat(t),
                dz,
                deps if need_deps else dz,
                n,
                n // gx.shape[0],
                HAS_GU=has_gu,
                WRITE_DEPS=need_deps,
                BLOCK=BLOCK,
                num_warps=MIXED_WIDTH_WARPS if mixed else NUM_WARPS,
            )
    return [dz, deps] if need_deps else [dz]


def _dt(gx: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dL/dt[b] = Σ_j gx[b, j]·(z − eps)[b, j], summed in fp32 by torch: t is never learned in fastflow, so this
    per-sample reduction is the rare path and is left to torch rather than given its own kernel."""
    return (gx.float() * u).reshape(gx.shape[0], -1).sum(1).to(t.dtype)


def _setup(ctx, inputs, output):
    z, eps, t = inputs
    ctx.shape, ctx.z_dtype, ctx.eps_dtype = z.shape, z.dtype, eps.dtype
    need_t = ctx.needs_input_grad[2]
    ctx.save_for_backward(t, z if need_t else None, eps if need_t else None)


def _backward(ctx, gx, gu=None):
    """Gradients of both ops; ``gu`` is None for ``flow_path_xt`` (no u), and either may be None should autograd
    not materialise an unused output's gradient."""
    t, z, eps = ctx.saved_tensors
    need_z, need_eps, need_t = ctx.needs_input_grad
    if gx is None:
        gx = torch.zeros(ctx.shape, dtype=ctx.z_dtype, device=t.device)
    dz = deps = dt = None
    if need_z or need_eps:
        out = _flow_path_backward_op(
            gx, gx if gu is None else gu, t, ctx.z_dtype, ctx.eps_dtype, gu is not None, need_eps
        )
        dz = out[0] if need_z else None
        deps = out[1] if need_eps else None
    if need_t:
        dt = _dt(gx, z.float() - eps.float(), t)
    return dz, deps, dt


_flow_path_op.register_autograd(_backward, setup_context=_setup)
_flow_path_xt_op.register_autograd(_backward, setup_context=_setup)


def flow_path(
    z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, with_target: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton ``(x_t, u)``, or ``(x_t, None)`` without the store of u; arguments already checked by
    :func:`kernels.flow_path`."""
    if with_target:
        return _flow_path_op(z, eps, t)
    return _flow_path_xt_op(z, eps, t), None
