"""ODE solvers for dx/dt = v_θ(x, t, y) from t = 0 (noise) to t = 1 (data); time grids; guidance; NFE counting.

NFE (network function evaluations) is the honest cost: an Euler step costs 1, midpoint and Heun 2, RK4 4,
and each of those doubles under classifier-free guidance (the conditional and unconditional halves run as one
batched call of twice the batch, which costs as much as two calls).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

import kernels

from .path import NO_LABEL

__all__ = [
    "SOLVERS",
    "GRIDS",
    "STAGES",
    "time_grid",
    "GuidedField",
    "integrate",
    "nfe_per_step",
    "steps_for_nfe",
    "initial_noise",
    "to_unit",
    "sample",
]

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
SOLVERS = tuple(STAGES)
GRIDS = ("uniform", "quadratic")


def time_grid(steps: int, kind: str = "uniform", device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 to 1 (fp32). ``quadratic``: t_i = 1 − (1 − i/n)², steps shrink toward the
    data end (t = 1), where the field of a well-trained model bends the most."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    s = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float32)
    if kind == "uniform":
        return s
    if kind == "quadratic":
        return 1.0 - (1.0 - s) ** 2
    raise ValueError(f"unknown time grid {kind!r}; choose one of {', '.join(GRIDS)}")


class GuidedField:
    """v(x, t) for fixed labels, with classifier-free guidance, counting network evaluations.

    ``guidance`` w: v = v_uncond + w·(v_cond − v_uncond). w = 1 is the plain conditional field (one call),
    w = 0 the unconditional one (one call); any other w runs cond and uncond as one batched call (2 NFE).
    The model may run under ``ctx`` (bf16 autocast); what comes back is fp32.
    """

    def __init__(self, model: Callable, labels: torch.Tensor, guidance: float = 1.0, ctx=None):
        self.model, self.labels, self.w = model, labels, float(guidance)
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        self.nfe = 0
        self.uncond = torch.full_like(labels, NO_LABEL)

    @property
    def guided(self) -> bool:
        return self.w not in (0.0, 1.0)

    @property
    def cost(self) -> int:
        return _guidance_factor(self.w)

    def both(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_cond, v_uncond) from one batched call; x [B, ...] fp32, t 0-d."""
        b = x.shape[0]
        tt = t.expand(2 * b)
        with self.ctx:
            v = self.model(torch.cat([x, x]), tt, torch.cat([self.labels, self.uncond]))
        self.nfe += 2
        return v[:b], v[b:]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guided:
            vc, vu = self.both(x, t)
            vu = vu.float()
            return vu + self.w * (vc.float() - vu)
        y = self.labels if self.w == 1.0 else self.uncond
        with self.ctx:
            v = self.model(x, t.expand(x.shape[0]), y)
        self.nfe += 1
        return v.float()


def integrate(
    field: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: torch.Tensor,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate dx/dt = field(x, t) over ``grid`` (fp32, increasing). ``x`` is updated in place and returned.

    ``field`` takes x [B, ...] and a 0-d time and returns dx/dt (fp32). Forward Euler goes through the fused
    ``kernels.euler_step_`` (or ``guided_euler_step_`` when ``field`` is a guided :class:`GuidedField`).
    """
    if solver not in STAGES:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    for i in range(len(grid) - 1):
        t, h = grid[i], grid[i + 1] - grid[i]  # 0-d tensors: no recompiles, no host sync
        if solver == "euler":
            if isinstance(field, GuidedField) and field.guided:
                vc, vu = field.both(x, t)
                kernels.guided_euler_step_(x, vc, vu, h, field.w)
            else:
                kernels.euler_step_(x, field(x, t), h)
        elif solver == "midpoint":
            k1 = field(x, t)
            k2 = field(x + 0.5 * h * k1, t + 0.5 * h)
            kernels.euler_step_(x, k2, h)
        elif solver == "heun":
            k1 = field(x, t)
            k2 = field(x + h * k1, t + h)
            kernels.euler_step_(x, 0.5 * (k1 + k2), h)
        else:  # rk4
            k1 = field(x, t)
            k2 = field(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = field(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = field(x + h * k3, t + h)
            kernels.euler_step_(x, (k1 + 2 * k2 + 2 * k3 + k4) / 6.0, h)
    return x


def _guidance_factor(guidance: float) -> int:
    """Network evaluations per field evaluation: 2 under guidance (both halves), 1 at w = 0 or 1."""
    return 1 if float(guidance) in (0.0, 1.0) else 2


def nfe_per_step(solver: str, guidance: float = 1.0) -> int:
    """Network evaluations one ``solver`` step costs per image at guidance ``guidance``."""
    return STAGES[solver] * _guidance_factor(guidance)


def steps_for_nfe(nfe: int, solver: str, guidance: float = 1.0) -> int:
    """The number of steps that spends at most ``nfe`` evaluations (0 if even one step costs more)."""
    return nfe // nfe_per_step(solver, guidance)


def initial_noise(labels: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """x at t = 0: standard normal, fp32, one per label, on the labels' device."""
    return torch.randn((len(labels), *shape), generator=generator, device=labels.device, dtype=torch.float32)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """x at t = 1 in [-1, 1] (clamped) -> images in [0, 1], in place."""
    return x.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)


@torch.no_grad()
def sample(
    model: Callable,
    labels: torch.Tensor,
    steps: int,
    *,
    solver: str = "euler",
    guidance: float = 1.0,
    grid: str = "uniform",
    generator: torch.Generator | None = None,
    ctx=None,
    shape: tuple[int, ...] = (1, 28, 28),
) -> tuple[torch.Tensor, int]:
    """Draw ``len(labels)`` images. Returns ``(images, nfe)`` with images [B, 1, 28, 28] fp32 in [0, 1]."""
    x = initial_noise(labels, shape, generator)
    field = GuidedField(model, labels, guidance, ctx)
    integrate(field, x, time_grid(steps, grid, labels.device), solver)
    return to_unit(x), field.nfe
