"""Argument checks shared by both backends, so a bad call fails the same way on CPU and on CUDA.

Every public op in :mod:`kernels` runs these before it dispatches: a wrong dtype is a ``TypeError``, a shape or
device mismatch a ``ValueError``, each naming the op and the argument. Nothing here reads tensor data (no host
sync, nothing for ``torch.compile`` to break on).
"""

from __future__ import annotations

import torch

__all__ = [
    "FLOATS",
    "tensor",
    "floating",
    "same_device",
    "same_shape",
    "scalar",
]

# The dtypes the kernels load and store; the math inside is always fp32.
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_NAMES = "float32, bfloat16 or float16"


def tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(op: str, name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...] = FLOATS) -> None:
    tensor(op, name, x)
    if x.dtype not in allowed:
        names = _FLOAT_NAMES if allowed == FLOATS else ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be {names}, got {x.dtype}")


def same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def same_shape(op: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {list(s)}" for name, s in shapes.items())
        raise ValueError(f"{op}: shapes must match exactly (no broadcasting), got {listed}")


def scalar(op: str, name: str, s: object, device: torch.device) -> None:
    """A step size or guidance weight: a Python number, or a floating 0-d (or 1-element) tensor on ``device``.

    Off CUDA a CPU tensor is also accepted (moved like torch's own scalar arguments). With CUDA tensors it is not:
    its copy to the GPU waits for the host, which is illegal while a CUDA graph is being captured, so the error
    comes here, in eager code too, rather than as an opaque capture failure later. A Python float stays allowed
    (the launcher fills a device tensor with it: no copy from host memory)."""
    if isinstance(s, bool) or not isinstance(s, (int, float, torch.Tensor)):
        raise TypeError(f"{op}: {name} must be a float or a 0-d tensor, got {type(s).__name__}")
    if isinstance(s, torch.Tensor):
        if s.numel() != 1:
            raise ValueError(f"{op}: {name} must be a 0-d tensor, got shape {list(s.shape)}")
        if not s.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {s.dtype}")
        if s.device.type == "cpu" and device.type == "cuda":
            raise ValueError(
                f"{op}: {name} is a CPU tensor but the tensors are on {device}: pass a float or a tensor on {device} "
                "(a CPU tensor means a host copy, which CUDA-graph capture forbids)"
            )
        if s.device != device and s.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {s.device} but the tensors are on {device}")
