"""philox_normal: N(0, 1) noise from ``(seed, offset)``, element ``i`` drawn by ``tl.randn(seed, offset + i)``.

The same stream the seeded path and loss kernels draw in registers, written out: the seeded ops' oracle pairs it
with the unseeded ones, and it is the noise fastflow can re-draw instead of storing. ``fastflow::philox_normal``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import BLOCK, NUM_WARPS

__all__ = ["philox_normal"]


@triton.jit
def _philox_normal_kernel(out_ptr, state_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    # state = (seed, offset), loaded rather than passed by value: a new offset every step is data, not a new
    # kernel specialisation (Triton specialises int arguments on ==1 and divisibility by 16).
    eps = tl.randn(tl.load(state_ptr), tl.load(state_ptr + 1) + offs)
    tl.store(out_ptr + offs, eps.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton_op("fastflow::philox_normal", mutates_args=())
def _philox_normal_op(state: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=state.device)
    if n:
        wrap_triton(_philox_normal_kernel)[(triton.cdiv(n, BLOCK),)](out, state, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def philox_normal(state: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` normals as a 1-D tensor on ``state``'s device; ``state`` is int64 ``[seed, offset]``."""
    return _philox_normal_op(state, n, dtype)
