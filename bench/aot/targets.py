"""The GPU targets the kernels are compiled for, their hardware limits, and Triton's name for each."""

from __future__ import annotations

import re

__all__ = ["TARGETS", "LIMITS", "capability", "gpu_target"]

TARGETS = ("sm_80", "sm_90")  # A100; H100 / H200

# Per-target hardware limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"):
# 255 registers per thread on every arch since sm_35; a 64 Ki-register file per SM (a block's warps·32·regs must
# fit); shared memory per block with the opt-in Triton makes for a large request: 163 KiB on sm_80, 227 KiB on
# sm_90 (the 1 KiB the system reserves per block excluded).
LIMITS = {
    80: {"registers": 255, "register_file": 65536, "shared": 163 * 1024, "threads": 1024},
    90: {"registers": 255, "register_file": 65536, "shared": 227 * 1024, "threads": 1024},
}


def capability(target: str) -> int:
    """``"sm_90"`` (or ``"sm90"``) -> 90; a ``ValueError`` for anything else."""
    m = re.fullmatch(r"sm_?(\d+)", target)
    if not m:
        raise ValueError(f"target must look like sm_80, got {target!r}")
    return int(m.group(1))


def gpu_target(cap: int):
    """Triton's ``GPUTarget`` for CUDA compute capability ``cap`` (warp size 32)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", cap, 32)
