"""torch.compile and CUDA-graph wrappers for the sampler; inductor settings per device.

The train step compiles itself: :mod:`fastflow.step`.

Sampler (:class:`CompiledSampler`): one solver step (network + update) is compiled with time as 0-d tensors (one
graph for every step of every grid), with static shapes (``dynamic=False``); on CUDA with ``cuda_graphs`` the
whole fixed-step loop for a (batch, steps) pair is captured once as one CUDA graph and replayed. The ODE state
stays fp32. Large requests run in chunks of one size (the last one padded), so one graph serves them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .solvers import GuidedField, SamplerSpec, chunks, initial_noise, integrate, sample, to_unit

__all__ = [
    "inductor_options",
    "CompiledSampler",
    "make_sampler",
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
    """Fixed-step sampling with a compiled solver step and, on CUDA, one CUDA graph per (batch, steps, grid).

    ``sampler(labels, spec, generator=...)`` draws as :func:`fastflow.solvers.sample` does, with the same noise,
    time grid, stage plan and update, so for the same generator the two agree up to the compiler's floating-point
    reassociation (the ODE state is fp32 in both). One sampler serves the specs of one
    :attr:`~fastflow.solvers.SamplerSpec.family` (solver, guidance, interval), any steps and grid: build one per
    family and keep it, it holds the compiled step and the captured graphs.

    Args:
        model: v_θ(x, t, y). Compiled and captured code reads its weights in place (in-place updates are seen,
            replaced tensors are not), except with ``freeze``.
        ctx: autocast context for the network.
        cuda_graphs: capture the whole loop as one CUDA graph per (batch, steps, grid) (CUDA only; ignored
            elsewhere).
        freeze: inductor ``freezing`` (weights folded in as constants, mkldnn weight prepacking on CPU). Only for
            weights that never change after the first call (a loaded checkpoint), never for a model in training.
        batch_size: integrate at most this many images at a time (None: each call in one batch). The chunks
            have one size, the last one padded, so the static graph is compiled (and captured) once.
        backend: the torch.compile backend; tests use ``"aot_eager"`` (no code generation: seconds, not minutes).

    With a guidance interval, whether each stage is guided is decided on the host from the time grid (the spec's
    plan) and passed to the step as a constant: one compiled variant per pattern of the step's stages (Euler: two,
    guided and not; a multi-stage step that straddles a bound adds one), each compiled at its first use.
    """

    def __init__(
        self,
        model: Callable,
        *,
        ctx=None,
        cuda_graphs: bool = True,
        freeze: bool = False,
        batch_size: int | None = None,
        backend: str = "inductor",
    ):
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.model = model
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        self.cuda_graphs, self.batch_size, self.backend, self._freeze = cuda_graphs, batch_size, backend, freeze
        self.family: tuple | None = None  # the spec family this sampler serves, fixed by its first call
        self._step: Callable | None = None  # compiled at the first call, when the device is known
        self._graphs: dict[tuple, tuple] = {}

    def _step_fn(self, spec: SamplerSpec) -> Callable:
        def step(x: torch.Tensor, labels: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, inside: tuple, prev=None):
            """x [B, ...] fp32, advanced in place from time t0 to t1 (0-d tensors); ``inside``: per stage,
            whether it lies in the guidance interval (a Python constant: one graph per pattern). ``prev``: what
            a multistep solver carries from the step before (ab2: its derivative and step size; None at the first
            step, a graph of its own). Returns (x, what to pass as ``prev`` to the next step)."""
            field = GuidedField(self.model, labels, spec.guidance, self.ctx, spec.interval)
            memory = [] if prev is None else [prev]
            x = integrate(field, x, torch.stack((t0, t1)), spec.solver, [inside], memory=memory)
            return x, (memory[0] if memory else None)

        return step

    def _stepper(self, spec: SamplerSpec, device: torch.device) -> Callable:
        if self.family is None:
            self.family = spec.family
        elif spec.family != self.family:
            raise ValueError(f"this sampler serves {self.family} (solver, guidance, interval), not {spec.family}")
        if self._step is None:
            kw = {}
            if self.backend == "inductor":
                kw["options"] = inductor_options(device, **({"freezing": True} if self._freeze else {}))
            # dynamic=False: a second batch size compiles another static graph, not a dynamic one for every size
            self._step = torch.compile(self._step_fn(spec), fullgraph=True, dynamic=False, backend=self.backend, **kw)
        return self._step

    def _loop(self, x: torch.Tensor, labels: torch.Tensor, spec: SamplerSpec, ts: torch.Tensor) -> torch.Tensor:
        step, prev = self._stepper(spec, x.device), None
        for i in range(len(ts) - 1):
            x, prev = step(x, labels, ts[i], ts[i + 1], spec.plan[i], prev)
        return x

    def _graph(self, batch: int, spec: SamplerSpec, shape: tuple[int, ...], device: torch.device):
        key = (batch, spec.steps, spec.grid, shape, device)
        if key not in self._graphs:
            ts = spec.times(device)
            x = torch.zeros((batch, *shape), device=device, dtype=torch.float32)
            lab = torch.zeros(batch, device=device, dtype=torch.long)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: compile and autotune outside the capture
                for _ in range(2):
                    self._loop(torch.zeros_like(x), lab, spec, ts)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._loop(x, lab, spec, ts)
            self._graphs[key] = (graph, x, lab, out)
        return self._graphs[key]

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor,
        spec: SamplerSpec,
        *,
        generator: torch.Generator | None = None,
        shape: tuple[int, ...] = (1, 28, 28),
    ) -> tuple[torch.Tensor, int]:
        """Draw ``len(labels)`` images: ``(images [B, 1, 28, 28] fp32 in [0, 1], NFE per image)``.

        The whole initial noise is drawn first (as :func:`fastflow.solvers.sample` draws it), then integrated
        chunk by chunk."""
        device, shape = labels.device, tuple(shape)
        x = initial_noise(labels, shape, generator)  # [N, ...]
        parts = chunks(len(labels), self.batch_size)
        size = parts[0][1] - parts[0][0]  # the first chunk is the largest: every chunk runs at this size
        graphs = self.cuda_graphs and device.type == "cuda"
        ts = None if graphs else spec.times(device)
        for a, b in parts:
            xc, lc = x[a:b], labels[a:b]
            if b - a < size:  # pad to the one compiled batch size; padded rows are dropped below
                xc = torch.cat([xc, xc.new_zeros((size - (b - a), *shape))])
                lc = torch.cat([lc, lc.new_zeros(size - (b - a))])
            if graphs:
                graph, static_x, static_labels, out = self._graph(size, spec, shape, device)
                static_x.copy_(xc)
                static_labels.copy_(lc)
                graph.replay()
                x[a:b] = out[: b - a]  # copied out: the graph owns `out`, the next replay overwrites it
            else:
                x[a:b] = self._loop(xc.clone(), lc, spec, ts)[: b - a]  # a fresh contiguous input, offset 0
        return to_unit(x), spec.nfe


def make_sampler(
    model: Callable, *, compiled: bool, ctx=None, batch_size: int | None = None
) -> Callable[..., tuple[torch.Tensor, int]]:
    """``draw(labels, spec, generator=...) -> (images, nfe)``: eager (:func:`fastflow.solvers.sample`, NFE as
    counted) or a :class:`CompiledSampler` (build it once per spec family and call it as often as needed)."""
    if compiled:
        return CompiledSampler(model, ctx=ctx, batch_size=batch_size)

    def draw(labels: torch.Tensor, spec: SamplerSpec, *, generator: torch.Generator | None = None, **kw):
        return sample(model, labels, spec, generator=generator, ctx=ctx, batch_size=batch_size, **kw)

    return draw
