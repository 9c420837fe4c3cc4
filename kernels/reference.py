"""Pure-torch fp32 math of every op in :mod:`kernels`.

This is the oracle the tests compare the Triton kernels against, and the code path that runs wherever Triton
does not (CPU tensors). Inputs may be fp32, bf16 or fp16; the arithmetic is always done in fp32 and the result
is cast back to the input dtype (the ODE state ``x`` of the Euler ops is fp32 by contract).

Under ``torch.compile`` on CUDA the dispatch picks these functions too (see :func:`kernels._use_triton`): Inductor
fuses them with their neighbours and drops what the graph never reads.
"""

from __future__ import annotations

import torch

__all__ = ["flow_path", "flow_matching_loss", "euler_step_", "guided_euler_step_"]


def _bcast_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) viewed as (B, 1, ..., 1) so it broadcasts against ``like`` of shape (B, ...)."""
    return t.float().reshape(-1, *([1] * (like.dim() - 1)))


def flow_path(
    z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, with_target: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear Gaussian path and its target field.

    Args:
        z: data, shape (B, ...), in [-1, 1].
        eps: noise, same shape as ``z``.
        t: time, shape (B,), 0 = noise, 1 = data.
        with_target: False skips u (returned as None).

    Returns:
        ``(x_t, u)`` with ``x_t = t·z + (1 − t)·eps`` and ``u = z − eps``, both shaped and typed like ``z``.
    """
    tb = _bcast_t(t, z)  # [B, 1, 1, 1]
    zf, ef = z.float(), eps.float()
    x_t = (tb * zf + (1.0 - tb) * ef).to(z.dtype)
    u = (zf - ef).to(z.dtype) if with_target else None
    return x_t, u


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
