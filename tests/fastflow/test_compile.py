"""The compiled train step and sampler (fastflow.compile) against the eager ones, on CPU with the "tiny" U-Net.

Inductor compiles on 2 cores take minutes each, so the compiled objects are built once per module and shared:
one fp32 step with the update in the graph (the CUDA path; traced with the aot_eager backend), one bf16 step with
the CPU default through inductor (the graph ends at the gradients, fused AdamW updates), one inductor sampler.

Tolerances, and why:
- fp32 loss of the first step (identical weights and inputs): rtol 1e-5, float reassociation only.
- fp32 weights after AdamW steps: AdamW moves a weight by about lr per step whatever the gradient's size, and
  its normalisation m/√v amplifies the ~1e-6 relative gradient differences of a reordered sum where the
  gradient is near zero. So the bound is on the update: every weight within 2% of the total step budget Σ lr,
  and the mean difference within 0.1% of it. A missing or doubled update, a wrong lr or a skipped EMA update
  moves weights by ~lr: 50× the bound.
- bf16 against fp32: the network runs in bf16 (8 bits of mantissa, ~0.4% per rounding): loss rtol 2e-2. After
  one step every weight has moved by about ±lr either way; a near-zero gradient whose sign bf16 flips makes a
  difference of 2·lr (the bound: 2.05·lr), and the mean difference stays under 10% of lr.
- sampler, fp32: 4 Euler steps, max |Δ| ≤ 1e-5 on images in [0, 1].
Seen here (torch 2.14.1, 2 cores): fp32 graph path max 0.0033·Σlr, mean 4.7e-6·Σlr, losses within 3.3e-7;
bf16 max 2.0·lr (sign flips), mean 6.2e-3·lr, first loss within 5.5e-4.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fastflow import path as fm
from fastflow.compile import CompiledSampler, CompiledTrainStep, make_optimizer, train_step_for
from fastflow.config import PRESETS, ModelConfig, TrainConfig
from fastflow.device import autocast
from fastflow.ema import EMA
from fastflow.errors import UserError
from fastflow.solvers import sample
from fastflow.unet import UNet

CPU = torch.device("cpu")
TINY = ModelConfig(**PRESETS["tiny"][0])
B = 4
LRS = (1e-3, 2e-3, 3e-3)  # a changing lr: must not recompile


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (conv_out and each block's conv2 start at zero, which would make every
    output zero and the comparisons empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = UNet(TINY)
    _randomise(model, seed)
    opt = make_optimizer(model.parameters(), 1e-3, 0.01, CPU, compiled=True)
    ema = EMA(model, 0.999, 10)
    return model, opt, ema


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.rand(B, 1, 28, 28, generator=g) * 2 - 1
        y = torch.randint(0, 11, (B,), generator=g)
        t = torch.rand(B, generator=g)
        eps = torch.randn(B, 1, 28, 28, generator=g)
        out.append((z, y, t, eps))
    return out


def _eager_steps(batches, lrs):
    """The Trainer's eager step (fastflow.train.Trainer.train_step after the random draws)."""
    model, opt, ema = _parts()
    ctx = autocast(CPU, None)
    losses = []
    for (z, y, t, eps), lr in zip(batches, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        loss = fm.flow_matching_loss(model, z, y, t, eps, ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        losses.append(loss.detach())
    return model, ema, opt, torch.stack(losses)


def _assert_weights_close(
    name, got: torch.nn.Module, want: torch.nn.Module, budget: float, max_share: float, mean_share: float
):
    diffs = torch.cat([(a.detach() - b.detach()).abs().flatten() for a, b in zip(got.parameters(), want.parameters())])
    worst, mean = float(diffs.max()), float(diffs.mean())
    msg = f"{name}: max |Δθ| {worst:.3g}, mean {mean:.3g}; bounds {max_share * budget:.3g}, {mean_share * budget:.3g} (Σlr {budget:g})"
    assert worst <= max_share * budget and mean <= mean_share * budget, msg


@pytest.fixture(scope="module")
def eager_run():
    batches = _batches(len(LRS))
    return batches, _eager_steps(batches, LRS)


@pytest.fixture(scope="module")
def compiled_fp32():
    torch._dynamo.reset()
    counters.clear()
    model, opt, ema = _parts()
    # The update inside the graph: the one-graph path that CUDA graphs capture. Traced by Dynamo and AOTAutograd
    # (fullgraph, guards, recompiles: all decided there) and run without inductor's code generation, which for
    # this graph's ~100 foreach kernels takes minutes on 2 cores; inductor itself runs in the bf16 test below.
    step = CompiledTrainStep(model, opt, ema, autocast(CPU, None), update="graph", backend="aot_eager")
    return model, opt, ema, step


def test_compiled_fp32_step_matches_eager(eager_run, compiled_fp32):
    batches, (m_ref, ema_ref, opt_ref, loss_ref) = eager_run
    model, opt, ema, step = compiled_fp32
    losses = torch.stack([step(*b, lr) for b, lr in zip(batches, LRS)])
    torch.testing.assert_close(losses[0], loss_ref[0], rtol=1e-5, atol=0, msg=lambda m: f"first-step loss: {m}")
    torch.testing.assert_close(losses, loss_ref, rtol=1e-3, atol=0, msg=lambda m: f"losses of 3 steps: {m}")
    budget = sum(LRS)
    _assert_weights_close("weights", model, m_ref, budget, 0.02, 1e-3)
    _assert_weights_close("EMA weights", ema.shadow, ema_ref.shadow, budget, 0.02, 1e-3)
    assert ema.updates == ema_ref.updates == len(LRS)
    # The optimizer state is AdamW's own: same keys, same step count, checkpointable.
    p = next(model.parameters())
    assert float(opt.state[p]["step"]) == len(LRS)
    assert set(opt.state_dict()["state"][0]) == set(opt_ref.state_dict()["state"][0])
    assert all(p.grad is None for p in model.parameters())  # gradients never land in .grad


def test_no_recompiles_over_100_steps(compiled_fp32):
    model, opt, ema, step = compiled_fp32
    ((z, y, t, eps),) = _batches(1, seed=2)
    step(z, y, t, eps, 1e-4)  # warm-up (the graph exists already if the test above ran first)
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    losses = []
    for i in range(100):
        # new lr and EMA weight every step (warm-up ramps), new data: none of it may recompile
        losses.append(step(z + 0.01 * i, y, t, eps, 1e-4 * (1 + i % 7)))
    assert counters["stats"]["unique_graphs"] == graphs == 1, dict(counters["stats"])
    assert dict(counters["frames"]) == frames, "new frames were compiled after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert bool(torch.isfinite(torch.stack(losses)).all())


def test_compiled_bf16_step_matches_eager_fp32(eager_run):
    batches, (m_ref, _, _, loss_ref) = eager_run
    model, opt, ema = _parts()
    step = CompiledTrainStep(model, opt, ema, autocast(CPU, torch.bfloat16))
    assert step.update == "eager"  # the CPU default: compiled gradients, fused AdamW
    loss = step(*batches[0], LRS[0])
    assert loss.dtype == torch.float32  # the loss reduction stays fp32
    torch.testing.assert_close(loss, loss_ref[0], rtol=2e-2, atol=0, msg=lambda m: f"bf16 first-step loss: {m}")
    m1, _, _, _ = _eager_steps(batches[:1], LRS[:1])
    _assert_weights_close("bf16 weights after one step", model, m1, LRS[0], 2.05, 0.1)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


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


def test_flags_refused_where_they_cannot_work():
    model, opt, ema = _parts()
    with pytest.raises(UserError, match="--cuda-graphs needs --compile"):
        train_step_for(TrainConfig(cuda_graphs=True), model, opt, ema, None, CPU)
    with pytest.raises(UserError, match="CUDA device"):
        train_step_for(TrainConfig(compile=True, cuda_graphs=True), model, opt, ema, None, CPU)
    assert train_step_for(TrainConfig(), model, opt, ema, None, CPU) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graph_train_step_matches_eager(amp):
    dev = torch.device("cuda")
    batches = [tuple(x.to(dev) for x in b) for b in _batches(3)]

    def build(compiled: bool):
        torch.manual_seed(0)
        model = UNet(TINY)
        _randomise(model, 0)
        model.to(dev)
        opt = make_optimizer(model.parameters(), 1e-3, 0.01, dev, compiled=compiled)
        return model, opt, EMA(model, 0.999, 10)

    m_ref, opt_ref, ema_ref = build(False)
    ctx32 = autocast(dev, None)
    for (z, y, t, eps), lr in zip(batches, LRS):
        for g in opt_ref.param_groups:
            g["lr"] = lr
        loss_ref = fm.flow_matching_loss(m_ref, z, y, t, eps, ctx32)
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        ema_ref.update(m_ref)
    model, opt, ema = build(True)
    step = CompiledTrainStep(model, opt, ema, autocast(dev, amp), cuda_graphs=True)
    for b, lr in zip(batches, LRS):
        loss = step(*b, lr)
    tol = (0.02, 1e-3) if amp is None else (2.0, 0.1)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-4 if amp is None else 2e-2, atol=0)
    _assert_weights_close("CUDA-graph weights", model, m_ref, sum(LRS), *tol)


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
