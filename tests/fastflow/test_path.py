"""The path and its target field against closed forms; forward Euler against the exact conditional field."""

from __future__ import annotations

import pytest
import torch

import kernels
from fastflow.solvers import integrate, time_grid


def test_path_matches_closed_form_and_the_original_formula():
    z = torch.rand(6, 1, 28, 28) * 2 - 1
    eps = torch.randn_like(z)
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
    with kernels.use_backend("reference"):
        x, u = kernels.flow_path(z, eps, t)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x, tb * z + (1 - tb) * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(u, z - eps, rtol=0, atol=0)
    # the original Rust project's Gaussian-path field, (1 + t/(1−t))·z − x/(1−t), for every t < 1
    tt = t.double().view(-1, 1, 1, 1)
    original = (1 + tt / (1 - tt)) * z.double() - x.double() / (1 - tt)
    torch.testing.assert_close(u.double(), original, rtol=0, atol=5e-3)  # 1/(1−t) amplifies x's rounding at t=0.999
    torch.testing.assert_close(u[:5].double(), original[:5], rtol=0, atol=1e-5)
    # the ends of the path: pure noise at t=0, the image at t=1
    torch.testing.assert_close(x[0], eps[0])
    with kernels.use_backend("reference"):
        x1, _ = kernels.flow_path(z, eps, torch.ones(6))
    torch.testing.assert_close(x1, z)


def test_loss_is_the_mse_to_the_target():
    z, eps, v = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28, requires_grad=True)
    with kernels.use_backend("reference"):
        loss = kernels.flow_matching_loss(v, z, eps)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(v, z - eps))
    loss.backward()
    torch.testing.assert_close(v.grad, 2 * (v.detach() - (z - eps)) / v.numel())


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 57])
@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
def test_euler_on_the_exact_conditional_field_lands_on_z(steps, grid):
    z = torch.rand(4, 1, 28, 28) * 2 - 1
    x = torch.randn(4, 1, 28, 28)

    def field(x, t):  # (z − x)/(1 − t): Euler never evaluates it at t = 1
        return (z - x) / (1 - t)

    with kernels.use_backend("reference"):
        out = integrate(field, x, time_grid(steps, grid), "euler")
    torch.testing.assert_close(out, z, rtol=0, atol=2e-5)
