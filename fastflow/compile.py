"""torch.compile and CUDA-graph wrappers for the train step and the sampler.

Train step (:class:`CompiledTrainStep`): forward, path and loss through the kernels' ops, the gradients, the
AdamW update and the EMA update are traced as ONE graph (``fullgraph=True``; on CPU the graph ends at the
gradients and torch's fused AdamW does the update, see ``update``). Two things make the one graph possible:

- the gradients come from ``torch.autograd.grad`` traced by Dynamo (``trace_autograd_ops``), so the backward
  is part of the same graph instead of a graph break at ``loss.backward()``;
- the update calls ``torch.optim.adamw.adamw`` (the functional behind ``torch.optim.AdamW``) on the optimizer's
  own state tensors, not ``opt.step()``: ``Optimizer.step`` graph-breaks on purpose (``_use_grad``). The state
  stays in ``opt.state`` in AdamW's layout, so ``opt.state_dict()`` checkpoints and resumes as before, and an
  eager run can resume a compiled one and back.

Under torchrun the model comes wrapped in DistributedDataParallel, whose gradient all-reduce hooks into
``loss.backward()`` and so never sees ``torch.autograd.grad``. The step therefore runs the unwrapped network and
averages the gradients itself, as one flat bucket: inside the graph through the traceable functional collective
(``update="graph"``, the CUDA path, also under CUDA graphs) or with ``torch.distributed.all_reduce`` right after
the compiled gradients (``update="eager"``, the CPU path). Parameters start equal on every rank (DDP broadcasts
rank 0's at wrap time), so equal averaged gradients keep them equal.

The learning rate and the EMA weight are 0-d tensors written before each call, so a schedule never recompiles.
Randomness (t, ε, dropped labels) is drawn by the caller from its checkpointed generator, outside the graph, so
a compiled run consumes exactly the random numbers an eager one does. Nothing in the step reads a value back to
the host.

Sampler (:class:`CompiledSampler`): one solver step (network + update) is compiled with time as 0-d tensors (one
graph for every step of every grid); on CUDA with ``cuda_graphs`` the whole fixed-step loop for a (batch, steps)
pair is captured once as one CUDA graph and replayed. The ODE state stays fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from . import path as fm
from .ema import EMA, ema_decay_at
from .errors import UserError
from .solvers import STAGES, GuidedField, initial_noise, integrate, nfe_per_step, time_grid, to_unit

__all__ = [
    "inductor_options",
    "make_optimizer",
    "train_step_for",
    "init_adamw_state",
    "CompiledTrainStep",
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


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device, compiled: bool) -> torch.optim.AdamW:
    """AdamW for the eager or the compiled step.

    Compiled on CUDA: foreach and ``capturable`` (the update runs inside the captured graph; the step counters
    live on the GPU, and a loaded state_dict is placed the same way). Everywhere else: torch's fused kernel
    (on the 2-core CPU here 2.4 ms per step for 2.27 M parameters, foreach 8.4 ms).
    """
    if compiled and device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def init_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's lazily-made state (step, exp_avg, exp_avg_sq) for every parameter, as its first ``step``
    would, so that the compiled step can use the tensors before any eager step has run."""
    for group in opt.param_groups:
        on_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _adamw_groups(opt: torch.optim.Optimizer) -> list[dict]:
    """Per param group: the parameter list, its state tensors and the fixed hyper-parameters."""
    out = []
    for group in opt.param_groups:
        if group.get("maximize") or group.get("differentiable"):
            raise ValueError("the compiled step supports plain AdamW (maximize=False, differentiable=False)")
        params = [p for p in group["params"] if p.requires_grad]
        st = [opt.state[p] for p in params]
        out.append(
            dict(
                params=params,
                exp_avgs=[s["exp_avg"] for s in st],
                exp_avg_sqs=[s["exp_avg_sq"] for s in st],
                max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [],
                steps=[s["step"] for s in st],
                beta1=float(group["betas"][0]),
                beta2=float(group["betas"][1]),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                amsgrad=bool(group["amsgrad"]),
            )
        )
    return out


def train_step_for(cfg, model: nn.Module, opt, ema: EMA | None, ctx, device: torch.device) -> CompiledTrainStep | None:
    """The compiled step that ``cfg.compile`` / ``cfg.cuda_graphs`` ask for, or None for the eager one."""
    if cfg.cuda_graphs and not cfg.compile:
        raise UserError("--cuda-graphs needs --compile (the graph is captured from the compiled step)")
    if cfg.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, not {device.type}")
    if not cfg.compile:
        return None
    return CompiledTrainStep(model, opt, ema, ctx, cuda_graphs=cfg.cuda_graphs)


def _average_over_ranks(grads, group, traced: bool) -> list[torch.Tensor]:
    """The mean of each gradient over the ranks of ``group``: one all-reduce of one flat fp32 bucket.

    ``traced``: through ``torch.distributed._functional_collectives`` (functional, so Dynamo puts it in the
    graph); otherwise the usual in-place ``all_reduce`` (gloo has no AVG, hence the sum and the division)."""
    import torch.distributed as tdist

    flat = torch.cat([g.reshape(-1) for g in grads])
    n = tdist.get_world_size(group)
    if traced:
        import torch.distributed._functional_collectives as funcol

        flat = funcol.all_reduce(flat, "sum", group)
    else:
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)
    flat = flat / n
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


class CompiledTrainStep:
    """``step(z, y, t, eps, lr) -> loss``: one AdamW step (and EMA update) with the network compiled.

    Args:
        model: the network v_θ(x, t, y) whose parameters ``opt`` updates, or that network in
            DistributedDataParallel (torchrun): then the step averages the gradients over its process group.
        opt: a ``torch.optim.AdamW`` (see :func:`make_optimizer`); its state stays in ``opt.state``.
        ema: the :class:`~fastflow.ema.EMA` to update after the step, or None. Its decay schedule
            (``ema.updates``) advances on the host, a Python int, as in the eager step.
        ctx: the autocast context for the network (a no-op context for fp32).
        cuda_graphs: on CUDA, replay the step as a CUDA graph (``mode="reduce-overhead"``): every persistent
            tensor is marked static, and the returned loss is cloned out of the graph's memory.
        update: where the AdamW and EMA updates run. ``"graph"``: inside the compiled graph (foreach,
            capturable), so forward, backward and update are one graph, which CUDA graphs need. ``"eager"``: the
            graph ends at the gradients and the update runs as torch's fused AdamW kernel and a foreach lerp.
            (Torch's fused AdamW cannot go inside a graph: it is ``torch.compiler.disable``d.)
            ``None`` picks ``"graph"`` on CUDA and ``"eager"`` elsewhere: on the 2-core CPU the bf16 train step
            is 76-83% mkldnn convolutions (the same kernels compiled or not) and the update under 1% either way
            (fused AdamW: 2.4 ms for 2.27 M parameters), while the in-graph update doubles the compile time
            (a tiny U-Net: 261 s against 131 s) with ~100 more kernels, and on a CPU shared with other jobs each
            of their OpenMP barriers waits for a descheduled thread.

        backend: the torch.compile backend; tests trace the whole graph with ``"aot_eager"`` (Dynamo and
            AOTAutograd, no code generation), which is seconds instead of minutes.

    Call with z, eps [B, 1, 28, 28] fp32, y [B] int64 (labels already dropped), t [B] fp32 and the learning rate
    as a Python float. Returns the loss, 0-d fp32, on the device, not synchronised.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        ema: EMA | None,
        ctx=None,
        *,
        cuda_graphs: bool = False,
        update: str | None = None,
        backend: str = "inductor",
    ):
        # DDP: run the plain network and average the gradients here (see the module docstring).
        self.process_group = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self.process_group = model.process_group
            model = model.module
        self.model, self.opt, self.ema = model, opt, ema
        self.backend = backend
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        device = next(model.parameters()).device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.update = update or ("graph" if device.type == "cuda" else "eager")
        if self.update not in ("graph", "eager"):
            raise ValueError(f"update must be 'graph' or 'eager', got {self.update!r}")
        if self.cuda_graphs and self.update != "graph":
            raise ValueError("CUDA graphs need the update inside the graph (update='graph')")
        self._lr = torch.zeros((), dtype=torch.float32, device=device)  # written before every call
        self._ema_w = torch.zeros((), dtype=torch.float32, device=device)  # 1 − EMA decay of this update
        self._fn: Callable | None = None
        self._groups: list[dict] = []

    def _stale(self) -> bool:
        # Optimizer.load_state_dict (a resume) replaces the state tensors the graph was built on.
        g = self._groups[0]
        p = g["params"][0]
        return self.opt.state.get(p, {}).get("exp_avg") is not g["exp_avgs"][0]

    def _build(self) -> None:
        init_adamw_state(self.opt)
        self._groups = groups = _adamw_groups(self.opt)
        params = [p for g in groups for p in g["params"]]
        model, ctx, ema = self.model, self.ctx, self.ema
        ema_params = ema._ema if ema is not None else []
        ema_buffers = list(zip(ema._ema_buffers, model.buffers())) if ema is not None else []
        if ema is not None and len(ema_params) != len(params):
            raise ValueError("the compiled EMA update needs every model parameter to be trainable")
        from torch.optim.adamw import adamw

        def grads(z, y, t, eps):
            loss = fm.flow_matching_loss(model, z, y, t, eps, ctx)  # 0-d fp32
            return loss.detach(), torch.autograd.grad(loss, params)

        pg = self.process_group

        def step(z, y, t, eps, lr, ema_w):
            loss, gs = grads(z, y, t, eps)
            if pg is not None:
                gs = _average_over_ranks(gs, pg, traced=True)
            with torch.no_grad():
                i = 0
                for g in groups:
                    n = len(g["params"])
                    # capturable: bias corrections and lr stay tensors (no .item(), no recompile per lr)
                    adamw(
                        g["params"],
                        list(gs[i : i + n]),
                        g["exp_avgs"],
                        g["exp_avg_sqs"],
                        g["max_exp_avg_sqs"],
                        g["steps"],
                        foreach=True,
                        capturable=True,
                        amsgrad=g["amsgrad"],
                        beta1=g["beta1"],
                        beta2=g["beta2"],
                        lr=lr,
                        weight_decay=g["weight_decay"],
                        eps=g["eps"],
                        maximize=False,
                    )
                    i += n
                for pe, p in zip(ema_params, params):
                    pe.lerp_(p, ema_w)  # θ_ema ← θ_ema + (1 − d)(θ − θ_ema)
                for be, b in ema_buffers:
                    be.copy_(b)
            return loss

        if self.update == "eager":
            self._fn = torch.compile(grads, fullgraph=True, backend=self.backend, options=self._options())
            return
        if self.cuda_graphs:
            statics = [self._lr, self._ema_w, *ema_params, *(be for be, _ in ema_buffers)]
            for g in groups:
                statics += [*g["params"], *g["exp_avgs"], *g["exp_avg_sqs"], *g["max_exp_avg_sqs"], *g["steps"]]
            for s in statics:
                torch._dynamo.mark_static_address(s)
        if self.cuda_graphs:  # CUDA only, where inductor_options adds nothing (mode and options are exclusive)
            self._fn = torch.compile(step, fullgraph=True, backend=self.backend, mode="reduce-overhead")
        else:
            self._fn = torch.compile(step, fullgraph=True, backend=self.backend, options=self._options())

    def _options(self) -> dict | None:
        return inductor_options(self._lr.device) if self.backend == "inductor" else None

    def __call__(self, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, lr: float) -> torch.Tensor:
        if self._fn is None or self._stale():
            self._build()
        if self.update == "eager":
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                loss, gs = self._fn(z, y, t, eps)
            if self.process_group is not None:
                gs = _average_over_ranks(gs, self.process_group, traced=False)
            for p, g in zip((p for grp in self._groups for p in grp["params"]), gs):
                p.grad = g
            for grp in self.opt.param_groups:
                grp["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
            return loss
        self._lr.fill_(lr)  # a device write, no sync
        if self.ema is not None:
            self._ema_w.fill_(1.0 - ema_decay_at(self.ema.updates, self.ema.decay, self.ema.warmup))
            self.ema.updates += 1
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss = self._fn(z, y, t, eps, self._lr, self._ema_w)
        return loss.clone() if self.cuda_graphs else loss


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
