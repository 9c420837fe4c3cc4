"""fastflow's custom ops: the public API and the one dispatch point.

Every op has a pure-torch fp32 twin in :mod:`kernels.reference`. ``kernels.<op>(...)`` runs the Triton kernel
when the tensors live on CUDA and Triton imports, and the reference otherwise. Tests force either path with
:func:`use_backend` (or the environment variable ``FASTFLOW_KERNELS=auto|triton|reference``); forcing
``triton`` on CPU tensors works under ``TRITON_INTERPRET=1``.

The branch is plain Python decided at trace time, so ``torch.compile(fullgraph=True)`` sees no graph break.
This package imports only torch and triton, never fastflow.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import reference

__all__ = [
    "IS_FASTFLOW_KERNELS",
    "HAS_TRITON",
    "backend",
    "use_backend",
    "flow_path",
    "flow_matching_loss",
    "euler_step_",
    "guided_euler_step_",
    "philox_normal",
]

# fastflow checks this marker: Hugging Face's `kernels` package has the same import name.
IS_FASTFLOW_KERNELS = True

try:  # triton is a Linux-only dependency; everything works without it through the reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("FASTFLOW_KERNELS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"FASTFLOW_KERNELS must be one of {_BACKENDS}, got {_backend!r}")


def backend() -> str:
    """The forced backend: ``auto`` (Triton on CUDA, reference elsewhere), ``triton`` or ``reference``."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``triton`` or ``reference`` (or restore ``auto``) inside a ``with`` block."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _use_triton(*tensors: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("FASTFLOW_KERNELS=triton but triton is not importable")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def flow_path(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, u) = (t·z + (1 − t)·eps, z − eps)``; z, eps (B, ...) fp32/bf16/fp16, t (B,). See reference."""
    return reference.flow_path(z, eps, t)


def flow_matching_loss(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean((v − (z − eps))²)`` as a 0-d fp32 tensor, differentiable in ``v``."""
    return reference.flow_matching_loss(v, z, eps)


def euler_step_(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
    """In place ``x ← x + h·v``; x fp32 (B, ...), v fp32/bf16 like x, h a float or 0-d tensor."""
    return reference.euler_step_(x, v, h)


def guided_euler_step_(x, v_cond, v_uncond, h, w) -> torch.Tensor:
    """In place ``x ← x + h·(v_uncond + w·(v_cond − v_uncond))``; h, w floats or 0-d tensors."""
    return reference.guided_euler_step_(x, v_cond, v_uncond, h, w)


def philox_normal(shape, seed: int, offset: int, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) noise determined by ``(seed, offset)``."""
    return reference.philox_normal(shape, seed, offset, device, dtype)
