"""The benchmark's step functions (bench.train_rows, bench.sample_rows) as pytest-benchmark groups, on CPU with the "tiny" U-Net.

With the project's default ``--benchmark-disable`` each runs once as a plain test and checks its output. To time
them and keep the figures::

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/bench --benchmark-enable --benchmark-json=bench.json

Speed is reported, never asserted: the CPU is shared and a timing bound would fail at random.

The compiled mode runs the smallest U-Net (one level of 4 channels, as tests/fastflow/test_step.py): Inductor's
C++ code generation dominates it and depends on the graph, not the widths; cold, on 2 shared cores, the train step
took 99 s for "tiny" and 44 s for this one, the sampler 35 s and 22 s. ``python -m bench`` times the real presets.
"""

from __future__ import annotations

import pytest
import torch

from bench.sample_rows import sample_runner
from bench.train_rows import train_runner

BATCH = 16
# eager fp32 (the reference), eager bf16 and the compiled bf16 unit (the CPU default). Each compiled mode costs
# an inductor compile (tens of seconds on 2 cores), so the other modes live in `python -m bench` only.
MODES = ["eager-fp32", "eager-bf16", pytest.param("compile-bf16", marks=pytest.mark.slow)]
MICRO = {"channels": (4,), "emb_dim": 8, "groups": 1}


def _model(mode: str) -> dict | None:
    return MICRO if mode.startswith("compile") else None  # None: the preset's own U-Net


def _extra(benchmark, run_images: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["images_per_s"] = run_images / stats.stats.median


@pytest.mark.parametrize("mode", MODES)
def test_train_step(benchmark, mode, mnist_root, tmp_path):
    benchmark.group = f"train-step ({'micro' if _model(mode) else 'tiny'}, batch 16, CPU)"
    run, info = train_runner(
        mode, BATCH, preset="tiny", device="cpu", data_root=str(mnist_root), workdir=str(tmp_path), model=_model(mode)
    )
    model = info["trainer"].model
    before = [p.detach().clone() for p in model.parameters()]
    run()  # warm-up: the compiled mode compiles here, outside the timing
    loss = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    _extra(benchmark, BATCH)
    assert loss.shape == () and loss.dtype == torch.float32
    # a fresh U-Net outputs zero, so the first losses are near E|z − ε|² = E z² + 1 ≈ 1.9 on MNIST in [-1, 1]
    assert 0.2 < float(loss) < 5.0, float(loss)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert moved > 0, "the step did not update the weights"
    assert info["trainer"].ema is None or info["trainer"].ema.updates >= 2


@pytest.mark.parametrize("mode", MODES)
def test_sampler(benchmark, mode):
    benchmark.group = f"sampler ({'micro' if _model(mode) else 'tiny'}, batch 16, 10 NFE, CPU)"
    run, info = sample_runner(mode, BATCH, preset="tiny", device="cpu", model=_model(mode))
    with torch.no_grad():  # a non-zero last layer, or every sample is the clamped noise alone
        torch.nn.init.normal_(info["net"].conv_out.weight, std=0.1)
    run(10)
    images = benchmark.pedantic(run, args=(10,), rounds=3, iterations=1, warmup_rounds=0)
    _extra(benchmark, BATCH)
    assert images.shape == (BATCH, 1, 28, 28) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all()) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    again = run(10)  # same seed, same images: the sampler is deterministic
    torch.testing.assert_close(again, images, rtol=0, atol=0)
