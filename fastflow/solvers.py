"""ODE solvers for dx/dt = v_θ(x, t, y) from t = 0 (noise) to t = 1 (data); time grids; guidance; NFE counting.

NFE (network function evaluations) is the honest cost: an Euler or AB2 step costs 1, midpoint and Heun 2, RK4 4,
and each of those doubles under classifier-free guidance (the conditional and unconditional halves run as one
batched call of twice the batch, which costs as much as two calls).

``ab2`` is the second-order Adams–Bashforth method: one evaluation a step, like Euler, and the step's slope
extrapolated linearly from this evaluation and the last one, so second order for the cost of first (the first
step, with nothing before it, is an Euler step). At 6 NFE on the default model it beats midpoint at the same
stage times and the same guided stages (docs/history.md, "Guidance in an interval, and MeanFlow").

``meanflow`` is not an ODE solver: for a model trained with ``--objective meanflow`` (its U-Net takes the later
time s) each step jumps with the learnt average velocity, x_{k+1} = x_k + (t_{k+1} − t_k)·u(x_k, t_k, t_{k+1}):
exact for the exact u at any step count, 1 NFE a step (2 under guidance, which combines u_cond and u_uncond as
it combines v's). The ODE solvers run on such a model too, with its instantaneous field u(x, t, t).

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality"): with ``interval = (lo, hi)`` a stage whose time t lies in [lo, hi] uses the
guided field, any other stage the plain conditional one (w = 1, one call). The choice is made per solver stage,
on the host, from the fp32 time grid (:func:`stage_plan`), before any network call: the eager loop, the
compiled sampler and the NFE count all read the same plan.

A sampling setting (solver, steps, guidance w, time grid, guidance interval) is one frozen :class:`SamplerSpec`,
which knows its time grid, its stage plan and its NFE: the programs, the compiled sampler, the evaluation grid
and the trainer's sample grids all pass one around.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch

import kernels

from .path import NO_LABEL

__all__ = [
    "SOLVERS",
    "ODE_SOLVERS",
    "GRIDS",
    "STAGES",
    "STAGE_OFFSETS",
    "Interval",
    "DEFAULT_INTERVAL",
    "SamplerSpec",
    "time_grid",
    "check_interval",
    "stage_plan",
    "plan_nfe",
    "GuidedField",
    "ab2_slope",
    "integrate",
    "chunks",
    "initial_noise",
    "to_unit",
    "sample",
]

# Where each solver evaluates the field within a step, as fractions of the step: (t + c·h for c in ...). MeanFlow's
# one evaluation is u(x, t, t + h): it starts at t.
STAGE_OFFSETS = {
    "euler": (0.0,),
    "ab2": (0.0,),
    "midpoint": (0.0, 0.5),
    "heun": (0.0, 1.0),
    "rk4": (0.0, 0.5, 0.5, 1.0),
    "meanflow": (0.0,),
}
STAGES = {s: len(c) for s, c in STAGE_OFFSETS.items()}
SOLVERS = tuple(STAGES)
ODE_SOLVERS = tuple(s for s in SOLVERS if s != "meanflow")  # for any field v(x, t); meanflow needs u(x, t, s)
GRIDS = ("uniform", "quadratic")

Interval = tuple[float, float]
Plan = list[tuple[bool, ...]]  # per step, per stage: whether the stage's time lies in the guidance interval

# Guidance only for t in [0.2, 0.7] unless asked otherwise: at 6 NFE on two default-recipe models (two noise seeds
# on one), every w in 1.25-2 with Euler and midpoint gave a lower FID than guiding at every stage, at 98.2-99.9%
# accuracy (docs/results.md, "Guidance in an interval"). At w = 1 it changes nothing.
DEFAULT_INTERVAL: Interval = (0.2, 0.7)


def time_grid(steps: int, kind: str = "uniform", device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 to 1 (fp32). ``quadratic``: t_i = 1 − (1 − i/n)², steps shrink toward the
    data end (t = 1), where the field of a well-trained model bends the most.

    Computed on the CPU and then moved, so that every device integrates over the same fp32 times and the
    host-side :func:`stage_plan` sees exactly the times the network will see."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    if kind == "uniform":
        g = s
    elif kind == "quadratic":
        g = 1.0 - (1.0 - s) ** 2
    else:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {', '.join(GRIDS)}")
    return g if device is None else g.to(device)


def check_interval(interval: Sequence[float] | None) -> Interval | None:
    """``interval`` as a ``(lo, hi)`` pair of floats with 0 ≤ lo < hi ≤ 1, or None (guide at every stage).
    Raises ValueError (one line) for anything else."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"a guidance interval is two times LO,HI, got {len(interval)} values")
    lo, hi = (float(v) for v in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"guidance interval {lo:g},{hi:g}: the times must be finite")
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"guidance interval {lo:g},{hi:g}: need 0 <= LO < HI <= 1 (t = 0 noise, t = 1 data)")
    return lo, hi


def stage_plan(grid: torch.Tensor, solver: str, interval: Interval | None = None) -> Plan:
    """For each step of ``grid`` and each stage of ``solver``: whether the stage's time lies in ``interval``
    (closed, both ends; ``None``: every stage does).

    Stage times are computed as :func:`integrate` computes them (``t + 0.5·h``, ``t + h``, in fp32), and the
    bounds are rounded to fp32 too, so a bound written as a grid time (``0.3``) includes the stage at that time.
    One small device-to-host copy of the grid when ``interval`` is given, none otherwise."""
    if solver not in STAGES:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    n = len(grid) - 1
    if interval is None:
        return [(True,) * STAGES[solver]] * n
    lo, hi = check_interval(interval)
    g = grid.detach().to("cpu", torch.float32)
    t, h = g[:-1], g[1:] - g[:-1]  # [n] each
    cols = []
    for c in STAGE_OFFSETS[solver]:
        s = t if c == 0.0 else t + h if c == 1.0 else t + c * h  # the same fp32 ops as integrate
        cols.append((s >= torch.tensor(lo, dtype=torch.float32)) & (s <= torch.tensor(hi, dtype=torch.float32)))
    return [tuple(row) for row in torch.stack(cols, 1).tolist()]


def _guidance_factor(guidance: float) -> int:
    """Network evaluations per field evaluation: 2 under guidance (both halves), 1 at w = 0 or 1."""
    return 1 if float(guidance) in (0.0, 1.0) else 2


def plan_nfe(plan: Plan, guidance: float) -> int:
    """Network evaluations per image of a sampling run that follows ``plan`` at guidance ``guidance``: a stage
    inside the interval costs what the guided field costs (2, or 1 at w = 0 or 1), one outside costs 1."""
    inside = sum(sum(step) for step in plan)
    total = sum(len(step) for step in plan)
    return inside * _guidance_factor(guidance) + (total - inside)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampling setting: ``steps`` steps of ``solver`` on the ``grid`` time grid, classifier-free guidance
    ``guidance`` (w) at the stages whose time lies in ``interval`` (None: at every stage). Checked when made (a
    ValueError names the bad field); :attr:`plan` and :attr:`nfe` are what the samplers spend, stage by stage."""

    solver: str = "euler"
    steps: int = 10
    guidance: float = 1.0
    grid: str = "uniform"
    interval: Interval | None = None

    def __post_init__(self):
        if self.solver not in STAGES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be an integer > 0, got {self.steps!r}")
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "interval", check_interval(self.interval))

    @classmethod
    def for_nfe(
        cls, nfe: int, solver: str = "euler", guidance: float = 1.0, grid: str = "uniform", interval=None
    ) -> SamplerSpec | None:
        """The spec with the most steps whose exact cost (:attr:`nfe`) is at most ``nfe``; None if even one step
        costs more. Without an interval every step costs the same; with one the cost per step depends on where
        the stages fall, so the step counts from ``nfe // stages`` (every stage unguided) down are tried."""
        top = nfe // STAGES[solver] if interval is not None else nfe // (STAGES[solver] * _guidance_factor(guidance))
        for n in range(top, 0, -1):
            spec = cls(solver, n, guidance, grid, interval)
            if spec.nfe <= nfe:
                return spec
        return None

    def with_steps(self, steps: int) -> SamplerSpec:
        return dataclasses.replace(self, steps=steps)

    def times(self, device=None) -> torch.Tensor:
        """The ``steps + 1`` fp32 times from 0 to 1 (:func:`time_grid`), on ``device``."""
        return time_grid(self.steps, self.grid, device)

    @functools.cached_property
    def plan(self) -> Plan:
        """Per step, per stage: inside the guidance interval (:func:`stage_plan` of :meth:`times`)."""
        return stage_plan(self.times(), self.solver, self.interval)

    @property
    def nfe(self) -> int:
        """Network evaluations per image, as :func:`sample` and the compiled sampler spend them."""
        return plan_nfe(self.plan, self.guidance)

    @property
    def family(self) -> tuple:
        """What a compiled sampler step depends on: specs that differ only in steps and grid share one."""
        return (self.solver, self.guidance, self.interval)


class GuidedField:
    """v(x, t) for fixed labels, with classifier-free guidance, counting network evaluations.

    ``guidance`` w: v = v_uncond + w·(v_cond − v_uncond). w = 1 is the plain conditional field (one call),
    w = 0 the unconditional one (one call); any other w runs cond and uncond as one batched call (2 NFE).
    ``interval`` (lo, hi): guide only at stages whose time lies in [lo, hi]; elsewhere the conditional field
    (see :func:`stage_plan`). The model may run under ``ctx`` (bf16 autocast); what comes back is fp32.
    """

    def __init__(
        self,
        model: Callable,
        labels: torch.Tensor,
        guidance: float = 1.0,
        ctx=None,
        interval: Interval | None = None,
    ):
        self.model, self.labels, self.w = model, labels, float(guidance)
        self.interval = check_interval(interval)
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        self.nfe = 0
        self.uncond = torch.full_like(labels, NO_LABEL)

    @property
    def guided(self) -> bool:
        """Whether a stage inside the interval runs both halves (w other than 0 and 1)."""
        return self.w not in (0.0, 1.0)

    @property
    def cost(self) -> int:
        return _guidance_factor(self.w)

    def weight(self, inside: bool = True) -> float:
        """The w a stage uses: the guidance scale inside the interval, 1 (conditional) outside."""
        return self.w if inside else 1.0

    def plan(self, grid: torch.Tensor, solver: str) -> Plan:
        return stage_plan(grid, solver, self.interval)

    def _net(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        with self.ctx:
            if s is None:  # the ODE solvers: the model's (instantaneous) field; any callable v(x, t, y)
                return self.model(x, t.expand(b), y)
            return self.model(x, t.expand(b), y, s.expand(b))  # MeanFlow: the average velocity over [t, s]

    def both(
        self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_cond, v_uncond) from one batched call; x [B, ...] fp32, t (and MeanFlow's s) 0-d."""
        b = x.shape[0]
        v = self._net(torch.cat([x, x]), t, torch.cat([self.labels, self.uncond]), s)
        self.nfe += 2
        return v[:b], v[b:]

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, inside: bool = True, s: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dx/dt at x [B, ...] fp32 and the 0-d time t (with ``s``: MeanFlow's average velocity over [t, s]);
        ``inside``: whether t lies in the guidance interval."""
        w = self.weight(inside)
        if w not in (0.0, 1.0):
            vc, vu = self.both(x, t, s)
            vu = vu.float()
            return vu + w * (vc.float() - vu)
        v = self._net(x, t, self.labels if w == 1.0 else self.uncond, s)
        self.nfe += 1
        return v.float()


def _at(
    field, x: torch.Tensor, t: torch.Tensor, flags: tuple[bool, ...] | None, k: int, s: torch.Tensor | None = None
) -> torch.Tensor:
    """Stage ``k`` of a step: ``field(x, t)``, told for a GuidedField whether the stage is in its interval (and
    given MeanFlow's later time ``s`` when there is one)."""
    kw = {} if s is None else {"s": s}
    return field(x, t, **kw) if flags is None else field(x, t, flags[k], **kw)


def ab2_slope(v: torch.Tensor, h: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The slope of an Adams–Bashforth 2 step of size ``h``: the line through the last step's derivative and
    this one, ``prev = (v_prev, h_prev)``, integrated over the step, ``(1 + r/2)·v − (r/2)·v_prev`` with
    ``r = h / h_prev`` (variable steps); ``v`` itself (an Euler step) when there is no earlier step."""
    if prev is None:
        return v
    v_prev, h_prev = prev
    half_r = 0.5 * h / h_prev
    return (1.0 + half_r) * v - half_r * v_prev


def integrate(
    field: Callable[..., torch.Tensor],
    x: torch.Tensor,
    grid: torch.Tensor,
    solver: str = "euler",
    plan: Plan | None = None,
    states: list[torch.Tensor] | None = None,
    memory: list | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = field(x, t) over ``grid`` (fp32, increasing). ``x`` is updated in place and returned.
    ``states``: a list to append a copy of x at every grid time to (the start included): the trajectory.
    ``memory``: what a multistep solver (``ab2``) carries from step to step, for a caller that integrates one step
    at a time (the compiled sampler): read at the start (empty: the first step) and left holding the last step's
    ``(derivative, step size)``.

    ``field`` takes x [B, ...] and a 0-d time and returns dx/dt (fp32). A :class:`GuidedField` also takes, per
    stage, whether the stage lies in its guidance interval: from ``plan`` (per step, per stage; the compiled
    sampler passes it for its one step) or else from :func:`stage_plan` of ``grid``. Forward Euler goes through
    the fused ``kernels.euler_step_`` (``guided_euler_step_`` for a stage that runs both guided halves).
    ``meanflow`` calls ``field(x, t, s=t_next)`` (MeanFlow's average velocity over the step) and updates
    x the same way.
    """
    if solver not in STAGES:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    guided_field = isinstance(field, GuidedField)
    if guided_field and plan is None:
        plan = field.plan(grid, solver)
    if states is not None:
        states.append(x.clone())
    prev = memory[-1] if memory else None  # ab2: (derivative, step size) of the step before
    for i in range(len(grid) - 1):
        t, h = grid[i], grid[i + 1] - grid[i]  # 0-d tensors: no recompiles, no host sync
        fl = plan[i] if guided_field else None  # per stage: inside the guidance interval?
        if solver in ("euler", "meanflow"):  # meanflow: x + h·u(x, t, t + h), with the average velocity
            s = grid[i + 1] if solver == "meanflow" else None
            if guided_field and field.weight(fl[0]) not in (0.0, 1.0):
                vc, vu = field.both(x, t, s)
                kernels.guided_euler_step_(x, vc, vu, h, field.w)
            else:
                kernels.euler_step_(x, _at(field, x, t, fl, 0, s), h)
        elif solver == "ab2":
            v = _at(field, x, t, fl, 0)
            kernels.euler_step_(x, ab2_slope(v, h, prev), h)
            prev = (v, h)
        elif solver == "midpoint":
            k1 = _at(field, x, t, fl, 0)
            k2 = _at(field, x + 0.5 * h * k1, t + 0.5 * h, fl, 1)
            kernels.euler_step_(x, k2, h)
        elif solver == "heun":
            k1 = _at(field, x, t, fl, 0)
            k2 = _at(field, x + h * k1, t + h, fl, 1)
            kernels.euler_step_(x, 0.5 * (k1 + k2), h)
        else:  # rk4
            k1 = _at(field, x, t, fl, 0)
            k2 = _at(field, x + 0.5 * h * k1, t + 0.5 * h, fl, 1)
            k3 = _at(field, x + 0.5 * h * k2, t + 0.5 * h, fl, 2)
            k4 = _at(field, x + h * k3, t + h, fl, 3)
            kernels.euler_step_(x, (k1 + 2 * k2 + 2 * k3 + k4) / 6.0, h)
        if states is not None:
            states.append(x.clone())
    if memory is not None and prev is not None:
        memory[:] = [prev]
    return x


def chunks(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that cover ``n`` images in ``ceil(n / batch_size)`` near-equal chunks (the
    first ones one image larger), so that no chunk is a small remainder. ``None``: one chunk."""
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    k = 1 if batch_size is None or n <= batch_size else -(-n // batch_size)
    size, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + size + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


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
    spec: SamplerSpec,
    *,
    generator: torch.Generator | None = None,
    ctx=None,
    shape: tuple[int, ...] = (1, 28, 28),
    batch_size: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Draw ``len(labels)`` images with ``spec``. Returns ``(images, nfe)`` with images [B, 1, 28, 28] fp32 in
    [0, 1] and the network evaluations per image, as counted.

    ``batch_size``: integrate at most this many images at a time (``None``: all at once). The whole initial
    noise is drawn first, so the images do not depend on the chunking (up to the convolutions' choice of
    algorithm per batch size, a few fp32 ulps)."""
    x = initial_noise(labels, shape, generator)  # [N, ...]
    ts = spec.times(labels.device)
    nfe = 0
    for a, b in chunks(len(labels), batch_size):
        field = GuidedField(model, labels[a:b], spec.guidance, ctx, spec.interval)
        integrate(field, x[a:b], ts, spec.solver, spec.plan)  # a view: updated in place
        nfe = field.nfe  # the same count for every chunk
    return to_unit(x), nfe
