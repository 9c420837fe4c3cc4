"""philox_normal: the Triton kernel's stream against the pure-torch Philox in kernels.reference, its statistics,
and the (seed, offset) contract: reproducible, different for different seeds or offsets, counter = offset + i."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_asserts import assert_close, assert_equal

import kernels
from kernels import reference

N = 2**16  # 65536 draws: standard errors 1/256 for the mean, sqrt(2/N) = 0.0055 for the variance
SIGMAS = 5  # every bound below is 5 standard errors: a false alarm about once in 1.7 million runs per check


def _seeds(gen):
    return int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**40, (1,), generator=gen))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_philox_normal_statistics(backend, gen, device, poisoned):
    seed, offset = _seeds(gen)
    with kernels.use_backend(backend):
        x = kernels.philox_normal((N,), seed, offset, device).double().cpu()
    assert x.isfinite().all()
    mean, var = x.mean().item(), x.var().item()
    assert abs(mean) < SIGMAS / math.sqrt(N), f"mean {mean:.4f}"
    assert abs(var - 1) < SIGMAS * math.sqrt(2 / N), f"variance {var:.4f}"
    p1 = 0.6826894921370859  # P(|x| < 1)
    frac = (x.abs() < 1).double().mean().item()
    assert abs(frac - p1) < SIGMAS * math.sqrt(p1 * (1 - p1) / N), f"P(|x| < 1) = {frac:.4f}"
    lag1 = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()  # neighbours come from counters i, i + 1
    assert abs(lag1) < SIGMAS / math.sqrt(N), f"lag-1 correlation {lag1:.4f}"


def test_philox_normal_matches_reference(gen, device, poisoned):
    """Same Philox4x32-10 words; the normals differ only by the fp32 rounding of log, sqrt and cos. A seed and an
    offset past 2^32 exercise the high key word and the high counter word; the offset crosses 2^32 mid-draw."""
    for seed, offset in [_seeds(gen), (2**40 + 3, 2**32 - 1500), (0, 0)]:
        with kernels.use_backend("triton"):
            got = kernels.philox_normal((3, 1000), seed, offset, device)
        assert_close(
            f"philox_normal(seed={seed}, offset={offset})",
            got,
            reference.philox_normal((3, 1000), seed, offset, device),
        )


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_philox_normal_seed_offset_contract(backend, gen, device, poisoned):
    seed, offset = _seeds(gen)
    with kernels.use_backend(backend):
        a = kernels.philox_normal((4, 300), seed, offset, device)
        assert_equal("same (seed, offset)", kernels.philox_normal((4, 300), seed, offset, device), a)
        # element i is counter offset + i: a draw at offset + k is the first draw shifted by k
        shifted = kernels.philox_normal((1100,), seed, offset + 100, device)
        assert_equal("offset + 100", shifted[:1100], a.flatten()[100:])
        other_seed = kernels.philox_normal((4, 300), seed + 1, offset, device)
        disjoint = kernels.philox_normal((4, 300), seed, offset + 1200, device)
        low = kernels.philox_normal((4, 300), seed, offset, device, torch.bfloat16)
    for name, b in (("seed + 1", other_seed), ("offset + 1200", disjoint)):
        assert (a != b).float().mean() > 0.99, f"{name}: draws repeat"
        pair = torch.stack([a.flatten(), b.flatten()]).double().cpu()  # CPU: no cuBLAS under deterministic mode
        assert abs(torch.corrcoef(pair)[0, 1]) < SIGMAS / math.sqrt(1200), name
    # Not bitwise: Triton's interpreter converts fp32 -> bf16 by truncation (seen: 100% equal to truncation, 49% to
    # torch's round-to-nearest-even), a GPU rounds to nearest; either way within one bf16 ulp.
    assert_close("bf16 draw vs fp32 draw rounded", low, a.to(torch.bfloat16))
