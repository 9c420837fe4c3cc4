"""The compiled sampler (fastflow.compile.CompiledSampler) against the eager one, on CPU with the "tiny" U-Net.

Tolerance: fp32, max |Δ| ≤ 1e-5 on images in [0, 1] (float reassociation only). One test goes through inductor;
the others trace with the ``aot_eager`` backend (Dynamo and AOTAutograd, no code generation), which checks the
graphs (how many, when they recompile) in seconds. The train step's modes are tested in test_step.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fastflow.compile import CompiledSampler, make_sampler
from fastflow.config import PRESETS, ModelConfig
from fastflow.solvers import SamplerSpec, sample
from fastflow.unet import UNet

TINY = ModelConfig(**PRESETS["tiny"][0])


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (conv_out and each block's conv2 start at zero, which would make every
    output zero and the comparisons empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every sampler compiles the same step function: start each test with an empty Dynamo cache, so that no
    test runs into the recompile limit through the others."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_model(seed: int = 3) -> UNet:
    torch.manual_seed(seed)
    model = UNet(TINY).eval()
    _randomise(model, seed)
    return model


def test_compiled_sampler_matches_eager():
    torch.manual_seed(3)
    model = UNet(TINY).eval()
    _randomise(model, 3)
    labels = torch.tensor([0, 3, 7, 9, 10])  # 10: "no label"
    spec = SamplerSpec(steps=4, guidance=2.0)
    want, nfe_want = sample(model, labels, spec, generator=torch.Generator().manual_seed(5))
    sampler = CompiledSampler(model)
    got, nfe = sampler(labels, spec, generator=torch.Generator().manual_seed(5))
    assert nfe == nfe_want == 8  # guided: cond + uncond per step
    assert got.dtype == torch.float32
    diff = (got - want).abs().max()
    assert diff <= 1e-5, f"compiled vs eager samples: max |Δ| {diff:.3g}"
    assert float(want.std()) > 0.01  # the comparison is not between two constant images
    # another step count reuses the same graph (time and step size are tensors)
    graphs = counters["stats"]["unique_graphs"]
    sampler(labels, spec.with_steps(6), generator=torch.Generator().manual_seed(5))
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(ValueError, match="this sampler serves"):  # one sampler, one family: no silent recompiles
        sampler(labels, SamplerSpec(steps=4, guidance=3.0))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_interval_guidance_compiles_one_graph_per_stage_pattern(solver):
    """With a guidance interval, whether each stage is guided is decided on the host and passed as a constant:
    Euler compiles exactly two graphs (guided and not), whatever the step count; RK4 one per distinct pattern
    of its four stages. Images and NFE match the eager loop."""
    model = _tiny_model()
    labels = torch.tensor([0, 3, 7, 9, 10])
    iv = (0.3, 0.7)
    sampler = CompiledSampler(model, backend="aot_eager")
    seen: set[tuple[bool, ...]] = set()
    # RK4 traces a graph per pattern of its four stages: 4 and 2 steps already straddle both bounds (5 patterns)
    for steps in (10, 5, 10) if solver == "euler" else (4, 2, 4):
        before = _graphs()
        spec = SamplerSpec(solver, steps, 2.0, interval=iv)
        got, nfe = sampler(labels, spec, generator=torch.Generator().manual_seed(5))
        new = set(spec.plan) - seen
        assert _graphs() - before == len(new), f"{steps} steps: one graph per new stage pattern, none per step"
        seen |= new
        want, nfe_want = sample(model, labels, spec, generator=torch.Generator().manual_seed(5))
        assert nfe == nfe_want == spec.nfe
        diff = float((got - want).abs().max())
        assert diff <= 1e-5, f"{solver}, {steps} steps: compiled vs eager max |Δ| {diff:.3g}"
    if solver == "euler":
        assert seen == {(True,), (False,)}
    else:
        assert len(seen) > 2, "the grid should have steps that straddle a bound"


def test_interval_0_1_is_full_guidance_and_an_empty_one_none():
    model = _tiny_model()
    labels = torch.arange(10)

    def run(**kw):
        spec = SamplerSpec(steps=4, **kw)
        return CompiledSampler(model, backend="aot_eager")(labels, spec, generator=torch.Generator().manual_seed(2))

    full, nfe_full = run(guidance=2.0)
    got, nfe = run(guidance=2.0, interval=(0.0, 1.0))
    assert torch.equal(got, full) and nfe == nfe_full == 8
    plain, nfe_plain = run(guidance=1.0)
    got, nfe = run(guidance=2.0, interval=(0.3, 0.45))  # no stage time in it: t = 0, .25, .5, .75
    assert torch.equal(got, plain) and nfe == nfe_plain == 4
    assert not torch.equal(full, plain)


def test_chunks_run_at_one_batch_size():
    """11 images in chunks of at most 4 run as 4, 4, 3, the last padded to 4: one static graph (the second chunk
    starts 4 labels into the tensor: no recompile for that either), and the same images as one eager batch."""
    model = _tiny_model()
    labels = torch.arange(11) % 10
    want, _ = sample(model, labels, SamplerSpec(steps=3), generator=torch.Generator().manual_seed(4))
    sampler = CompiledSampler(model, batch_size=4, backend="aot_eager")
    before = _graphs()
    got, nfe = sampler(labels, SamplerSpec(steps=3), generator=torch.Generator().manual_seed(4))
    assert _graphs() - before == 1 and nfe == 3
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"chunked compiled vs one eager batch: max |Δ| {diff:.3g}"


def test_static_shapes_each_batch_size_compiles_its_own_graph():
    """dynamic=False: batch sizes 3, 4 and 5 give three static graphs (with automatic dynamic shapes the second
    size would compile one dynamic graph that the third reuses); each size again compiles nothing."""
    model = _tiny_model()
    sampler = CompiledSampler(model, backend="aot_eager")
    before = _graphs()
    for b in (3, 4, 5, 3, 4, 5):
        sampler(torch.arange(b), SamplerSpec(steps=2), generator=torch.Generator().manual_seed(0))
    assert _graphs() - before == 3


def test_make_sampler_eager_is_sample():
    model = _tiny_model()
    labels = torch.arange(12) % 11  # 10: "no label"
    spec = SamplerSpec("heun", 3, 2.0, interval=(0.2, 0.6))
    draw = make_sampler(model, compiled=False, batch_size=5)
    got, nfe = draw(labels, spec, generator=torch.Generator().manual_seed(8))
    want, nfe_want = sample(model, labels, spec, generator=torch.Generator().manual_seed(8))
    assert nfe == nfe_want and float((got - want).abs().max()) <= 1e-5
    assert isinstance(make_sampler(model, compiled=True, batch_size=5), CompiledSampler)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_graph_sampler_matches_eager():
    dev = torch.device("cuda")
    torch.manual_seed(3)
    model = UNet(TINY).to(dev).eval()
    _randomise(model, 3)
    labels = torch.arange(10, device=dev)
    spec = SamplerSpec(steps=5)
    want, _ = sample(model, labels, spec, generator=torch.Generator(dev).manual_seed(5))
    sampler = CompiledSampler(model, cuda_graphs=True)
    got, _ = sampler(labels, spec, generator=torch.Generator(dev).manual_seed(5))
    again, _ = sampler(labels, spec, generator=torch.Generator(dev).manual_seed(5))  # a replay
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got, again)


def test_ab2_carries_its_last_derivative_between_compiled_steps():
    """AB2 needs the step before's derivative: the compiled step takes it and hands it on (one graph for the
    first step, which has none, and one for each guided pattern after it). A sampler that dropped it would be
    Euler, which differs from AB2 by far more than the tolerance."""
    model = _tiny_model()
    labels = torch.tensor([0, 3, 7, 9, 10])
    iv = (0.3, 0.7)
    sampler = CompiledSampler(model, backend="aot_eager")
    for steps in (6, 3):
        spec = SamplerSpec("ab2", steps, 2.0, interval=iv)
        got, nfe = sampler(labels, spec, generator=torch.Generator().manual_seed(5))
        want, nfe_want = sample(model, labels, spec, generator=torch.Generator().manual_seed(5))
        euler_spec = SamplerSpec("euler", steps, 2.0, interval=iv)
        euler, _ = sample(model, labels, euler_spec, generator=torch.Generator().manual_seed(5))
        assert nfe == nfe_want == spec.nfe
        diff, gap = float((got - want).abs().max()), float((euler - want).abs().max())
        assert diff <= 1e-5, f"{steps} steps: compiled vs eager AB2 max |Δ| {diff:.3g}"
        assert gap > 1e-3, f"{steps} steps: AB2 and Euler should differ here (max |Δ| {gap:.3g})"
