"""fastflow's custom ops: the public API and the one dispatch point.

Every op has a pure-torch fp32 twin in :mod:`kernels.reference`. ``kernels.<op>(...)`` checks its arguments, then
:func:`_use_triton` decides, once for all ops, whether the Triton kernel or the reference runs: by default the
Triton kernels for CUDA tensors in eager code, the reference on CPU and inside torch.compile (where Inductor fuses
it). Tests force either
path with :func:`use_backend` (or the environment variable ``FASTFLOW_KERNELS=auto|triton|reference``); forcing
``triton`` on CPU tensors works under ``TRITON_INTERPRET=1``.

The branch is plain Python decided at trace time, so ``torch.compile(fullgraph=True)`` sees no graph break.
The Triton op modules (and with them triton and, through ``torch.library.triton_op``, ``torch._inductor``: seconds
of start-up, measured in kernels/README.md) are imported on the first call that takes the Triton path, or when
``triton`` is forced, never by ``import kernels``.
This package imports only torch and triton, never fastflow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

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
    "flow_matching_loss",
    "euler_step_",
    "guided_euler_step_",
]

# fastflow checks this marker: Hugging Face's `kernels` package has the same import name.
IS_FASTFLOW_KERNELS = True

# triton is a Linux-only dependency; everything works without it through the reference. Only looked up here:
# importing it (~0.1 s) waits for the first Triton dispatch.
HAS_TRITON = importlib.util.find_spec("triton") is not None

_BACKENDS = ("auto", "triton", "reference")
# Whether the Triton kernels are built for Triton's interpreter (the only way they run on CPU tensors): @triton.jit
# reads TRITON_INTERPRET when the op modules are imported, which must agree with this (checked in _load_triton()).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The Triton op modules, set by _load_triton() on the first Triton dispatch (None until then).
_path: ModuleType | None = None
_loss: ModuleType | None = None
_euler: ModuleType | None = None


def _load_triton() -> None:
    """Import the Triton op modules once; importing them registers ``fastflow::*`` with torch.library.

    Runs eagerly only: an op reaches it inside torch.compile only with the ``triton`` backend forced, and forcing it
    (:func:`use_backend` or ``FASTFLOW_KERNELS``) loads the modules first, so a trace finds them set (module
    globals, which Dynamo reads like any other) and never runs an import.
    """
    global _path, _loss, _euler
    if _euler is not None:
        return
    from . import euler, loss, path

    if (type(euler._euler_kernel).__name__ == "InterpretedFunction") != _INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import kernels` and the first Triton call (the kernels were built "
            "with the new value, the dispatch decided with the old one): set it before importing kernels"
        )
    _path, _loss, _euler = path, loss, euler


def _parse_backend(name: str, source: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"{source} must be one of {_BACKENDS}, got {name!r}")
    if name == "triton" and HAS_TRITON:
        _load_triton()  # forced: import the op modules now, outside any torch.compile trace
    return name


_backend = _parse_backend(os.environ.get("FASTFLOW_KERNELS", "auto"), "FASTFLOW_KERNELS")


def backend() -> str:
    """The forced backend: ``auto`` (see :func:`_use_triton`), ``triton`` or ``reference``."""
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
    """The one dispatch decision, on the (already checked, common) device of an op's tensors. When it says True,
    the Triton op modules are loaded.

    ``reference``: never Triton. ``triton``: always (CUDA tensors, or CPU tensors under the interpreter), also
    inside torch.compile, where the trace goes through the ``fastflow::*`` triton_ops (how the GPU check compares
    the two under compile). ``auto``: the Triton kernels for CUDA tensors in eager code only; see the comments.
    """
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
    else:  # auto
        if device.type != "cuda" or not HAS_TRITON:
            return False
        if _INTERPRET:
            # The kernels were built for Triton's interpreter: it would copy every CUDA tensor to the host and
            # back, and it cannot run inside a torch.compile trace or a CUDA-graph capture.
            return False
        if torch.compiler.is_compiling():
            # Inside a trace the reference's few elementwise ops are better: Inductor fuses them with their
            # neighbours (the network's output, the loss's reduction) and drops outputs the graph never reads
            # (the u that training ignores). A triton_op's kernel is called as written: nothing is fused into it
            # or across it, and every store it makes stays.
            return False
    _load_triton()  # eager here, or already loaded when forced (see _load_triton)
    return True


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


def flow_path(
    z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, *, with_target: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear path and its target field in one pass.

    Args:
        z: data, shape (B, ...), fp32/bf16/fp16.
        eps: noise, the shape of ``z``, fp32/bf16/fp16.
        t: time, shape (B,), 0 = noise, 1 = data.
        with_target: False when the caller does not need ``u`` (training: its loss recomputes z − eps): ``u`` is
            then neither computed nor stored (on the Triton path 12 instead of 16 bytes moved per fp32 element).

    Returns:
        ``(x_t, u) = (t·z + (1 − t)·eps, z − eps)``, computed in fp32, shaped and typed like ``z`` (contiguous);
        ``(x_t, None)`` when ``with_target`` is False. Differentiable in z, eps and t.
    """
    _check_path("flow_path", z, t, eps=eps)
    if _use_triton(z.device):
        return _path.flow_path(z, eps, t, with_target)
    return reference.flow_path(z, eps, t, with_target)


def flow_matching_loss(v: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean((v − (z − eps))²)`` as a 0-d fp32 tensor without materialising ``u``.

    v, z, eps: one shape (B, ...), each fp32/bf16/fp16. Deterministic on the Triton path (no atomics: the same
    inputs give the same bits). Differentiable in v (and z, eps should they require grad).
    """
    _check_loss("flow_matching_loss", v, z, eps=eps)
    if _use_triton(v.device):
        return _loss.flow_matching_loss(v, z, eps)
    return reference.flow_matching_loss(v, z, eps)


def _check_euler(op: str, x: torch.Tensor, **vs: torch.Tensor) -> None:
    _chk.floating(op, "x", x, allowed=(torch.float32,))  # the ODE state stays fp32 (ARCHITECTURE.md)
    for name, v in vs.items():
        _chk.floating(op, name, v)
    _chk.same_device(op, x=x, **vs)
    _chk.same_shape(op, x=x, **vs)


def euler_step_(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
    """In place ``x ← x + h·v``; returns ``x``.

    x: the fp32 ODE state (B, ...); v: the same shape, fp32/bf16/fp16; h: a float or a floating 0-d tensor on x's
    device (pass a tensor in a compiled loop: a changing float recompiles; a CPU tensor with CUDA x is an error).
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

    x fp32 (B, ...); v_cond, v_uncond the same shape, fp32/bf16/fp16; h, w floats or floating 0-d tensors on x's
    device.
    """
    op = "guided_euler_step_"
    _check_euler(op, x, v_cond=v_cond, v_uncond=v_uncond)
    _chk.scalar(op, "h", h, x.device)
    _chk.scalar(op, "w", w, x.device)
    if _use_triton(x.device):
        h, w = _scalar_tensor(h, x.device), _scalar_tensor(w, x.device)
        return _euler.guided_euler_step_(x, v_cond, v_uncond, h, w)
    return reference.guided_euler_step_(x, v_cond, v_uncond, h, w)
