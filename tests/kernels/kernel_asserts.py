"""Shared helpers of the kernel tests: tolerances, the device the Triton path runs on, inputs, assertions.

Under ``TRITON_INTERPRET=1`` (CI, CPU) the Triton kernels run in the interpreter on CPU tensors. With
``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on CUDA tensors
(``bench/gpu_kernels_check.py``); without either, the Triton-path tests skip.
"""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if HAS_CUDA else None)

# (rtol, atol) per storage dtype: fp32 math both sides, so fp32 agrees to rounding; a bf16/fp16 output may sit one
# ulp (2^-8 / 2^-11 relative) apart when the fp32 values straddle a rounding boundary. Never widened to pass.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
DTYPES = tuple(TOL)
DTYPE_IDS = ("fp32", "bf16", "fp16")

# Sizes from the issue: odd flat sizes around a block edge (BLOCK = 1024), and MNIST batches (B, 1, 28, 28).
FLAT_SHAPES = [(1,), (7,), (1023,), (1025,)]
BATCH_SHAPES = [(1, 1, 28, 28), (3, 1, 28, 28), (32, 1, 28, 28), (129, 1, 28, 28)]
SHAPES = FLAT_SHAPES + BATCH_SHAPES


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol_dtype: torch.dtype | None = None):
    """``|actual − expected| <= atol + rtol·|expected|`` elementwise with the tolerance of ``tol_dtype`` (default:
    expected's dtype); same shape and dtype required. The message names the tensor and gives max and mean error,
    the worst element and how many are NaN (an element the kernel never wrote stays NaN)."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    rtol, atol = TOL[tol_dtype or expected.dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so a NaN is always bad
    if bad.any():
        finite = err[err.isfinite()]
        worst = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
        raise AssertionError(
            f"{name} ({actual.dtype}, shape {list(actual.shape)}): {int(bad.sum())}/{bad.numel()} elements beyond "
            f"rtol={rtol} atol={atol}; max abs err {finite.max().item() if finite.numel() else float('nan'):.3g}, "
            f"mean abs err {finite.mean().item() if finite.numel() else float('nan'):.3g}; "
            f"{int(a.isnan().sum())} NaN in actual, {int(e.isnan().sum())} in expected; worst at flat index {worst}: "
            f"actual {a.flatten()[worst].item():.6g} vs expected {e.flatten()[worst].item():.6g}"
        )


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor):
    """Bitwise equality, with the same kind of message as :func:`assert_close`."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{name}: shape/dtype differ"
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(
            f"{name}: not bitwise equal; {int((diff != 0).sum())}/{diff.numel()} differ, max {diff.max().item():.3g}, "
            f"mean {diff.mean().item():.3g}"
        )


def data(shape, dtype, gen: torch.Generator, device) -> torch.Tensor:
    """Image-like values in [−1, 1]."""
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1).to(device=device, dtype=dtype)


def normal(shape, dtype, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def away_from_zero(shape, dtype, gen: torch.Generator, device) -> torch.Tensor:
    """Random sign times [0.5, 1.5): an update by h·v with h >= 0.1 moves every element by >= 0.05, far beyond any
    tolerance, so an element an in-place kernel failed to write cannot pass."""
    s = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    return (s * (0.5 + torch.rand(shape, generator=gen))).to(device=device, dtype=dtype)


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty* inside is filled with NaN (torch's deterministic mode fills uninitialised memory), so an
    output element a kernel never writes stays NaN and fails :func:`assert_close`."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
