"""Solvers against closed forms: the order of accuracy on ODEs with known solutions, NFE counting, time grids,
and the exact marginal field of a tiny dataset driving every solver to one of its points."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.solvers import GRIDS, SOLVERS, STAGES, GuidedField, integrate, sample, steps_for_nfe, time_grid

ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
# Step counts (n, 2n) per solver: in the asymptotic range, and with relative errors ≥ 1e-6 at 2n (measured:
# 6e-6 and up), well above the fp32 rounding of the state (the kernels keep x fp32), so rounding can neither
# fake nor hide an order. Observed orders at these pairs, over the problems and grids below: Euler 0.88–1.10,
# midpoint 1.87–2.20, Heun 1.91–2.11, RK4 3.88–4.24.
PAIR = {"euler": (32, 64), "midpoint": (16, 32), "heun": (16, 32), "rk4": (8, 16)}
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
@pytest.mark.parametrize("solver", SOLVERS)
def test_order_of_accuracy(solver, problem, grid):
    f, exact = PROBLEMS[problem]
    n = PAIR[solver][0]
    e1, e2 = _rel_error(f, exact, n, solver, grid), _rel_error(f, exact, 2 * n, solver, grid)
    assert e2 > 1e-6, f"{solver}: error {e2:.2e} at {2 * n} steps is too close to fp32 rounding to measure an order"
    observed = math.log2(e1 / e2)
    assert abs(observed - ORDER[solver]) < BAND, (
        f"{solver} on {problem} ({grid} grid): error {e1:.3e} at {n} steps, {e2:.3e} at {2 * n}: "
        f"observed order {observed:.2f}, expected {ORDER[solver]} ± {BAND}"
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
@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_is_counted_not_assumed(solver, guidance):
    model, b, steps = CountingModel(), 6, 3
    labels = torch.arange(b) % 10
    _, nfe = sample(model, labels, steps, solver=solver, guidance=guidance, shape=(1, 2, 2))
    per_image = model.images / b  # what the network actually saw, per image
    assert nfe == per_image == steps * STAGES[solver] * (1 if guidance in (0.0, 1.0) else 2)
    assert model.calls == steps * STAGES[solver]  # guided halves go in one batched call


def test_steps_for_nfe():
    assert steps_for_nfe(8, "euler") == 8
    assert steps_for_nfe(8, "euler", 2.0) == 4
    assert steps_for_nfe(9, "midpoint") == 4
    assert steps_for_nfe(8, "rk4", 0.0) == 2
    assert steps_for_nfe(4, "rk4", 4.0) == 0  # a guided RK4 step costs 8
    assert steps_for_nfe(16, "rk4", 4.0) == 2


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
@pytest.mark.parametrize("solver", SOLVERS)
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
    imgs, _ = sample(model, torch.arange(4), 2, shape=(1, 5, 5), generator=torch.Generator().manual_seed(0))
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
