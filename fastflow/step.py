"""The train step: one function (loss, gradients, AdamW, EMA) run eager, compiled, or compiled and replayed as a
CUDA graph.

:meth:`TrainStep._step` is the only place in fastflow where gradients are taken. The three modes run that same
function (gpt-fast's habit: compile the very function that runs eagerly), so a fix is made once:

- ``eager``: called as it is. AdamW runs as torch's fused kernel (CPU and CUDA; on the 2-core CPU here 2.4 ms a
  step for 2.27 M parameters, foreach 8.4 ms).
- ``compile``: ``torch.compile(fullgraph=True, dynamic=False)`` of the same function. Forward, backward
  (``torch.autograd.grad`` traced by Dynamo: ``trace_autograd_ops``), the AdamW update and the EMA update are one
  graph. Inside it AdamW is the foreach, ``capturable`` form (torch's fused AdamW is ``torch.compiler.disable``d,
  so it cannot go in a graph); the kernels' ops dispatch to their reference math under compile, which Inductor
  fuses with its neighbours (kernels/__init__.py).
- ``cudagraphs``: ``compile`` with ``mode="reduce-overhead"``: every persistent tensor (weights, AdamW state,
  EMA, the lr and EMA weight) is marked static and the step replays as one CUDA graph; the returned loss is cloned
  out of the graph's memory.

The optimizer is a plain ``torch.optim.AdamW`` used as the container of AdamW's state (``opt.state_dict()`` is
what checkpoints hold); its ``step()`` is never called, so its ``fused``/``foreach``/``capturable`` flags do not
matter: the step passes its own. :func:`place_adamw_state` puts the state where every mode wants it (step
counters as fp32 tensors on the parameter's device), also after ``load_state_dict`` of a checkpoint written by
another mode or device, which would otherwise bring back that run's flags and placement.

Under torchrun the step averages the gradients over the ranks itself, as one flat bucket (DDP's hooks fire in
``loss.backward()`` and never see ``torch.autograd.grad``): with ``torch.distributed.all_reduce`` when eager and
through the traceable functional collective inside a compiled graph. Parameters start equal on every rank
(:func:`fastflow.distributed.broadcast_module`), so equal averaged gradients keep them equal.

The learning rate and the EMA weight are 0-d tensors written before each call, so a schedule never recompiles.
The batch (:mod:`fastflow.objectives`: its images, labels, times and noise) is drawn by the caller from its
checkpointed generator, outside the graph, so every mode consumes exactly the same random numbers. Nothing in the
step reads a value back to the host.

The loss is the objective's (``loss(model, batch, ctx) -> (loss, shown)``, flow matching's by default): MeanFlow's
forward-mode JVP runs inside the same function, so it is compiled (and captured) with the rest of the step.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
from torch import nn

from .ema import EMA
from .errors import UserError
from .objectives import FlowMatching

__all__ = ["MODES", "TrainStep", "make_optimizer", "place_adamw_state", "resolve_mode", "average_over_ranks"]

MODES = ("eager", "compile", "cudagraphs")


def resolve_mode(compile: bool | None, cuda_graphs: bool | None, device: torch.device) -> str:
    """The step mode that ``--compile`` / ``--cuda-graphs`` ask for; None means the device's default: compiled
    and replayed as a CUDA graph on CUDA (a U-Net step at batch 32 is launch-bound eagerly), eager on a CPU
    (measured: compiling does not pay inside a 300 s CPU budget; docs/cpu_recipe.md)."""
    if cuda_graphs and compile is False:
        raise UserError("--cuda-graphs needs --compile (the graph is captured from the compiled step)")
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, not {device.type}")
    on_cuda = device.type == "cuda"
    if compile is None:
        compile = on_cuda or bool(cuda_graphs)
    if not compile:
        return "eager"
    if cuda_graphs is None:
        cuda_graphs = on_cuda
    return "cudagraphs" if cuda_graphs else "compile"


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW whose state the step updates (its own ``step()`` is never called; see the module docstring)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    place_adamw_state(opt)
    return opt


def place_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's lazily made state for every parameter (as its first ``step`` would) and put it where every
    step mode wants it: ``exp_avg``/``exp_avg_sq`` like the parameter, ``step`` a 0-d fp32 tensor on the
    parameter's device (fused and capturable AdamW both read it there). Call after ``load_state_dict``: a loaded
    state keeps its values (a CPU step counter of an eager checkpoint moves to the GPU, and back), and the flags
    of the run that saved it are reset to this run's plain ones."""
    for group in opt.param_groups:
        group.update(foreach=None, fused=None, capturable=False, differentiable=False)
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError("the train step supports plain AdamW (maximize=False, amsgrad=False)")
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] = torch.zeros((), dtype=torch.float32)
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = st[k].to(device=p.device, dtype=p.dtype)


def average_over_ranks(grads: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The mean of each gradient over the ranks of ``group``: one all-reduce of one flat bucket. Inside a compiled
    graph through ``torch.distributed._functional_collectives`` (functional, so Dynamo keeps it in the graph),
    eagerly the usual in-place ``all_reduce`` (gloo has no AVG, hence the sum and the division)."""
    import torch.distributed as tdist

    flat = torch.cat([g.reshape(-1) for g in grads])
    n = tdist.get_world_size(group)
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        flat = funcol.all_reduce(flat, "sum", group)
    else:
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)
    flat = flat / n
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


class TrainStep:
    """``step(batch, lr) -> loss``: one AdamW step (and EMA update) of ``model`` on one batch.

    Args:
        model: the network v_θ(x, t, y); every parameter must be trainable.
        opt: its ``torch.optim.AdamW`` from :func:`make_optimizer` (the state container).
        ema: the :class:`~fastflow.ema.EMA` to update after the step, or None.
        ctx: the autocast context for the network (None: fp32).
        mode: ``eager``, ``compile`` or ``cudagraphs`` (CUDA only); see the module docstring.
        process_group: under torchrun, the group to average the gradients over; None in one process.
        backend: the torch.compile backend (tests use ``aot_eager`` for the multi-process case).
        fallback: if compiling fails, say why in one line and continue eagerly (the CUDA default does this;
            an explicit ``--compile`` raises instead).
        loss: ``loss(model, batch, ctx) -> (loss to differentiate, loss to show)``, an objective's
            :meth:`~fastflow.objectives.Objective.loss`; flow matching's by default.

    Call with the objective's batch (a named tuple of tensors on the model's device, labels already dropped) and
    the learning rate as a Python float. Returns the loss to show, 0-d fp32, on the device, not synchronised (for
    MeanFlow the plain MSE to its target: the adaptive weighting shapes only the gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        ema: EMA | None,
        ctx=None,
        *,
        mode: str = "eager",
        process_group=None,
        backend: str = "inductor",
        fallback: bool = False,
        loss: Callable | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.opt, self.ema = model, opt, ema
        self.ctx = ctx if ctx is not None else contextlib.nullcontext()
        self.process_group, self.backend, self.fallback = process_group, backend, fallback
        self.loss = loss or FlowMatching.loss
        device = next(model.parameters()).device
        if mode == "cudagraphs" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
        self.mode = mode
        self.params = list(model.parameters())
        if not all(p.requires_grad for p in self.params):
            raise ValueError("the train step needs every model parameter to be trainable")
        self._lr = torch.zeros((), dtype=torch.float32, device=device)  # written before every call
        self._ema_w = torch.zeros((), dtype=torch.float32, device=device)  # 1 − EMA decay of this update
        self._fn: Callable | None = None
        self._state_ids: list[int] = []

    # -- the step's math: the one function every mode runs ---------------------------------------------------
    def _step(self, batch: tuple, lr: torch.Tensor, ema_w: torch.Tensor) -> torch.Tensor:
        from torch.optim.adamw import adamw

        loss, shown = self.loss(self.model, batch, self.ctx)  # 0-d fp32 each
        grads = list(torch.autograd.grad(loss, self.params))
        if self.process_group is not None:
            grads = average_over_ranks(grads, self.process_group)
        compiled = torch.compiler.is_compiling()  # decided at trace time: no branch at run time
        with torch.no_grad():
            i = 0
            for g in self._groups:
                n = len(g["params"])
                adamw(
                    g["params"],
                    grads[i : i + n],
                    g["exp_avgs"],
                    g["exp_avg_sqs"],
                    [],
                    g["steps"],
                    foreach=compiled,
                    fused=not compiled,
                    capturable=compiled,
                    amsgrad=False,
                    beta1=g["beta1"],
                    beta2=g["beta2"],
                    lr=lr,
                    weight_decay=g["weight_decay"],
                    eps=g["eps"],
                    maximize=False,
                )
                i += n
            if self.ema is not None:
                EMA.update_(self._ema_params, self.params, ema_w, self._ema_buffers, self._buffers)
        return shown.detach()

    # -- building and calling -------------------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return [t for p in self.params for t in self.opt.state[p].values() if isinstance(t, torch.Tensor)]

    def _stale(self) -> bool:
        # A load_state_dict (a resume) replaces the state tensors a compiled graph was built on.
        return [id(t) for t in self._state_tensors()] != self._state_ids

    def _build(self) -> None:
        place_adamw_state(self.opt)
        self._state_ids = [id(t) for t in self._state_tensors()]
        # Plain lists of the tensors the step reads (no dict lookups keyed by parameters inside the graph).
        self._groups = []
        for g in self.opt.param_groups:
            st = [self.opt.state[p] for p in g["params"]]
            self._groups.append(
                dict(
                    params=list(g["params"]),
                    exp_avgs=[s["exp_avg"] for s in st],
                    exp_avg_sqs=[s["exp_avg_sq"] for s in st],
                    steps=[s["step"] for s in st],
                    beta1=float(g["betas"][0]),
                    beta2=float(g["betas"][1]),
                    eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]),
                )
            )
        if [id(p) for g in self._groups for p in g["params"]] != [id(p) for p in self.params]:
            raise ValueError("the optimizer must hold the model's parameters, in model.parameters() order")
        self._buffers = list(self.model.buffers())
        self._ema_params = self.ema.params if self.ema is not None else []
        self._ema_buffers = self.ema.buffers if self.ema is not None else []
        if self.mode == "eager":
            self._fn = self._step
            return
        if self.mode == "cudagraphs":
            statics = [self._lr, self._ema_w, *self.params, *self._state_tensors()]
            statics += [*self._ema_params, *self._ema_buffers]
            for s in statics:
                torch._dynamo.mark_static_address(s)
            opts = dict(mode="reduce-overhead")  # CUDA only; inductor_options adds nothing there
        else:
            from .compile import inductor_options

            opts = dict(options=inductor_options(self._lr.device)) if self.backend == "inductor" else {}
        self._fn = torch.compile(self._step, fullgraph=True, dynamic=False, backend=self.backend, **opts)

    def _call(self, batch: tuple) -> torch.Tensor:
        if self.mode == "eager":
            return self._fn(batch, self._lr, self._ema_w)
        if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # torch < 2.11
            raise RuntimeError("this torch cannot trace torch.autograd.grad (needs torch >= 2.11)")
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss = self._fn(batch, self._lr, self._ema_w)
        return loss.clone() if self.mode == "cudagraphs" else loss

    def __call__(self, batch: tuple, lr: float) -> torch.Tensor:
        first = self._fn is None
        if first or self._stale():
            self._build()
        self._lr.fill_(lr)  # a device write, no sync
        if self.ema is not None:
            self._ema_w.fill_(self.ema.next_weight())
        if not first or self.mode == "eager":
            return self._call(batch)
        try:  # the first call compiles; a failure there has changed no state (tracing runs on fake tensors)
            return self._call(batch)
        except Exception as e:
            why = " ".join(str(e).split())[:200] or type(e).__name__
            if not self.fallback:
                raise UserError(f"torch.compile of the train step failed ({why}); run with --no-compile") from None
            print(f"warning: torch.compile of the train step failed ({why}); training eagerly", file=sys.stderr)
            self.mode = "eager"
            self._build()
            return self._call(batch)
