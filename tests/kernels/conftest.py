"""Fixtures of the kernel tests (TRITON_INTERPRET is set by tests/conftest.py, before kernels is imported), and the
skip of ``cuda``-marked kernel tests."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_asserts import HAS_CUDA, INTERPRET, TRITON_DEVICE, poisoned_outputs

import kernels


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``cuda``-marked test needs a CUDA GPU and native kernels: under TRITON_INTERPRET=1 the kernels are built for
    the interpreter, which must never run inside torch.compile or a CUDA-graph capture, so skip there too. (A
    directory conftest's runtest hook applies to the tests below it only.)"""
    if item.get_closest_marker("cuda") is not None and (INTERPRET or not HAS_CUDA):
        pytest.skip("needs a CUDA GPU and native kernels (TRITON_INTERPRET unset or 0)")


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random inputs each run; the seed is printed so pytest shows it with a failure, and
    ``FASTFLOW_TEST_SEED=<seed>`` replays it."""
    seed = int(os.environ.get("FASTFLOW_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"input seed = {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def device() -> str:
    """Where the Triton path runs: CPU under the interpreter, CUDA with native kernels."""
    if TRITON_DEVICE is None:
        pytest.skip("Triton path needs TRITON_INTERPRET=1 or a CUDA GPU")
    return TRITON_DEVICE


@pytest.fixture
def poisoned():
    """Every torch.empty* inside the test is NaN (see kernel_asserts.poisoned_outputs)."""
    with poisoned_outputs():
        yield


@pytest.fixture
def triton_backend(poisoned):
    """Force the Triton path (outputs poisoned with NaN)."""
    with kernels.use_backend("triton"):
        yield
