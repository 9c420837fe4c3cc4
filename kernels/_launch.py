"""What every launcher shares: the flat contiguous view a kernel indexes, the elementwise block size, the 1-element
scalar tensor a kernel loads, and the device guard around a launch."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["BLOCK", "NUM_WARPS", "flat", "scalar_tensor", "device_guard"]

# 1024 elements per program, 4 warps: 8 elements (32 B of fp32) per thread per tensor, the usual choice for a
# memory-bound elementwise kernel; it keeps the grid large enough to fill a GPU from N = 2^17 up.
BLOCK = 1024
NUM_WARPS = 4


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 1-D contiguous tensor in row-major order (a copy only when ``x`` is not contiguous)."""
    return x.contiguous().view(-1)


def scalar_tensor(s: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A step size or weight as a 1-element fp32 tensor on ``device``, which the kernel loads: a value that changes
    per call is data, not a kernel argument, so it never triggers a recompile. A tensor ``s`` is already on
    ``device`` (:func:`kernels._checks.scalar` rejects a CPU tensor for CUDA tensors: no host copy here)."""
    if isinstance(s, torch.Tensor):
        return s.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(s), device=device, dtype=torch.float32)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current around a launch. Triton launches on the *current* CUDA device and its current stream,
    not on the device of the pointers it is given: without this, ``cuda:1`` tensors while ``cuda:0`` is current
    would run on the wrong GPU. A no-op off CUDA (the interpreter on CPU tensors). Under torch.compile Inductor
    emits its own guard; at trace time (fake tensors) this one only switches the current device and back."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
