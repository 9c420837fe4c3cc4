"""Solvers against closed forms: the order of accuracy on ODEs with known solutions, NFE counting, time grids,
the exact marginal field of a tiny dataset driving every solver to one of its points, and chunked sampling."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.config import PRESETS, ModelConfig
from fastflow.solvers import (
    GRIDS,
    ODE_SOLVERS,
    STAGES,
    GuidedField,
    SamplerSpec,
    chunks,
    integrate,
    sample,
    stage_plan,
    time_grid,
)
from fastflow.unet import UNet

ORDER = {"euler": 1, "ab2": 2, "midpoint": 2, "heun": 2, "rk4": 4}
# Step counts (n, 2n) per solver: in the asymptotic range, and with relative errors ≥ 1e-6 at 2n (measured:
# 6e-6 and up), well above the fp32 rounding of the state (the kernels keep x fp32), so rounding can neither
# fake nor hide an order. Observed orders at these pairs, over the problems and grids below: Euler 0.88–1.10,
# AB2 1.89–2.10 (and 2.92, below), midpoint 1.87–2.20, Heun 1.91–2.11, RK4 3.88–4.24.
PAIR = {"euler": (32, 64), "ab2": (32, 64), "midpoint": (16, 32), "heun": (16, 32), "rk4": (8, 16)}
# AB2 on dx/dt = -4tx over the quadratic grid converges at order 3: the h² term of its error cancels there (the
# same in float64 by hand, 16 to 2048 steps: observed orders 2.87, 2.94, ..., 3.00), so that case expects 3.
EXCEPTIONS = {("ab2", "time-dependent dx/dt = -4tx", "quadratic"): 3}
BAND = 0.25  # |observed − nominal order| < BAND: tells order 4 from 3 and 2 from 1 with room to spare

X0 = torch.tensor([0.5, 0.6, 0.7])  # three independent trajectories in one batch (x² blows up at t = 1/x0)
PROBLEMS = {
    # name: (dx/dt = f(x, t), exact x(1) from x(0) = X0)
    "linear dx/dt = -2x": (lambda x, t: -2.0 * x, lambda x0: x0 * math.exp(-2.0)),
    "nonlinear dx/dt = x^2": (lambda x, t: x * x, lambda x0: x0 / (1.0 - x0)),
    "time-dependent dx/dt = -4tx": (lambda x, t: -4.0 * t * x, lambda x0: x0 * math.exp(-2.0)),
}


def _rel_error(f, exact, n: int, solver: str, grid: str) -> float:
    x = X0.clone()
    integrate(f, x, time_grid(n, grid), solver)
    want = exact(X0.double())
    return float(((x.double() - want).abs() / want.abs()).max())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_order_of_accuracy(solver, problem, grid):
    f, exact = PROBLEMS[problem]
    n = PAIR[solver][0]
    e1, e2 = _rel_error(f, exact, n, solver, grid), _rel_error(f, exact, 2 * n, solver, grid)
    assert e2 > 1e-6, f"{solver}: error {e2:.2e} at {2 * n} steps is too close to fp32 rounding to measure an order"
    observed, want = math.log2(e1 / e2), EXCEPTIONS.get((solver, problem, grid), ORDER[solver])
    assert abs(observed - want) < BAND, (
        f"{solver} on {problem} ({grid} grid): error {e1:.3e} at {n} steps, {e2:.3e} at {2 * n}: "
        f"observed order {observed:.2f}, expected {want} ± {BAND}"
    )


def test_time_grids():
    for kind in GRIDS:
        g = time_grid(7, kind)
        assert g.shape == (8,) and g.dtype == torch.float32
        assert float(g[0]) == 0.0 and float(g[-1]) == 1.0
        assert bool((g[1:] > g[:-1]).all())
    steps = time_grid(8, "quadratic").diff()
    assert bool((steps[1:] < steps[:-1]).all()), "quadratic steps must shrink toward the data end (t = 1)"
    torch.testing.assert_close(time_grid(4, "uniform"), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(time_grid(2, "quadratic"), torch.tensor([0.0, 0.75, 1.0]))
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(ValueError):
        time_grid(4, "cubic")


class CountingModel(torch.nn.Module):
    """A stand-in network that counts the images it is shown; output depends on x, t and y."""

    def __init__(self):
        super().__init__()
        self.images = 0
        self.calls = 0

    def forward(self, x, t, y):
        self.images += x.shape[0]
        self.calls += 1
        return -x + 0.1 * t.view(-1, 1, 1, 1) + 0.01 * y.view(-1, 1, 1, 1).float()


@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_nfe_is_counted_not_assumed(solver, guidance):
    model, b, steps = CountingModel(), 6, 3
    labels = torch.arange(b) % 10
    _, nfe = sample(model, labels, SamplerSpec(solver, steps, guidance), shape=(1, 2, 2))
    per_image = model.images / b  # what the network actually saw, per image
    assert nfe == per_image == steps * STAGES[solver] * (1 if guidance in (0.0, 1.0) else 2)
    assert model.calls == steps * STAGES[solver]  # guided halves go in one batched call


def _steps_for(nfe: int, *args) -> int:
    spec = SamplerSpec.for_nfe(nfe, *args)
    return 0 if spec is None else spec.steps


def test_spec_for_an_nfe_budget():
    assert _steps_for(8, "euler") == 8
    assert _steps_for(8, "euler", 2.0) == 4
    assert _steps_for(9, "midpoint") == 4
    assert _steps_for(8, "rk4", 0.0) == 2
    assert SamplerSpec.for_nfe(4, "rk4", 4.0) is None  # a guided RK4 step costs 8
    assert _steps_for(16, "rk4", 4.0) == 2
    spec = SamplerSpec.for_nfe(10, "midpoint", 2.0, "quadratic", (0.3, 0.7))
    assert (spec.solver, spec.guidance, spec.grid, spec.interval) == ("midpoint", 2.0, "quadratic", (0.3, 0.7))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(solver="rk5"), "unknown solver"),
        (dict(grid="cubic"), "unknown time grid"),
        (dict(steps=0), "steps must be"),
        (dict(interval=(0.7, 0.2)), "need 0 <= LO < HI <= 1"),
    ],
)
def test_spec_refuses_what_cannot_run(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplerSpec(**kw)


def test_spec_plan_and_nfe_are_the_stage_plans():
    spec = SamplerSpec("heun", 5, 2.0, "quadratic", (0.3, 0.7))
    assert spec.plan == stage_plan(time_grid(5, "quadratic"), "heun", (0.3, 0.7))
    assert spec.nfe == sum(2 if inside else 1 for step in spec.plan for inside in step)
    assert spec.with_steps(3).steps == 3 and spec.with_steps(3).family == spec.family


def test_unknown_solver():
    with pytest.raises(ValueError):
        integrate(lambda x, t: x, torch.zeros(2), time_grid(2), "leapfrog")


# -- the exact marginal field of a tiny dataset ------------------------------------------------------------

POINTS = torch.tensor([[1.0, 1.0, -1.0, 0.5], [-1.0, 0.5, 1.0, -1.0], [0.0, -1.0, -0.5, 1.0]])  # [K=3, D=4]
T_END = 1.0 - 1e-3  # the field has a 1/(1 − t); stop a hair before t = 1 (see marginal_field)


def marginal_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact field of the path x_t = t·z + (1 − t)·ε with z uniform over POINTS.

    u(x, t) = Σ_i w_i (z_i − x)/(1 − t), w = softmax_i(−‖x − t z_i‖² / (2(1 − t)²)), the posterior of z_i
    given x_t = x under N(x; t z_i, (1 − t)² I). x [B, D], t 0-d. Only called at t ≤ T_END < 1, so the
    division is finite; at T_END the state is within about 1e-3·‖ε‖ of t·z_i.
    """
    x64, t64, z = x.double(), t.double(), POINTS.double()
    d2 = ((x64[:, None, :] - t64 * z[None]) ** 2).sum(-1)  # [B, K]
    w = torch.softmax(-d2 / (2 * (1 - t64) ** 2), dim=1)  # [B, K]
    return ((w @ z - x64) / (1 - t64)).float()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_exact_marginal_field_lands_on_the_data(solver, grid):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    integrate(marginal_field, x, time_grid(60 // STAGES[solver], grid) * T_END, solver)  # 60 NFE each
    dist = torch.cdist(x, POINTS)  # [B, K]
    nearest, which = dist.min(1)
    assert float(nearest.max()) < 0.02, f"{solver}: a sample ended {float(nearest.max()):.3f} from every point"
    share = torch.bincount(which, minlength=3).float() / len(x)
    # The three points are equally likely under the path; 300 draws put each share within 0.2..0.47 except
    # with probability < 1e-4 (binomial tails). The seed is fixed, so the outcome is deterministic.
    assert bool(((share > 0.2) & (share < 0.47)).all()), f"{solver}: shares {share.tolist()} are far from 1/3 each"


def test_single_point_euler_is_exact():
    """ARCHITECTURE.md's oracle: on the field (z − x)/(1 − t) Euler lands on z after any number of steps."""
    z = torch.tensor([0.3, -0.7, 0.9])
    for n in (1, 2, 5):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(n))
        integrate(lambda x, t: (z - x) / (1 - t), x, time_grid(n), "euler")
        torch.testing.assert_close(x, z.expand(4, 3), atol=1e-6, rtol=0)


def test_sample_output_range_and_shape():
    model = CountingModel()
    imgs, _ = sample(
        model, torch.arange(4), SamplerSpec(steps=2), shape=(1, 5, 5), generator=torch.Generator().manual_seed(0)
    )
    assert imgs.shape == (4, 1, 5, 5) and imgs.dtype == torch.float32
    assert float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0


def test_guided_field_is_the_one_integrate_uses():
    """A GuidedField at w = 1 through integrate equals integrating the plain conditional field."""
    model = CountingModel()
    labels = torch.tensor([3, 7])
    x1 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    x2 = x1.clone()
    integrate(GuidedField(model, labels, 1.0), x1, time_grid(4), "heun")
    integrate(lambda x, t: model(x, t.expand(2), labels), x2, time_grid(4), "heun")
    torch.testing.assert_close(x1, x2, atol=0, rtol=0)


# -- chunked sampling ---------------------------------------------------------------------------------------


def test_chunks_cover_the_request_in_near_equal_parts():
    for n, b in [(1000, 128), (1001, 128), (5, 128), (128, 128), (129, 128), (7, 1), (10, 3)]:
        parts = chunks(n, b)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(p[1] == q[0] for p, q in zip(parts, parts[1:])), "contiguous"
        sizes = [stop - start for start, stop in parts]
        assert max(sizes) <= b and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert len(parts) == -(-n // b)
    assert chunks(1000, 128)[0] == (0, 125)  # 8 chunks of 125, not 7 of 128 and one of 104
    assert chunks(300, None) == [(0, 300)]
    with pytest.raises(ValueError):
        chunks(10, 0)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("guidance,interval", [(1.0, None), (2.5, None), (2.5, (0.3, 0.7))])
def test_chunked_sampling_is_one_batch_exactly(solver, guidance, interval):
    """The whole noise is drawn first and each image's arithmetic does not depend on its neighbours here (an
    elementwise field), so any chunking gives the same bits as one batch, and the same NFE."""
    model, labels = CountingModel(), torch.arange(23) % 10
    spec = SamplerSpec(solver, 4, guidance, "quadratic", interval)
    one, nfe = sample(model, labels, spec, generator=torch.Generator().manual_seed(7), shape=(1, 3, 3))
    for b in (1, 5, 8, 22, 23, 64):
        got, nfe_b = sample(
            model, labels, spec, generator=torch.Generator().manual_seed(7), batch_size=b, shape=(1, 3, 3)
        )
        assert torch.equal(got, one), f"batch_size {b}: max |Δ| {(got - one).abs().max():.3g}"
        assert nfe_b == nfe
    assert float(one.std()) > 0.01


@pytest.mark.slow
def test_chunked_sampling_on_the_unet_matches_one_batch():
    """The cpu preset's U-Net, fp32 eager: chunks of 64 and of 7 against one batch of 150.

    Not bit for bit in general: oneDNN picks its convolution algorithm by the batch size (and thread count).
    Seen here (Sapphire Rapids, torch 2.14): one forward at batch 1 or 13 differs from batch 300 by up to 2.4e-7
    on the same image, while batches 64, 128 and 256 matched exactly; this test's samples at batch 7 differed
    by 1.2e-7 with one thread and not at all with two. The bound, 1e-5, is fifty times that; other noise per
    chunk, or images put back in the wrong place, would differ by ~0.5."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(**PRESETS["cpu"][0])).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere (the output conv starts at zero)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    labels = torch.arange(150) % 10
    spec = SamplerSpec(steps=3, guidance=2.0)
    one, nfe = sample(model, labels, spec, generator=torch.Generator().manual_seed(1))
    assert float(one.std()) > 0.05
    for b in (64, 7):
        got, nfe_b = sample(model, labels, spec, generator=torch.Generator().manual_seed(1), batch_size=b)
        diff = float((got - one).abs().max())
        assert diff <= 1e-5, f"batch_size {b}: max |Δ| {diff:.3g} against one batch"
        assert nfe_b == nfe == 6


# -- guidance in a limited interval: NFE ------------------------------------------------------------------

# t in [0.3, 0.7] on a 5-step quadratic grid (t = 0, .36, .64, .84, .96, 1): some stages in, some out, and for
# every multi-stage solver a step that straddles a bound.
INTERVAL = (0.3, 0.7)


def _by_hand_nfe(steps: int, solver: str, w: float, grid: str, interval) -> int:
    """Stage by stage from the float64 grid: 2 NFE inside the interval (w other than 0, 1), 1 outside."""
    ts = time_grid(steps, grid).double().tolist()
    offsets = {"euler": (0.0,), "ab2": (0.0,), "midpoint": (0.0, 0.5), "heun": (0.0, 1.0), "rk4": (0.0, 0.5, 0.5, 1.0)}[
        solver
    ]
    total = 0
    for a, b in zip(ts, ts[1:]):
        for c in offsets:
            inside = interval is None or interval[0] <= a + c * (b - a) <= interval[1]
            total += 2 if inside and w not in (0.0, 1.0) else 1
    return total


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_interval_nfe_is_counted_exactly(solver):
    model, b, steps, w = CountingModel(), 6, 5, 2.0
    labels = torch.arange(b) % 10
    spec = SamplerSpec(solver, steps, w, "quadratic", INTERVAL)
    _, nfe = sample(model, labels, spec, shape=(1, 2, 2))
    per_image = model.images / b  # what the network actually saw, per image
    want = _by_hand_nfe(steps, solver, w, "quadratic", INTERVAL)
    assert nfe == per_image == want == spec.nfe
    # strictly between never guided and always guided: some stages in, some out
    assert steps * STAGES[solver] < want < 2 * steps * STAGES[solver]
    assert model.calls == steps * STAGES[solver]  # inside: one batched call of both halves; outside: one call
    plan = stage_plan(time_grid(steps, "quadratic"), solver, INTERVAL)
    if STAGES[solver] > 1:
        assert any(len(set(step)) == 2 for step in plan), "the grid should have a step that straddles a bound"


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_interval_nfe_is_counted_on_a_uniform_grid_too(solver):
    model, b, steps, iv = CountingModel(), 3, 7, (0.25, 0.55)  # no stage time on a bound
    _, nfe = sample(model, torch.arange(b), SamplerSpec(solver, steps, 3.0, interval=iv), shape=(1, 2, 2))
    assert nfe == model.images / b == _by_hand_nfe(steps, solver, 3.0, "uniform", iv)


def test_interval_bound_on_a_grid_time_is_inside():
    """A bound written as a grid time (0.3, 0.7 on ten uniform steps) includes that stage: both sides are
    compared in fp32, as the network sees the time."""
    plan = stage_plan(time_grid(10), "euler", (0.3, 0.7))
    assert [s[0] for s in plan] == [False, False, False, True, True, True, True, True, False, False]


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("grid", GRIDS)
def test_spec_for_nfe_with_an_interval_is_the_most_that_fit(solver, grid):
    def cost(m):
        return SamplerSpec(solver, m, 2.0, grid, INTERVAL).nfe

    for budget in range(1, 40):
        k = _steps_for(budget, solver, 2.0, grid, INTERVAL)
        if k:
            assert cost(k) <= budget
        assert all(cost(m) > budget for m in range(k + 1, budget + 1))
    assert _steps_for(40, solver, 2.0, grid, None) == _steps_for(40, solver, 2.0)


@pytest.mark.parametrize("grid", GRIDS)
def test_ab2_is_exact_after_its_euler_start_on_a_linear_in_time_field(grid):
    """dx/dt = a + b·t: the line through two derivatives is the field itself, so every AB2 step after the first
    (an Euler step, short by b·h₀²/2) is exact, on any grid. A wrong variable-step weight breaks this on the
    quadratic grid, whose steps all differ."""
    a, b, n = 0.3, -1.7, 7
    grid_t = time_grid(n, grid)
    h0 = float(grid_t[1] - grid_t[0])
    x = torch.tensor([0.25, -1.0])
    want = x.double() + a + b / 2 - b * h0 * h0 / 2
    integrate(lambda x, t: torch.full_like(x, a) + b * t, x, grid_t, "ab2")
    torch.testing.assert_close(x.double(), want, atol=1e-6, rtol=0)
    euler = torch.tensor([0.25, -1.0])
    integrate(lambda x, t: torch.full_like(x, a) + b * t, euler, grid_t, "euler")
    assert float((euler.double() - want).abs().max()) > 1e-2  # the test tells AB2 from Euler
