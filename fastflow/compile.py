"""torch.compile and CUDA-graph wrappers for the sampler; inductor settings per device.

The train step compiles itself: :mod:`fastflow.step`.

Sampler (:class:`CompiledSampler`): one solver step (network + update) is compiled with time as 0-d tensors (one
graph for every step of every grid); on CUDA with ``cuda_graphs`` the whole fixed-step loop for a (batch, steps)
pair is captured once as one CUDA graph and replayed. The ODE state stays fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .solvers import STAGES, GuidedField, initial_noise, integrate, nfe_per_step, time_grid, to_unit

__all__ = [
    "inductor_options",
    "CompiledSampler",
    "compiled_sample",
]


def inductor_options(device: torch.device, **more) -> dict | None:
    """Inductor settings per device. On CPU, ``layout_optimization`` off: inductor otherwise turns every
    convolution channels-last ("always ... for better performance" with mkldnn), and on this 2-core EPYC the
    mkldnn bf16 convolutions of the U-Net's 16-64 channels run 1.66x slower channels-last (eager bf16 train step,
    batch 128: 275 images per CPU-second NCHW, 166 channels-last), which made compiling a loss."""
    opts = dict(more)
    if device.type == "cpu":
        opts["layout_optimization"] = False
    return opts or None


class CompiledSampler:
    """Fixed-step sampling with a compiled solver step and, on CUDA, one CUDA graph per (batch, steps).

    The same noise, time grid and update as :func:`fastflow.solvers.sample`, so for the same generator the two
    agree up to the compiler's floating-point reassociation (the ODE state is fp32 in both).

    Args:
        model: v_θ(x, t, y). Compiled and captured code reads its weights in place (in-place updates are seen,
            replaced tensors are not), except with ``freeze``.
        solver, guidance, grid: as in :func:`fastflow.solvers.sample`.
        ctx: autocast context for the network.
        cuda_graphs: capture the whole loop as one CUDA graph per (batch, steps) (CUDA only; ignored elsewhere).
        freeze: inductor ``freezing`` (weights folded in as constants, mkldnn weight prepacking on CPU). Only for
            weights that never change after the first call (a loaded checkpoint), never for a model in training.
    """

    def __init__(
        self,
        model: Callable,
        *,
        solver: str = "euler",
        guidance: float = 1.0,
        grid: str = "uniform",
        ctx=None,
        cuda_graphs: bool = True,
        freeze: bool = False,
    ):
        if solver not in STAGES:
            raise ValueError(f"unknown solver {solver!r}")
        self.model, self.solver, self.guidance, self.grid = model, solver, float(guidance), grid
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}

        def step(x: torch.Tensor, labels: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
            """x [B, ...] fp32, advanced in place from time t0 to t1 (0-d tensors)."""
            field = GuidedField(self.model, labels, self.guidance, self.ctx)
            return integrate(field, x, torch.stack((t0, t1)), self.solver)

        self._step_fn, self._freeze = step, freeze
        self._step: Callable | None = None  # compiled at the first call, when the device is known

    def _stepper(self, device: torch.device) -> Callable:
        if self._step is None:
            opts = inductor_options(device, **({"freezing": True} if self._freeze else {}))
            self._step = torch.compile(self._step_fn, fullgraph=True, options=opts)
        return self._step

    def nfe(self, steps: int) -> int:
        """Network evaluations per image for ``steps`` steps (what GuidedField would count)."""
        return steps * nfe_per_step(self.solver, self.guidance)

    def _loop(self, x: torch.Tensor, labels: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        step = self._stepper(x.device)
        for i in range(len(ts) - 1):
            x = step(x, labels, ts[i], ts[i + 1])
        return x

    def _graph(self, labels: torch.Tensor, steps: int, shape: tuple[int, ...]):
        key = (len(labels), steps, shape, labels.device)
        if key not in self._graphs:
            ts = time_grid(steps, self.grid, labels.device)
            x = torch.zeros((len(labels), *shape), device=labels.device, dtype=torch.float32)
            lab = labels.clone()
            side = torch.cuda.Stream(labels.device)
            side.wait_stream(torch.cuda.current_stream(labels.device))
            with torch.cuda.stream(side):  # warm-up: compile and autotune outside the capture
                for _ in range(2):
                    self._loop(torch.zeros_like(x), lab, ts)
            torch.cuda.current_stream(labels.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._loop(x, lab, ts)
            self._graphs[key] = (graph, x, lab, out)
        return self._graphs[key]

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        shape: tuple[int, ...] = (1, 28, 28),
    ) -> tuple[torch.Tensor, int]:
        """Draw ``len(labels)`` images: ``(images [B, 1, 28, 28] fp32 in [0, 1], NFE per image)``."""
        device = labels.device
        x = initial_noise(labels, shape, generator)
        if self.cuda_graphs and device.type == "cuda":
            graph, static_x, static_labels, out = self._graph(labels, steps, tuple(shape))
            static_x.copy_(x)
            static_labels.copy_(labels)
            graph.replay()
            x = out.clone()  # the graph owns `out`; the next replay overwrites it
        else:
            x = self._loop(x, labels, time_grid(steps, self.grid, device))
        return to_unit(x), self.nfe(steps)


def compiled_sample(
    model: Callable,
    labels: torch.Tensor,
    steps: int,
    *,
    solver: str = "euler",
    guidance: float = 1.0,
    grid: str = "uniform",
    generator: torch.Generator | None = None,
    ctx=None,
    freeze: bool = False,
    _cache: dict = {},  # noqa: B006 - one compiled sampler per (model, settings), kept for repeated calls
) -> tuple[torch.Tensor, int]:
    """Drop-in for :func:`fastflow.solvers.sample` through a cached :class:`CompiledSampler`."""
    key = (id(model), solver, float(guidance), grid, id(ctx) if ctx is not None else None, freeze)
    sampler = _cache.get(key)
    if sampler is None or sampler.model is not model:
        sampler = _cache[key] = CompiledSampler(
            model, solver=solver, guidance=guidance, grid=grid, ctx=ctx, freeze=freeze
        )
    return sampler(labels, steps, generator=generator)
