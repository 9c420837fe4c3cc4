"""MeanFlow: the target's signs against closed forms, its JVP against finite differences, the train step (eager
against compiled, resumed bit for bit, started from a flow-matching checkpoint), the settings, and the
``meanflow`` sampler (the update, NFE = steps, the compiled sampler, the command lines).

Conventions: t = 0 noise, t = 1 data; x_t = t·z + (1 − t)·ε; the average velocity over [t, s] (s ≥ t) is
u(x_t, t, s) = (1/(s − t))·∫ₜˢ v dτ and its target v + (s − t)·(v·∂ₓu + ∂ₜu).

The closed form: 1-D data z ~ N(μ, σ²) and noise ε ~ N(0, 1) give x_t ~ N(m(t), sd(t)²) with m(t) = t·μ and
sd(t)² = t²σ² + (1 − t)². The flow of such a path keeps each point's standard score, so
x_s = m(s) + sd(s)/sd(t)·(x_t − m(t)), and u, v follow exactly. The field is curved in time (u ≠ v for s > t), so
a wrong sign of (s − t) or of a tangent changes the target by O(1).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from gaussian_path import MU, SIGMA
from gaussian_path import m as _m
from gaussian_path import sd as _sd
from gaussian_path import u as _u
from gaussian_path import v as _v
from torch._dynamo.utils import counters

from fastflow import path as fm
from fastflow.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from fastflow.compile import CompiledSampler
from fastflow.config import PRESETS, ModelConfig, TrainConfig, resolve_configs
from fastflow.ema import EMA
from fastflow.errors import UserError
from fastflow.objectives import FlowBatch, MeanFlow, MeanFlowBatch, PairBatch
from fastflow.path import NO_LABEL, meanflow_loss, meanflow_target
from fastflow.solvers import SamplerSpec, integrate, sample, time_grid
from fastflow.step import TrainStep, make_optimizer
from fastflow.trainer import Trainer
from fastflow.unet import UNet

MICRO = ModelConfig(channels=(4,), emb_dim=8, groups=1, mean_flow=True)  # test_step.py's smallest U-Net
TINY = ModelConfig(**{**PRESETS["tiny"][0], "mean_flow": True})


class Gaussian(torch.nn.Module):
    """The exact u(x, t, s) of the Gaussian path as a "network" (x of shape [B, 1]); s = None: v(x, t)."""

    def forward(self, x, t, y, s=None, plain_norm=False):
        t = t.view(-1, 1)
        return _v(x, t) if s is None else _u(x, t, s.view(-1, 1))


def test_target_of_the_exact_average_velocity_is_itself():
    """With the exact u and the marginal v as tangent, v + (s − t)·du/dt is u again (the MeanFlow identity):
    checks the sign of (s − t), the tangents (v, 1) for (x, t) and s held fixed (a tangent on s, or −v, −1,
    would move the target by O(1): the control below)."""
    g = torch.Generator().manual_seed(0)
    b = 64
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9
    s = t + (1 - t) * torch.rand(b, generator=g, dtype=torch.float64).clamp_min(0.05)
    x = _m(t).view(-1, 1) + _sd(t).view(-1, 1) * torch.randn(b, 1, generator=g, dtype=torch.float64)
    v = _v(x, t.view(-1, 1))
    y = torch.zeros(b, dtype=torch.long)
    target, dudt = meanflow_target(Gaussian(), x, t, s, y, v)
    want = _u(x, t.view(-1, 1), s.view(-1, 1))
    torch.testing.assert_close(target, want, rtol=1e-10, atol=1e-10)
    # the control: the other sign of (s − t) misses by O(1), so the identity is not trivially met
    wrong = v - (s - t).view(-1, 1) * dudt
    assert float((wrong - want).abs().max()) > 0.1
    # one jump with the exact u from t = 0 is the exact transport: x_1 = μ + σ·x_0
    x0 = torch.randn(8, 1, generator=g, dtype=torch.float64)
    jump = x0 + _u(x0, torch.zeros(8, 1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64))
    torch.testing.assert_close(jump, MU + SIGMA * x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_meanflow_solver_on_the_exact_average_velocity_is_exact(steps):
    """x ← x + h·u(x, t, t + h) with the exact u lands on the exact transport at any step count; Euler on the
    exact v does not (at 3 steps it misses by more than 1e-2)."""
    x0 = torch.linspace(-2.0, 2.0, 9).view(-1, 1)

    def field(x, t, s=None):
        tt = t.double().view(1, 1)
        return (_v(x.double(), tt) if s is None else _u(x.double(), tt, s.double().view(1, 1))).float()

    got = integrate(field, x0.clone(), time_grid(steps), "meanflow")
    torch.testing.assert_close(got, MU + SIGMA * x0, rtol=0, atol=2e-6)
    euler = integrate(field, x0.clone(), time_grid(steps), "euler")
    assert float((euler - (MU + SIGMA * x0)).abs().max()) > 1e-2


class OneImage(torch.nn.Module):
    """The exact field of a single data point z0 (any s: the paths are straight): u = (z0 − x)/(1 − t)."""

    def __init__(self, z0, sign=1.0):
        super().__init__()
        self.z0, self.sign = z0, sign

    def forward(self, x, t, y, s=None, plain_norm=False):
        return self.sign * (self.z0 - x) / (1 - t).view(-1, 1, 1, 1)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_loss_of_the_exact_field_of_one_image_is_zero(guidance):
    """Through meanflow_loss itself (the path op, v = z − ε, the guided target): the exact field of one image
    has zero loss (its unconditional field is the same, so guidance leaves the target alone); the field of the
    other sign does not."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.rand(1, 1, 28, 28, generator=g) * 2 - 1
    b = 8
    z = z0.expand(b, -1, -1, -1).contiguous()
    eps = torch.randn(b, 1, 28, 28, generator=g)
    t, s = fm.sample_time_pair(b, 0.4, 1.0, 0.5, g, "cpu")
    t = t.clamp_max(0.95)  # the field divides by 1 − t
    y = torch.tensor([0, 1, 2, 3, NO_LABEL, 5, 6, NO_LABEL])
    ctx = torch.autocast("cpu", enabled=False)
    loss, mse = meanflow_loss(OneImage(z0), z, y, t, s, eps, ctx, guidance=guidance, adaptive_p=1.0)
    assert float(mse) < 1e-9 and float(loss) < 1e-6, (float(mse), float(loss))
    _, mse = meanflow_loss(OneImage(z0, -1.0), z, y, t, s, eps, ctx, guidance=guidance, adaptive_p=1.0)
    assert float(mse) > 0.1


class Linear(torch.nn.Module):
    """u = a·x + b·t + c·s + d[y]: du/dt along (v, 1, 0) is a·v + b (the c·s term shows a tangent on s)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(v)) for v in (0.3, -0.7, 1.9))
        self.d = torch.nn.Parameter(torch.linspace(-1, 1, NO_LABEL + 1))

    def forward(self, x, t, y, s=None, plain_norm=False):
        s = t if s is None else s
        col = (-1, 1, 1, 1)
        return self.a * x + (self.b * t + self.c * s + self.d[y]).view(col)


@pytest.mark.parametrize("p, w", [(0.0, 1.0), (0.5, 1.0), (1.0, 2.5)])
def test_loss_and_gradient_against_the_written_out_formula(p, w):
    g = torch.Generator().manual_seed(2)
    b = 6
    z, eps = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1, torch.randn(b, 1, 28, 28, generator=g)
    t = torch.rand(b, generator=g) * 0.5
    s = t + torch.rand(b, generator=g) * 0.5
    y = torch.tensor([1, NO_LABEL, 3, 4, NO_LABEL, 9])
    model = Linear()
    ctx = torch.autocast("cpu", enabled=False)
    loss, mse = meanflow_loss(model, z, y, t, s, eps, ctx, guidance=w, adaptive_p=p)
    loss.backward()
    # by hand
    col = (-1, 1, 1, 1)
    with torch.no_grad():
        a, b_, c, d = model.a, model.b, model.c, model.d
        x = t.view(col) * z + (1 - t.view(col)) * eps
        v = z - eps
        u_unc = a * x + (b_ * t + c * t + d[NO_LABEL]).view(col)  # u(x, t, t | no label)
        kept = (y != NO_LABEL).view(col)
        v = torch.where(kept, w * v + (1 - w) * u_unc, v)
        target = v + (s - t).view(col) * (a * v + b_)
    ref = Linear()
    u = ref.a * x + (ref.b * t + ref.c * s + ref.d[y]).view(col)
    per = (u - target).pow(2).mean(dim=(1, 2, 3))
    want = (per / (per.detach() + 1e-3) ** p).mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(mse, per.mean().detach(), rtol=1e-5, atol=0)
    for name in ("a", "b", "c", "d"):
        got, exp = getattr(model, name).grad, getattr(ref, name).grad
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_jvp_matches_a_central_finite_difference():
    """du/dt of the U-Net (every weight non-zero, the gap MLP included) along (v, 1, 0) against
    (u(x + h·v, t + h, s) − u(x − h·v, t − h, s))/(2h) in fp64, through the ordinary forward (fused GroupNorm).
    h = 3e-7: the time features turn at up to 1000 rad per unit t, so the truncation error h²·f'''/6 is about
    1e-8 of the derivative here (measured: the error falls 100× per 10× smaller h down to 1e-6), the rounding
    error ~1e-16·|u|/h far below. fp32 (as training runs it) against the same: measured 6e-5 of max |du/dt|."""
    torch.manual_seed(0)
    model = UNet(MICRO)
    _randomise(model, 0)
    g = torch.Generator().manual_seed(3)
    b = 5
    x, v = torch.randn(b, 1, 28, 28, generator=g), torch.randn(b, 1, 28, 28, generator=g)
    t = torch.rand(b, generator=g) * 0.8
    s = t + torch.rand(b, generator=g) * (1 - t)
    y = torch.tensor([0, 4, 7, 9, NO_LABEL])
    m64 = UNet(MICRO).double()
    m64.load_state_dict(model.state_dict())
    x64, v64, t64, s64 = x.double(), v.double(), t.double(), s.double()
    h = 3e-7
    with torch.no_grad():
        fd = (m64(x64 + h * v64, t64 + h, y, s64) - m64(x64 - h * v64, t64 - h, y, s64)) / (2 * h)
    scale = float(fd.abs().max())
    assert scale > 1.0  # a derivative worth comparing
    _, dudt64 = meanflow_target(m64, x64, t64, s64, y, v64)
    err = float((dudt64 - fd).abs().max())
    assert err <= 1e-7 * scale, f"fp64 JVP vs finite difference: max |Δ| {err:.3g}, max |du/dt| {scale:.3g}"
    _, dudt32 = meanflow_target(model, x, t, s, y, v)
    assert dudt32.dtype == torch.float32
    err = float((dudt32.double() - fd).abs().max())
    assert err <= 3e-4 * scale, f"fp32 JVP vs finite difference: max |Δ| {err:.3g}, max |du/dt| {scale:.3g}"


def test_jvp_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = UNet(MICRO)
    _randomise(model, 1)
    x, v, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.rand(3) * 0.5
    s, y = t + 0.3, torch.tensor([1, 2, NO_LABEL])
    want, _ = meanflow_target(model, x, t, s, y, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = meanflow_target(model, x, t, s, y, v)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# -- the train step ---------------------------------------------------------------------------------------


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = UNet(MICRO)
    _randomise(model, seed)
    return model, make_optimizer(model.parameters(), 1e-3, 0.0), EMA(model, 0.999, 10)


def _batches(n: int, b: int = 16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        z, y = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 11, (b,), generator=g)
        t, s = fm.sample_time_pair(b, 0.4, 1.0, 0.5, g, "cpu")
        out.append(MeanFlowBatch(z, y, t, s, torch.randn(b, 1, 28, 28, generator=g)))
    return out


MEANFLOW = MeanFlow(None, guidance=2.0, adaptive_p=1.0).loss


def DISTILL(model, batch: PairBatch, ctx):  # noqa: N802 - a loss like MEANFLOW
    """meanflow-distill's loss (MeanFlowDistill.loss, whose objective needs a teacher checkpoint) through the same
    step: the batch's z read as a state x_t, eps as the target average velocity."""
    return fm.average_velocity_loss(model, *batch, ctx, adaptive_p=1.0)


LRS = (1e-3, 2e-3, 3e-3)


def _run(mode: str, backend: str = "inductor", loss=MEANFLOW):
    model, opt, ema = _parts()
    step = TrainStep(model, opt, ema, mode=mode, backend=backend, loss=loss)
    batches = [b if loss is MEANFLOW else PairBatch(b.z, b.y, b.t, b.s, b.eps) for b in _batches(3)]
    losses = torch.stack([step(b, lr) for b, lr in zip(batches, LRS)])
    return step, model, ema, losses


# aot_eager: Dynamo and AOTAutograd trace the whole step (the JVP included) as inductor would, without its C++
# code generation (seconds instead of 1.5 min cold on 2 cores). Inductor itself: FASTFLOW_TEST_INDUCTOR=1 (it ran
# here: one graph, weights within 1.1e-6 of eager after 3 steps).
BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("FASTFLOW_TEST_INDUCTOR") == "1" else [])


@pytest.mark.parametrize("loss", [MEANFLOW, DISTILL], ids=["meanflow", "distill"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_meanflow_step_matches_eager(backend, loss):
    """The one step, with the JVP, guidance and adaptive weights (or distillation's loss), compiled as one graph
    without breaks; within test_step.py's compiled-vs-eager bounds (first loss rtol 1e-5; every weight within 2% of
    Σlr)."""
    _, m_ref, ema_ref, loss_ref = _run("eager", loss=loss)
    torch._dynamo.reset()
    counters.clear()
    step, model, ema, losses = _run("compile", backend, loss)
    assert step.mode == "compile"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    torch.testing.assert_close(losses[0], loss_ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses, loss_ref, rtol=1e-3, atol=0)
    budget = sum(LRS)
    for name, got, want in (("weights", model.parameters(), m_ref.parameters()), ("EMA", ema.params, ema_ref.params)):
        d = torch.cat([(a.detach() - b.detach()).abs().flatten() for a, b in zip(got, want)])
        assert float(d.max()) <= 0.02 * budget and float(d.mean()) <= 1e-3 * budget, (name, float(d.max()))
    assert float(loss_ref[0]) > 0.1 and bool(torch.isfinite(loss_ref).all())


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graph_meanflow_step_matches_eager(amp):
    """The compiled step replayed as a CUDA graph (the CUDA default), JVP included, against eager fp32; bounds as
    test_step.py's CUDA-graph test. Not run here: no GPU was lent (bench/gpu_check.sh's stage 2 runs it)."""
    from fastflow.device import autocast

    dev = torch.device("cuda")
    batches = [tuple(x.to(dev) for x in b) for b in _batches(3)]

    def build():
        torch.manual_seed(0)
        model = UNet(TINY)
        _randomise(model, 0)
        model.to(dev)
        return model, make_optimizer(model.parameters(), 1e-3, 0.0), EMA(model, 0.999, 10)

    m_ref, opt_ref, ema_ref = build()
    ref = TrainStep(m_ref, opt_ref, ema_ref, autocast(dev, None), loss=MEANFLOW)
    model, opt, ema = build()
    step = TrainStep(model, opt, ema, autocast(dev, amp), mode="cudagraphs", loss=MEANFLOW)
    for b, lr in zip(batches, LRS):
        loss_ref = ref(MeanFlowBatch(*b), lr)
        loss = step(MeanFlowBatch(*b), lr)
    assert step.mode == "cudagraphs"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4 if amp is None else 2e-2, atol=0)
    max_share, mean_share = (0.02, 1e-3) if amp is None else (2.05, 0.1)
    budget = sum(LRS)
    for name, got, want in (("weights", model.parameters(), m_ref.parameters()), ("EMA", ema.params, ema_ref.params)):
        d = torch.cat([(a.detach() - b.detach()).abs().flatten() for a, b in zip(got, want)])
        assert float(d.max()) <= max_share * budget and float(d.mean()) <= mean_share * budget, (name, float(d.max()))


def test_step_refuses_another_objectives_batch():
    """A batch is its objective's named tuple: MeanFlow's step given flow matching's batch (no s) fails before
    any update, and a flow-matching U-Net refuses MeanFlow's s."""
    model, opt, ema = _parts()
    b = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError):
        TrainStep(model, opt, ema, loss=MEANFLOW)(FlowBatch(b.z, b.y, b.t, b.eps), 1e-3)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    flow = UNet(ModelConfig(channels=(4,), emb_dim=8, groups=1))
    with pytest.raises(ValueError, match="no second time input"):
        TrainStep(flow, make_optimizer(flow.parameters(), 1e-3, 0.0), None, loss=MEANFLOW)(b, 1e-3)


# -- settings, the trainer, resume, --init-from -------------------------------------------------------------


def test_objective_sets_the_unet_and_checks():
    mcfg, tcfg = resolve_configs("tiny", "cpu", train={"objective": "meanflow"})
    assert mcfg.mean_flow and tcfg.objective == "meanflow"
    assert not resolve_configs("tiny", "cpu")[0].mean_flow
    with pytest.raises(UserError, match="needs a U-Net with the mean-flow gap input"):
        resolve_configs("tiny", "cpu", model={"mean_flow": False}, train={"objective": "meanflow"})
    with pytest.raises(UserError, match="--init-from .* needs --objective meanflow or meanflow-distill"):
        resolve_configs("tiny", "cpu", train={"init_from": "model"})
    with pytest.raises(UserError, match="--mf-equal-share must be in"):
        resolve_configs("tiny", "cpu", train={"objective": "meanflow", "mf_equal_share": 1.5})


def test_time_pairs():
    g = torch.Generator().manual_seed(0)
    t, s = fm.sample_time_pair(20000, 0.4, 1.0, 0.75, g, "cpu")
    assert bool((t <= s).all()) and bool((t > 0).all()) and bool((s < 1).all())
    equal = float((t == s).float().mean())
    assert abs(equal - 0.75) < 0.02, equal
    # the larger of two N(0, 1) draws has median Φ⁻¹(√½) = 0.545, the smaller −0.545: with mean 0.4, s has median
    # sigmoid(0.945) = 0.720 and t sigmoid(−0.145) = 0.464 (a mean of −0.4, the paper's in its own time
    # direction, would give 0.536 and 0.280)
    apart = t != s
    assert abs(float(s[apart].median()) - 0.720) < 0.015 and abs(float(t[apart].median()) - 0.464) < 0.015


def _cfg(tmp_path, mnist_root, name: str, **kw) -> TrainConfig:
    base = {**PRESETS["tiny"][1], "log_every": 2, "num_epochs": 1}
    return TrainConfig(
        **{**base, **kw}, preset="tiny", subset=64, amp="none", sample_steps=1, objective="meanflow",
        mf_guidance=2.0, data_root=str(mnist_root), model_dir=str(tmp_path / name), result_dir=str(tmp_path / f"{name}-r"),
    )  # fmt: skip


def test_resume_of_a_meanflow_run_is_bit_identical(mnist_root, tmp_path):
    """4 steps in one go against 2 steps, then --resume to 4: the same weights, EMA and optimizer state, bit for
    bit (t, s, ε and the dropped labels come from the checkpointed generator)."""
    cpu = torch.device("cpu")
    ref = Trainer(TINY, _cfg(tmp_path, mnist_root, "ref", max_steps=4), cpu)
    ref.fit()
    Trainer(TINY, _cfg(tmp_path, mnist_root, "run", max_steps=2), cpu).fit()
    again = Trainer(TINY, _cfg(tmp_path, mnist_root, "run", max_steps=4, resume=True), cpu)
    assert again.resume() and again.step == 2
    again.fit()
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "run")
    assert a.step == b.step == 4 and a.objective == b.objective == "meanflow" and b.model_cfg.mean_flow
    for name, wa, wb in (("weights", a.weights, b.weights), ("EMA", a.ema_weights, b.ema_weights)):
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{name}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    sa, sb = a.state["optimizer"]["state"], b.state["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert torch.equal(a.state["generator"], b.state["generator"])
    ha, hb = ([row[:4] for row in st["history"]] for st in (a.state, b.state))  # step, epoch, loss, lr; not img/s
    assert ha == hb and len(ha) == 2


def test_init_from_a_flow_checkpoint_starts_at_its_field(mnist_root, tmp_path):
    """A fresh run (step 0, empty optimizer) whose model and EMA hold the flow checkpoint's EMA weights and whose
    field, before any step, is that checkpoint's v(x, t) for every s."""
    flow_cfg = ModelConfig(**PRESETS["tiny"][0])
    torch.manual_seed(5)
    raw, ema = UNet(flow_cfg), UNet(flow_cfg)
    _randomise(ema, 6)
    save_checkpoint(tmp_path / "flow", raw, flow_cfg, None, ema, None, 123)
    cfg = _cfg(tmp_path, mnist_root, "mf", max_steps=1, init_from=str(tmp_path / "flow"))
    ck, mcfg = init_checkpoint(cfg.init_from)
    assert mcfg == TINY
    trainer = Trainer(mcfg, cfg, torch.device("cpu"))
    which = trainer.init_from(ck)
    assert which.startswith("EMA weights") and "step 123" in which and "objective flow" in which
    x, y, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, NO_LABEL]), torch.tensor([0.1, 0.5, 0.8])
    with torch.no_grad():
        want = ema.eval()(x, t, y)
        for net in (trainer.model.eval(), trainer.ema.shadow):
            for s in (None, t, torch.ones(3)):
                assert torch.equal(net(x, t, y, s), want)
    assert trainer.step == 0 and not trainer.opt.state_dict()["state"].get(0, {}).get("step", 0)
    trainer.model.train()
    trainer.fit()
    assert load_checkpoint(tmp_path / "mf").model_cfg == TINY


# -- sampling -----------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """u(x, t, y, s) = x·(s − t) + y/10, recording (t, s) of each call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def forward(self, x, t, y, s=None):
        assert s is not None, "the meanflow solver passes s"
        self.calls.append((float(t[0]), float(s[0])))
        col = (-1, 1, 1, 1)
        return x * (s - t).view(col) + (y.float() / 10).view(col)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_meanflow_sampler_update_and_nfe(guidance):
    labels = torch.tensor([0, 3, 7])
    model = Recorder()
    spec = SamplerSpec("meanflow", 4, guidance)
    images, nfe = sample(model, labels, spec, generator=torch.Generator().manual_seed(0))
    cost = 1 if guidance == 1.0 else 2
    assert nfe == 4 * cost == spec.nfe and len(model.calls) == 4
    assert model.calls == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    col = (-1, 1, 1, 1)
    for t, s in model.calls:  # x + h·(u_unc + w·(u_c − u_unc)), u_unc with label 10
        uc = x * (s - t) + (labels.float() / 10).view(col)
        uu = x * (s - t) + 1.0
        x = x + (s - t) * (uu + guidance * (uc - uu))
    torch.testing.assert_close(images, x.clamp(-1, 1).add(1).mul(0.5), rtol=0, atol=1e-6)
    assert SamplerSpec.for_nfe(7, "meanflow", guidance).steps == 7 // cost


def test_meanflow_solver_on_a_flow_unet_is_refused():
    with pytest.raises(ValueError, match="no second time input"):
        sample(UNet(ModelConfig(**PRESETS["tiny"][0])), torch.arange(2), SamplerSpec("meanflow", 1))


def test_compiled_meanflow_sampler_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = UNet(TINY).eval()
    _randomise(model, 3)
    labels = torch.tensor([0, 3, 7, 9, 10])
    spec = SamplerSpec("meanflow", 2, 2.0)
    want, nfe_want = sample(model, labels, spec, generator=torch.Generator().manual_seed(5))
    sampler = CompiledSampler(model, backend="aot_eager")
    got, nfe = sampler(labels, spec, generator=torch.Generator().manual_seed(5))
    assert nfe == nfe_want == 4
    assert float((got - want).abs().max()) <= 1e-5 and float(want.std()) > 0.01
    torch._dynamo.reset()


# -- the command lines --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mf_checkpoint(tmp_path_factory):
    """An untrained mean-flow "tiny" checkpoint (random weights) recorded as --objective meanflow."""
    d = tmp_path_factory.mktemp("mf") / "model"
    torch.manual_seed(0)
    model = UNet(TINY)
    _randomise(model, 0)
    _, tcfg = resolve_configs("tiny", "cpu", train={"objective": "meanflow"})
    save_checkpoint(d, model, TINY, tcfg, None, None, 7)
    return d


def test_sample_and_evaluate_with_meanflow(mf_checkpoint, mnist_root, tmp_path, capsys, stand_in_classifier):
    import fastflow.evaluate as ev
    import fastflow.sample as sm

    assert load_checkpoint(mf_checkpoint).objective == "meanflow"
    out = tmp_path / "g.png"
    common = ["--checkpoint", str(mf_checkpoint), "--device", "cpu"]
    assert sm.main([*common, "--solver", "meanflow", "--steps", "3", "--per-digit", "1", "--out", str(out)]) == 0
    assert "(meanflow, 3 steps, 3 NFE" in capsys.readouterr().out and out.exists()
    plan = ["--solvers", "euler,meanflow", "--nfe", "1,4", "--guidance", "1,2", "--guidance-interval", "none"]
    assert ev.main([*common, *plan, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    planned = [ln.split() for ln in lines if ln.startswith("meanflow")]
    assert [(p[2], p[3], p[5]) for p in planned] == [("w=1", "1", "1"), ("w=1", "4", "4"), ("w=2", "2", "4")], lines
    cache = stand_in_classifier
    report = tmp_path / "q.json"
    args = ["--solvers", "meanflow,heun", "--steps", "1,2", "--num-samples", "10", "--out", str(report)]
    assert ev.main([*common, *args, "--data-root", str(mnist_root), "--classifier", str(cache)]) == 0
    rows = json.loads(report.read_text())["results"]
    assert [(r["solver"], r["steps"], r["nfe"]) for r in rows] == [
        ("meanflow", 1, 1), ("meanflow", 2, 2), ("heun", 1, 2), ("heun", 2, 4)
    ]  # fmt: skip
