"""Classifier-free guidance: w = 0 is the unconditional field, w = 1 the conditional one, other w the
extrapolation from one batched call; the fused guided Euler step; guidance in a limited interval; label dropout
in training."""

from __future__ import annotations

import pytest
import torch

import kernels
from fastflow.config import ModelConfig
from fastflow.path import NO_LABEL, drop_labels
from fastflow.solvers import ODE_SOLVERS, STAGES, GuidedField, integrate, time_grid
from fastflow.unet import UNet


class LabelModel(torch.nn.Module):
    """v = a[y]·x + b[y]·t: the output depends on the label (NO_LABEL included); records every call."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(NO_LABEL + 1, generator=g)
        self.b = torch.randn(NO_LABEL + 1, generator=g)
        self.dtype = dtype
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, t, y):
        assert t.shape == y.shape == (x.shape[0],)
        self.calls.append((x.shape[0], y.clone()))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (self.a[y].view(shape) * x + self.b[y].view(shape) * t.view(shape)).to(self.dtype)


def _setup(b=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 3, 3, generator=g)
    labels = torch.tensor([0, 3, 9, 4, 7][:b])
    return LabelModel(), x, labels, torch.tensor(0.3)


def test_w0_is_unconditional_and_w1_conditional():
    model, x, labels, t = _setup()
    uncond = model(x, t.expand(5), torch.full_like(labels, NO_LABEL))
    cond = model(x, t.expand(5), labels)
    assert not torch.allclose(uncond, cond)  # the toy model does depend on the label
    model.calls.clear()
    f0, f1 = GuidedField(model, labels, 0.0), GuidedField(model, labels, 1.0)
    torch.testing.assert_close(f0(x, t), uncond, atol=0, rtol=0)
    torch.testing.assert_close(f1(x, t), cond, atol=0, rtol=0)
    assert f0.nfe == f1.nfe == 1 and [c[0] for c in model.calls] == [5, 5]  # one plain call each


@pytest.mark.parametrize("w", [-0.5, 0.5, 2.0, 4.0])
def test_other_w_extrapolates_from_one_batched_call(w):
    model, x, labels, t = _setup()
    vu = model(x, t.expand(5), torch.full_like(labels, NO_LABEL))
    vc = model(x, t.expand(5), labels)
    model.calls.clear()
    f = GuidedField(model, labels, w)
    torch.testing.assert_close(f(x, t), vu + w * (vc - vu), atol=1e-6, rtol=1e-6)
    assert f.nfe == 2, "cond and uncond halves cost 2 NFE, batched or not"
    assert len(model.calls) == 1 and model.calls[0][0] == 10
    torch.testing.assert_close(model.calls[0][1], torch.cat([labels, torch.full_like(labels, NO_LABEL)]))


def test_shortcuts_agree_with_the_formula_near_0_and_1():
    """w = 0 and w = 1 skip the batched call; the general formula just next to them gives the same field."""
    model, x, labels, t = _setup()
    for w in (0.0, 1.0):
        near = GuidedField(model, labels, w + 1e-7)
        assert near.guided
        torch.testing.assert_close(GuidedField(model, labels, w)(x, t), near(x, t), atol=1e-5, rtol=0)


def test_output_is_fp32_when_the_network_runs_lower():
    model, x, labels, t = _setup()
    model.dtype = torch.bfloat16
    for w in (0.0, 1.0, 3.0):
        assert GuidedField(model, labels, w)(x, t).dtype == torch.float32


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_euler_matches_the_update_by_hand(w):
    """integrate's Euler goes through kernels.guided_euler_step_ for a guided field; compare with
    x ← x + h·(v_u + w·(v_c − v_u)) written out, and with the unfused path (any callable field)."""
    model, x0, labels, _ = _setup()
    grid = time_grid(4)
    fused = integrate(GuidedField(model, labels, w), x0.clone(), grid, "euler")
    unfused = integrate(lambda x, t: GuidedField(model, labels, w)(x, t), x0.clone(), grid, "euler")
    x = x0.clone()
    u = torch.full_like(labels, NO_LABEL)
    for i in range(4):
        t, h = grid[i], grid[i + 1] - grid[i]
        vc, vu = model(x, t.expand(5), labels), model(x, t.expand(5), u)
        x = x + h * (vu + w * (vc - vu))
    torch.testing.assert_close(fused, x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(unfused, x, atol=1e-6, rtol=1e-6)


def test_guided_euler_uses_the_fused_op(monkeypatch):
    model, x, labels, _ = _setup()
    seen = []
    real = kernels.guided_euler_step_
    monkeypatch.setattr(kernels, "guided_euler_step_", lambda *a, **k: seen.append(1) or real(*a, **k))
    integrate(GuidedField(model, labels, 2.0), x, time_grid(3), "euler")
    assert len(seen) == 3


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_guidance_with_every_solver(solver):
    """Guided sampling under any solver integrates the guided field v_u + w(v_c − v_u)."""
    model, x0, labels, _ = _setup()
    w = 3.0
    u = torch.full_like(labels, NO_LABEL)

    def by_hand(x, t):
        tt = t.expand(len(labels))
        vc, vu = model(x, tt, labels), model(x, tt, u)
        return vu + w * (vc - vu)

    got = integrate(GuidedField(model, labels, w), x0.clone(), time_grid(3, "quadratic"), solver)
    want = integrate(by_hand, x0.clone(), time_grid(3, "quadratic"), solver)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unet_cond_uncond_batched_equals_separate():
    """On the real U-Net (GroupNorm is per sample) the batched cond+uncond call gives what two calls give."""
    torch.manual_seed(0)
    net = UNet(ModelConfig(channels=(8, 16, 16), emb_dim=32, groups=4)).eval()
    for p in net.parameters():  # the output conv starts at zero; give every weight a value
        p.data.normal_(0, 0.2)
    labels = torch.tensor([1, 5, 8])
    x, t = torch.randn(3, 1, 28, 28), torch.tensor(0.6)
    with torch.no_grad():
        vc = net(x, t.expand(3), labels)
        vu = net(x, t.expand(3), torch.full_like(labels, NO_LABEL))
        f = GuidedField(net, labels, 2.0)
        got_c, got_u = f.both(x, t)
    assert (vc - vu).abs().max() > 1e-3  # the label matters
    torch.testing.assert_close(got_c, vc, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_u, vu, atol=1e-5, rtol=1e-4)


def test_label_dropout_is_per_sample():
    y = torch.arange(20000) % 10
    assert torch.equal(drop_labels(y, 0.0, None), y)
    out = drop_labels(y, 0.1, torch.Generator().manual_seed(0))
    dropped = out == NO_LABEL
    assert torch.equal(out[~dropped], y[~dropped]), "kept labels must be unchanged"
    # 20000 Bernoulli(0.1) draws: the share lies in 0.1 ± 0.006 (about 3 standard deviations)
    assert abs(float(dropped.float().mean()) - 0.1) < 0.006
    for d in range(10):  # per sample, not per class or per batch
        assert 0.05 < float(dropped[y == d].float().mean()) < 0.15


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("w", [1.0, 2.0])
def test_bf16_network_output_keeps_an_fp32_state(solver, w):
    """A network that answers in bf16 (autocast) still drives an fp32 state, fused guided Euler included,
    and lands within bf16 rounding of the fp32 run."""
    model, x0, labels, _ = _setup()
    want = integrate(GuidedField(model, labels, w), x0.clone(), time_grid(4), solver)
    model.dtype = torch.bfloat16
    got = integrate(GuidedField(model, labels, w), x0.clone(), time_grid(4), solver)
    assert got.dtype == torch.float32
    # each v carries a bf16 rounding of 2^-8 relative; summed over the steps with h·|v| ≲ |x|
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# -- guidance in a limited interval -----------------------------------------------------------------------

# A 5-step quadratic grid (t = 0, .36, .64, .84, .96, 1) with [0.3, 0.7]: stages in and out for every solver,
# none within rounding of a bound, so the by-hand field below can decide from its own fp32 t.
LO, HI = 0.3, 0.7


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("w", [0.0, 3.0])
def test_interval_guides_exactly_the_stages_inside(solver, w):
    """Guided (w) where the stage time lies in [LO, HI], the plain conditional field elsewhere, per stage."""
    model, x0, labels, _ = _setup()
    u = torch.full_like(labels, NO_LABEL)
    inside = []

    def by_hand(x, t):
        tt = t.expand(len(labels))
        vc, vu = model(x, tt, labels), model(x, tt, u)
        inside.append(LO <= float(t) <= HI)
        return vu + w * (vc - vu) if inside[-1] else vc

    grid = time_grid(5, "quadratic")
    want = integrate(by_hand, x0.clone(), grid, solver)
    assert any(inside) and not all(inside)
    f = GuidedField(model, labels, w, interval=(LO, HI))
    got = integrate(f, x0.clone(), grid, solver)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert f.nfe == sum((2 if w not in (0.0, 1.0) else 1) if i else 1 for i in inside)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_interval_0_1_is_full_guidance_and_an_empty_one_is_none(solver):
    model, x0, labels, _ = _setup()
    grid = time_grid(4)  # t = 0, .25, .5, .75, 1; stages also at .125, .375, ...
    full = GuidedField(model, labels, 2.0)
    want = integrate(full, x0.clone(), grid, solver)
    f = GuidedField(model, labels, 2.0, interval=(0.0, 1.0))
    assert torch.equal(integrate(f, x0.clone(), grid, solver), want) and f.nfe == full.nfe
    plain = GuidedField(model, labels, 1.0)
    want = integrate(plain, x0.clone(), grid, solver)
    f = GuidedField(model, labels, 2.0, interval=(0.9, 0.95))  # no stage of a 4-step grid lies in it
    assert torch.equal(integrate(f, x0.clone(), grid, solver), want) and f.nfe == plain.nfe == 4 * STAGES[solver]


@pytest.mark.parametrize(
    "bad", [(0.5, 0.2), (0.3, 0.3), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 0.5), (0.1,), (0.1, 0.2, 0.3)]
)
def test_malformed_interval_is_refused(bad):
    model, _, labels, _ = _setup()
    with pytest.raises(ValueError, match="interval"):
        GuidedField(model, labels, 2.0, interval=bad)
