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

from . import _checks as _chk
from . import reference
from ._launch import scalar_tensor as _scalar_tensor

__all__ = [
    "IS_FASTFLOW_KERNELS",
    "HAS_TRITON",
    "backend",
    "use_backend",
    "flow_path",
    "flow_path_seeded",
    "flow_matching_loss",
    "flow_matching_loss_seeded",
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

if HAS_TRITON:
    # Importing the op modules registers fastflow::* with torch.library. Under TRITON_INTERPRET=1 (set before
    # this import) their kernels are built for the interpreter and also run on CPU tensors.
    from . import euler as _euler
    from . import loss as _loss
    from . import path as _path
    from . import philox as _philox

_BACKENDS = ("auto", "triton", "reference")
# Whether the kernels above were built for Triton's interpreter (the only way they run on CPU tensors).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _parse_backend(name: str, source: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"{source} must be one of {_BACKENDS}, got {name!r}")
    return name


_backend = _parse_backend(os.environ.get("FASTFLOW_KERNELS", "auto"), "FASTFLOW_KERNELS")


def backend() -> str:
    """The forced backend: ``auto`` (Triton on CUDA, reference elsewhere), ``triton`` or ``reference``."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``triton`` or ``reference`` (or restore ``auto``) inside a ``with`` block."""
    global _backend
    old, _backend = _backend, _parse_backend(name, "backend")
    try:
        yield
    finally:
        _backend = old


def _use_triton(device: torch.device) -> bool:
    """The one dispatch decision, on the (already checked, common) device of an op's tensors."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("FASTFLOW_KERNELS=triton but triton is not importable")
        if device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(
                f"the Triton backend is forced on {device} tensors, which needs TRITON_INTERPRET=1 set before "
                "kernels is imported (the interpreter); use CUDA tensors or the reference backend"
            )
        return True
    return HAS_TRITON and device.type == "cuda"


def _philox_state(seed, offset, device: torch.device) -> torch.Tensor:
    """int64 ``[seed, offset]`` on ``device``: the kernels load it, so a new offset is data, not a recompile."""
    if isinstance(seed, torch.Tensor) or isinstance(offset, torch.Tensor):
        parts = [torch.as_tensor(s, device=device).to(torch.int64).reshape(1) for s in (seed, offset)]
        return torch.cat(parts)
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _check_path(op: str, z: torch.Tensor, t: torch.Tensor, **more: torch.Tensor) -> None:
    _chk.floating(op, "z", z)
    for name, x in more.items():
        _chk.floating(op, name, x)
    _chk.floating(op, "t", t)
    _chk.same_device(op, z=z, **more, t=t)
    _chk.same_shape(op, z=z, **more)
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have a batch dimension, got a 0-d tensor")
    if tuple(t.shape) != (z.shape[0],):
        raise ValueError(
            f"{op}: t must have shape (B,) = ({z.shape[0]},) for z of shape {list(z.shape)}, got {list(t.shape)}"
        )


def _check_loss(op: str, v: torch.Tensor, z: torch.Tensor, **more: torch.Tensor) -> None:
    for name, x in {"v": v, "z": z, **more}.items():
        _chk.floating(op, name, x)
    _chk.same_device(op, v=v, z=z, **more)
    _chk.same_shape(op, v=v, z=z, **more)
    if v.numel() == 0:
        raise ValueError(f"{op}: the mean of an empty tensor is undefined (v has shape {list(v.shape)})")


def _check_philox(op: str, seed, offset) -> None:
    _chk.philox_arg(op, "seed", seed)
    _chk.philox_arg(op, "offset", offset)


def flow_path(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear path and its target field in one pass.

    Args:
        z: data, shape (B, ...), fp32/bf16/fp16.
        eps: noise, the shape of ``z``, fp32/bf16/fp16.
        t: time, shape (B,), 0 = noise, 1 = data.

    Returns:
        ``(x_t, u) = (t·z + (1 − t)·eps, z − eps)``, computed in fp32, shaped and typed like ``z``
        (contiguous). Differentiable in z, eps and t.
    """
    _check_path("flow_path", z, t, eps=eps)
    if _use_triton(z.device):
        return _path.flow_path(z, eps, t)
    return reference.flow_path(z, eps, t)


def flow_path_seeded(z: torch.Tensor, t: torch.Tensor, seed, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flow_path` with ``eps = philox_normal(z.shape, seed, offset)`` drawn inside the kernel (fp32, never
    stored), so the op reads only z and t. Pass ``seed``/``offset`` as int64 0-d tensors in a compiled loop
    (ints are specialised); advance ``offset`` by ``z.numel()`` per draw. Differentiable in z and t.
    """
    _check_path("flow_path_seeded", z, t)
    _check_philox("flow_path_seeded", seed, offset)
    if _use_triton(z.device):
        return _path.flow_path_seeded(z, t, _philox_state(seed, offset, z.device))
    return reference.flow_path_seeded(z, t, seed, offset)


def flow_matching_loss(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean((v − (z − eps))²)`` as a 0-d fp32 tensor without materialising ``u``.

    v, z, eps: one shape (B, ...), each fp32/bf16/fp16. Deterministic on the Triton path (no atomics: the same
    inputs give the same bits). Differentiable in v (and z, eps should they require grad).
    """
    _check_loss("flow_matching_loss", v, z, eps=eps)
    if _use_triton(v.device):
        return _loss.flow_matching_loss(v, z, eps)
    return reference.flow_matching_loss(v, z, eps)


def flow_matching_loss_seeded(v: torch.Tensor, z: torch.Tensor, seed, offset) -> torch.Tensor:
    """:func:`flow_matching_loss` with the ``eps`` that :func:`flow_path_seeded` drew for ``(seed, offset)``,
    re-drawn in the forward and again in the backward instead of read. Differentiable in v and z."""
    _check_loss("flow_matching_loss_seeded", v, z)
    _check_philox("flow_matching_loss_seeded", seed, offset)
    if _use_triton(v.device):
        return _loss.flow_matching_loss_seeded(v, z, _philox_state(seed, offset, v.device))
    return reference.flow_matching_loss_seeded(v, z, seed, offset)


def _check_euler(op: str, x: torch.Tensor, **vs: torch.Tensor) -> None:
    _chk.floating(op, "x", x, allowed=(torch.float32,))  # the ODE state stays fp32 (ARCHITECTURE.md)
    for name, v in vs.items():
        _chk.floating(op, name, v)
    _chk.same_device(op, x=x, **vs)
    _chk.same_shape(op, x=x, **vs)


def euler_step_(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
    """In place ``x ← x + h·v``; returns ``x``.

    x: the fp32 ODE state (B, ...); v: the same shape, fp32/bf16/fp16; h: a float or a floating 0-d tensor
    (pass a tensor in a compiled loop: a changing float recompiles).
    """
    _check_euler("euler_step_", x, v=v)
    _chk.scalar("euler_step_", "h", h, x.device)
    if _use_triton(x.device):
        return _euler.euler_step_(x, v, _scalar_tensor(h, x.device))
    return reference.euler_step_(x, v, h)


def guided_euler_step_(
    x: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    h: torch.Tensor | float,
    w: torch.Tensor | float,
) -> torch.Tensor:
    """In place ``x ← x + h·(v_uncond + w·(v_cond − v_uncond))`` (classifier-free guidance); returns ``x``.

    x fp32 (B, ...); v_cond, v_uncond the same shape, fp32/bf16/fp16; h, w floats or floating 0-d tensors.
    """
    op = "guided_euler_step_"
    _check_euler(op, x, v_cond=v_cond, v_uncond=v_uncond)
    _chk.scalar(op, "h", h, x.device)
    _chk.scalar(op, "w", w, x.device)
    if _use_triton(x.device):
        return _euler.guided_euler_step_(x, v_cond, v_uncond, _scalar_tensor(h, x.device), _scalar_tensor(w, x.device))
    return reference.guided_euler_step_(x, v_cond, v_uncond, h, w)


def philox_normal(shape, seed, offset, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` determined by ``(seed, offset)``: element ``i`` of the row-major flattening is
    Triton's ``tl.randn(seed, offset + i)`` (the reference reproduces the stream up to fp32 rounding). The same
    noise the seeded ops draw; drawn in fp32 and cast to ``dtype``."""
    _check_philox("philox_normal", seed, offset)
    if dtype not in _chk.FLOATS:
        raise TypeError(f"philox_normal: dtype must be float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    if _use_triton(device):
        n = 1
        for s in shape:
            n *= s
        return _philox.philox_normal(_philox_state(seed, offset, device), n, dtype).view(tuple(shape))
    return reference.philox_normal(shape, seed, offset, device, dtype)
