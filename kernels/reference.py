"""Pure-torch fp32 math of every op in :mod:`kernels`.

This is the oracle the tests compare the Triton kernels against, and the code path that runs wherever Triton
does not (CPU tensors). Inputs may be fp32, bf16 or fp16; the arithmetic is always done in fp32 and the result
is cast back to the input dtype (the ODE state ``x`` of the Euler ops is fp32 by contract).

The seeded ops draw their noise with :func:`philox_normal`, a pure-torch copy of Triton's ``tl.randn``: the same
Philox4x32-10 counter stream (``triton/language/random.py``), element ``i`` of the flattened tensor at counter
``offset + i``, the same int-to-uniform map and Box-Muller. Its uint32 words equal Triton's bit for bit; the
normals agree to fp32 rounding only, because log, sqrt and cos come from different libraries (torch's here,
libdevice on a GPU, numpy in the interpreter). So a seeded kernel is checked against this reference with the
fp32 tolerance, not bitwise.
"""

from __future__ import annotations

import torch

__all__ = [
    "flow_path",
    "flow_matching_loss",
    "euler_step_",
    "guided_euler_step_",
    "philox_normal",
    "flow_path_seeded",
    "flow_matching_loss_seeded",
]


def _bcast_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) viewed as (B, 1, ..., 1) so it broadcasts against ``like`` of shape (B, ...)."""
    return t.float().reshape(-1, *([1] * (like.dim() - 1)))


def flow_path(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear Gaussian path and its target field.

    Args:
        z: data, shape (B, ...), in [-1, 1].
        eps: noise, same shape as ``z``.
        t: time, shape (B,), 0 = noise, 1 = data.

    Returns:
        ``(x_t, u)`` with ``x_t = t·z + (1 − t)·eps`` and ``u = z − eps``, both shaped and typed like ``z``.
    """
    tb = _bcast_t(t, z)  # [B, 1, 1, 1]
    zf, ef = z.float(), eps.float()
    x_t = tb * zf + (1.0 - tb) * ef
    u = zf - ef
    return x_t.to(z.dtype), u.to(z.dtype)


def flow_matching_loss(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the network's field ``v`` and the target ``z − eps``.

    Returns a 0-d fp32 tensor, differentiable in ``v`` (and in ``z`` and ``eps`` should they require grad).
    """
    diff = v.float() - (z.float() - eps.float())
    return diff.square().mean()


def euler_step_(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
    """In place: ``x ← x + h·v``. ``x`` is the fp32 ODE state; ``v`` may be lower precision."""
    return x.add_(v.float() * h)


def guided_euler_step_(
    x: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    h: torch.Tensor | float,
    w: torch.Tensor | float,
) -> torch.Tensor:
    """In place: ``x ← x + h·(v_uncond + w·(v_cond − v_uncond))`` (classifier-free guidance)."""
    vu = v_uncond.float()
    return x.add_((vu + w * (v_cond.float() - vu)) * h)


# Philox4x32-10 constants, as in triton/language/random.py.
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a·b`` for uint32 values held in int64, without int64 overflow:
    split both factors into 16-bit halves so every partial product stays below 2**50."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low = ((a_hi * b_lo + a_lo * b_hi) << 16) + a_lo * b_lo  # < 2**50
    return a_hi * b_hi + (low >> 32), low & _M32


def _as_i64(s, device) -> torch.Tensor:
    return torch.as_tensor(s, device=device).to(torch.int64).reshape(())


def philox_uint32(n: int, seed, offset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two uint32 words (as int64) of Philox4x32-10 at counters ``offset + arange(n)``, key ``seed``:
    what ``tl.randint4x(seed, offset + i)`` returns first, bit for bit."""
    seed, offset = _as_i64(seed, device), _as_i64(offset, device)
    idx = offset + torch.arange(n, device=device, dtype=torch.int64)  # [n] the 64-bit counter
    c0, c1 = idx & _M32, (idx >> 32) & _M32
    c2 = c3 = torch.zeros_like(idx)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: reinterpret as int32, fold negatives (``~x``), scale into [0, 1)."""
    s = torch.where(x >= 2**31, x - 2**32, x)  # the int32 bit pattern
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * 4.6566127342e-10


def philox_normal(shape, seed, offset, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise fully determined by ``(seed, offset)``: Triton's ``tl.randn(seed, offset + i)`` for
    element ``i`` of the row-major flattening of ``shape``. Drawn in fp32, then cast to ``dtype``.

    ``seed`` and ``offset`` are ints or integer 0-d tensors. Noise for ``n`` elements uses counters
    ``offset … offset + n − 1``; advance ``offset`` by ``n`` for the next independent draw.
    """
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s  # no int(): a SymInt under torch.compile(dynamic=True) stays symbolic
    i1, i2 = philox_uint32(n, seed, offset, device)
    u1 = _uint_to_uniform(i1).clamp_min(1.0e-7)
    th = _uint_to_uniform(i2) * 6.283185307179586
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * torch.cos(th)).reshape(shape).to(dtype)


def flow_path_seeded(z: torch.Tensor, t: torch.Tensor, seed, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flow_path` with ``eps = philox_normal(z.shape, seed, offset)`` (fp32, never rounded to z's dtype)."""
    eps = philox_normal(z.shape, seed, offset, z.device)
    return flow_path(z, eps, t)


def flow_matching_loss_seeded(v: torch.Tensor, z: torch.Tensor, seed, offset) -> torch.Tensor:
    """:func:`flow_matching_loss` with the same ``eps`` that :func:`flow_path_seeded` drew for ``(seed, offset)``."""
    eps = philox_normal(z.shape, seed, offset, z.device)
    return flow_matching_loss(v, z, eps)
