"""The one train step (fastflow.step.TrainStep): eager against torch's own AdamW loop, compiled through Inductor
on CPU (forward, backward, AdamW and EMA in one graph) against eager, and the state it keeps across modes.

The compiled tests use the smallest U-Net (one level of 4 channels): Inductor's C++ code generation for the
whole step (about 300 kernels, most of them the foreach AdamW/EMA updates) takes about a minute cold on 2 cores
for it, several for the "tiny" preset. The graph is the same for any size, so the smallest one tests it.

Tolerances, and why:
- eager step vs ``torch.optim.AdamW.step``: the same fused kernel, but the step passes the lr as an fp32 tensor
  (no recompile per lr) where AdamW passes a double, and the EMA is sub/mul/add instead of lerp: rounding only.
  Bound: 1e-4 of the step budget Σlr; a missing or doubled update moves weights by ~lr (10⁴× the bound).
- compiled vs eager (fp32): AdamW moves a weight by about lr per step whatever the gradient's size, and its
  normalisation m/√v amplifies the ~1e-6 relative gradient differences of a reordered sum where the gradient is
  near zero. So the bound is on the update: every weight within 2% of Σlr, the mean within 0.1% of it; losses of
  the first step within rtol 1e-5 (identical weights and inputs).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from fastflow import path as fm
from fastflow.config import ModelConfig
from fastflow.ema import EMA
from fastflow.errors import UserError
from fastflow.objectives import FlowBatch
from fastflow.step import TrainStep, make_optimizer, place_adamw_state, resolve_mode
from fastflow.unet import UNet

CPU = torch.device("cpu")
MICRO = ModelConfig(channels=(4,), emb_dim=8, groups=1)
B = 16
LRS = (1e-3, 2e-3, 3e-3)  # a changing lr: must not recompile


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (conv_out and each block's conv2 start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _parts(cfg: ModelConfig = MICRO, seed: int = 0):
    torch.manual_seed(seed)
    model = UNet(cfg)
    _randomise(model, seed)
    return model, make_optimizer(model.parameters(), 1e-3, 0.0), EMA(model, 0.999, 10)


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        FlowBatch(
            torch.rand(B, 1, 28, 28, generator=g) * 2 - 1,
            torch.randint(0, 11, (B,), generator=g),
            torch.rand(B, generator=g),
            torch.randn(B, 1, 28, 28, generator=g),
        )
        for _ in range(n)
    ]


def _diff(name: str, got, want, budget: float, max_share: float, mean_share: float) -> None:
    d = torch.cat([(a.detach() - b.detach()).abs().flatten() for a, b in zip(got, want)])
    worst, mean = float(d.max()), float(d.mean())
    msg = f"{name}: max |Δθ| {worst:.3g}, mean {mean:.3g}; bounds {max_share * budget:.3g}, {mean_share * budget:.3g}"
    assert worst <= max_share * budget and mean <= mean_share * budget, msg


@pytest.fixture(scope="module")
def eager_run():
    """The step in eager mode, 3 steps."""
    batches = _batches(len(LRS))
    model, opt, ema = _parts()
    step = TrainStep(model, opt, ema)
    losses = torch.stack([step(b, lr) for b, lr in zip(batches, LRS)])
    return batches, model, opt, ema, losses


def test_eager_step_matches_torch_adamw(eager_run):
    """The reference: loss.backward(), torch.optim.AdamW(fused).step(), and the EMA's closed form."""
    batches, model, opt, ema, losses = eager_run
    ref, _, _ = _parts()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    shadow = [p.detach().clone() for p in ref.parameters()]
    for k, ((z, y, t, eps), lr) in enumerate(zip(batches, LRS)):
        for g in ref_opt.param_groups:
            g["lr"] = lr
        loss = fm.flow_matching_loss(ref, z, y, t, eps, contextlib.nullcontext())
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        d = min(0.999, (1 + k) / (10 + k))
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, ref.parameters())]
        assert float(loss) == pytest.approx(float(losses[k]), rel=1e-6), f"loss of step {k + 1}"
    budget = sum(LRS)
    _diff("weights", model.parameters(), ref.parameters(), budget, 1e-4, 1e-5)
    _diff("EMA weights", ema.params, shadow, budget, 1e-4, 1e-5)
    assert ema.updates == len(LRS)
    p = next(model.parameters())
    assert float(opt.state[p]["step"]) == len(LRS)
    assert set(opt.state_dict()["state"][0]) == set(ref_opt.state_dict()["state"][0])
    assert all(p.grad is None for p in model.parameters())  # gradients never land in .grad


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    counters.clear()
    model, opt, ema = _parts()
    return model, opt, ema, TrainStep(model, opt, ema, mode="compile")


def test_compiled_step_through_inductor_matches_eager(eager_run, compiled):
    batches, m_ref, _, ema_ref, loss_ref = eager_run
    model, opt, ema, step = compiled
    losses = torch.stack([step(b, lr) for b, lr in zip(batches, LRS)])
    assert step.mode == "compile"  # it did compile: no silent fallback
    torch.testing.assert_close(losses[0], loss_ref[0], rtol=1e-5, atol=0, msg=lambda m: f"first-step loss: {m}")
    torch.testing.assert_close(losses, loss_ref, rtol=1e-3, atol=0, msg=lambda m: f"losses of 3 steps: {m}")
    budget = sum(LRS)
    _diff("weights", model.parameters(), m_ref.parameters(), budget, 0.02, 1e-3)
    _diff("EMA weights", ema.params, ema_ref.params, budget, 0.02, 1e-3)
    assert ema.updates == len(LRS)
    p = next(model.parameters())
    assert float(opt.state[p]["step"]) == len(LRS)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_step_never_recompiles(compiled):
    model, opt, ema, step = compiled
    ((z, y, t, eps),) = _batches(1, seed=2)
    step(FlowBatch(z, y, t, eps), 1e-4)  # warm-up (the graph exists already if the test above ran first)
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    losses = [step(FlowBatch(z + 0.01 * i, y, t, eps), 1e-4 * (1 + i % 7)) for i in range(30)]
    # new lr, EMA weight (the warm-up ramp) and data every step: none of it may recompile
    assert counters["stats"]["unique_graphs"] == graphs == 1, dict(counters["stats"])
    assert dict(counters["frames"]) == frames, "new frames were compiled after warm-up"
    assert bool(torch.isfinite(torch.stack(losses)).all())


def test_optimizer_state_from_another_mode_or_device_is_placed_for_this_run():
    """A checkpoint's optimizer state brings back the flags and placement of the run that saved it
    (``capturable``/``fused`` from a compiled CUDA run, CPU step counters from an eager CPU run): after loading,
    this run's choice stands and the step runs."""
    model, opt, ema = _parts()
    TrainStep(model, opt, ema)(_batches(1)[0], 1e-3)
    saved = opt.state_dict()
    for g in saved["param_groups"]:  # as a compiled CUDA run would have written it
        g.update(capturable=True, fused=False, foreach=True)
    fresh, opt2, ema2 = _parts()
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["capturable"] is True
    place_adamw_state(opt2)
    g = opt2.param_groups[0]
    assert (g["capturable"], g["fused"], g["foreach"]) == (False, None, None)
    for p in fresh.parameters():
        st = opt2.state[p]
        assert st["step"].device == p.device and st["step"].dtype == torch.float32 and float(st["step"]) == 1
    loss = TrainStep(fresh, opt2, ema2)(_batches(1, seed=3)[0], 1e-3)
    assert bool(torch.isfinite(loss)) and float(opt2.state[next(fresh.parameters())]["step"]) == 2


@pytest.mark.parametrize(
    "compile, cuda_graphs, device, want",
    [
        (None, None, "cpu", "eager"),
        (None, None, "cuda", "cudagraphs"),
        (True, None, "cpu", "compile"),
        (True, None, "cuda", "cudagraphs"),
        (True, False, "cuda", "compile"),
        (False, None, "cuda", "eager"),
        (None, True, "cuda", "cudagraphs"),
    ],
)
def test_mode_per_device(compile, cuda_graphs, device, want):
    assert resolve_mode(compile, cuda_graphs, torch.device(device)) == want


def test_flags_refused_where_they_cannot_work():
    with pytest.raises(UserError, match="--cuda-graphs needs --compile"):
        resolve_mode(False, True, torch.device("cuda"))
    with pytest.raises(UserError, match="CUDA device"):
        resolve_mode(True, True, CPU)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here\nsecond line")


def test_compile_failure_falls_back_or_says_so_in_one_line(capsys):
    batch = _batches(1)[0]
    model, opt, ema = _parts()
    step = TrainStep(model, opt, ema, mode="compile", backend=_failing_backend, fallback=False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match=r"torch.compile of the train step failed .*no compiler here.*--no-compile"):
        step(batch, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was updated
    torch._dynamo.reset()
    model, opt, ema = _parts()
    step = TrainStep(model, opt, ema, mode="compile", backend=_failing_backend, fallback=True)
    loss = step(batch, 1e-3)
    err = capsys.readouterr().err
    assert "training eagerly" in err and len(err.strip().splitlines()) == 1, err
    assert step.mode == "eager" and ema.updates == 1
    eager_model, eager_opt, eager_ema = _parts()
    want = TrainStep(eager_model, eager_opt, eager_ema)(batch, 1e-3)
    assert torch.equal(loss, want)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager_model.parameters()))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graph_step_matches_eager(amp):
    from fastflow.config import PRESETS
    from fastflow.device import autocast

    dev = torch.device("cuda")
    tiny = ModelConfig(**PRESETS["tiny"][0])
    batches = [FlowBatch(*(x.to(dev) for x in b)) for b in _batches(3)]

    def build():
        model, opt, ema = _parts(tiny)
        model.to(dev)
        opt = make_optimizer(model.parameters(), 1e-3, 0.0)
        return model, opt, EMA(model, 0.999, 10)

    m_ref, opt_ref, ema_ref = build()
    ref = TrainStep(m_ref, opt_ref, ema_ref, autocast(dev, None))
    model, opt, ema = build()
    step = TrainStep(model, opt, ema, autocast(dev, amp), mode="cudagraphs")
    for b, lr in zip(batches, LRS):
        loss_ref = ref(b, lr)
        loss = step(b, lr)
    assert step.mode == "cudagraphs"
    tol = (0.02, 1e-3) if amp is None else (2.05, 0.1)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4 if amp is None else 2e-2, atol=0)
    _diff("CUDA-graph weights", model.parameters(), m_ref.parameters(), sum(LRS), *tol)
    _diff("CUDA-graph EMA", ema.params, ema_ref.params, sum(LRS), *tol)
