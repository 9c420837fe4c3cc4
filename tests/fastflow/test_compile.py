"""The compiled sampler (fastflow.compile.CompiledSampler) against the eager one, on CPU with the "tiny" U-Net.

Tolerance: fp32, 4 Euler steps, max |Δ| ≤ 1e-5 on images in [0, 1] (float reassociation only). The train step's
modes are tested in test_step.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fastflow.compile import CompiledSampler
from fastflow.config import PRESETS, ModelConfig
from fastflow.solvers import sample
from fastflow.unet import UNet

TINY = ModelConfig(**PRESETS["tiny"][0])


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (conv_out and each block's conv2 start at zero, which would make every
    output zero and the comparisons empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_compiled_sampler_matches_eager():
    torch.manual_seed(3)
    model = UNet(TINY).eval()
    _randomise(model, 3)
    labels = torch.tensor([0, 3, 7, 9, 10])  # 10: "no label"
    want, nfe_want = sample(model, labels, 4, guidance=2.0, generator=torch.Generator().manual_seed(5))
    sampler = CompiledSampler(model, guidance=2.0)
    got, nfe = sampler(labels, 4, generator=torch.Generator().manual_seed(5))
    assert nfe == nfe_want == 8  # guided: cond + uncond per step
    assert got.dtype == torch.float32
    diff = (got - want).abs().max()
    assert diff <= 1e-5, f"compiled vs eager samples: max |Δ| {diff:.3g}"
    assert float(want.std()) > 0.01  # the comparison is not between two constant images
    # another step count reuses the same graph (time and step size are tensors)
    graphs = counters["stats"]["unique_graphs"]
    sampler(labels, 6, generator=torch.Generator().manual_seed(5))
    assert counters["stats"]["unique_graphs"] == graphs


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_graph_sampler_matches_eager():
    dev = torch.device("cuda")
    torch.manual_seed(3)
    model = UNet(TINY).to(dev).eval()
    _randomise(model, 3)
    labels = torch.arange(10, device=dev)
    want, _ = sample(model, labels, 5, generator=torch.Generator(dev).manual_seed(5))
    sampler = CompiledSampler(model, cuda_graphs=True)
    got, _ = sampler(labels, 5, generator=torch.Generator(dev).manual_seed(5))
    again, _ = sampler(labels, 5, generator=torch.Generator(dev).manual_seed(5))  # a replay
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got, again)
