"""``python -m fastflow.export``: a checkpoint's sampler as one ONNX graph, noise and labels in, images out.

The graph is the whole fixed-step sampler, unrolled over a fixed time grid: ``(noise [B, 1, 28, 28] fp32,
labels [B] int64[, w [1] fp32]) -> images [B, 1, 28, 28] fp32 in [0, 1]``, any batch size B. The network runs in
fp32. The math is fastflow's sampler's (:mod:`fastflow.solvers`): the grid from :func:`~fastflow.solvers.time_grid`,
Euler x ← x + h·v, AB2 through :func:`~fastflow.solvers.ab2_slope`, MeanFlow's jumps x ← x + (t_{k+1} − t_k)·
u(x, t_k, t_{k+1}), classifier-free guidance v = v_u + w·(v_c − v_u) with label ``num_classes`` (10) for "no
label", and at the end the clamp to [-1, 1] mapped to [0, 1]. So onnxruntime on the same noise gives what
``fastflow.sample`` gives, to fp32 rounding (tests/fastflow/test_export.py; docs/export.md).

Guidance (``--guided``): the graph takes w as an input, and every stage whose time lies in ``--guidance-interval``
(default 0.2,0.7, ``fastflow.sample``'s) runs the conditional and unconditional halves as one call of twice the
batch, whatever w is fed (w = 1 too): 2 NFE for such a stage, 1 for the others. Without ``--guided`` every stage
is the conditional field, 1 NFE, and the graph has no w input (a distilled MeanFlow model carries its teacher's
guidance in its weights).

torch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``, through onnxscript) writes the graph; it needs
the ``export`` extra (``pip install -e '.[export]'``: onnx, onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, build_model, load_checkpoint
from .errors import ArgumentParser, UserError, cli
from .io import atomic_save, check_writable
from .sampling_args import parse_interval
from .settings import add_settings, setting
from .solvers import DEFAULT_INTERVAL, GRIDS, SamplerSpec, ab2_slope

__all__ = [
    "SOLVERS",
    "MAX_STEPS",
    "ExportSettings",
    "ExportSpec",
    "SamplerGraph",
    "resolve_spec",
    "build_graph",
    "export_onnx",
    "build_parser",
    "main",
]

SOLVERS = ("euler", "ab2", "meanflow")  # one network call a stage; the others (midpoint, ...) are not offered
# The loop is unrolled: the graph grows by one U-Net's nodes a step (the weights are shared, stored once), and so
# does the export's time (the cpu preset: 1 step 5-7 s, 10 steps 23-33 s on a loaded 2-core EPYC). 100 steps is
# far past any setting the README measures (10 Euler steps, 1-4 MeanFlow jumps).
MAX_STEPS = 100
INPUTS = ("noise", "labels", "w")
OUTPUT = "images"


class SamplerGraph(nn.Module):
    """``(noise, labels[, w]) -> images``: ``model`` integrated over ``grid`` with ``solver``, in fp32.

    Args:
        model: a :class:`~fastflow.unet.UNet` (a mean-flow one for ``meanflow``).
        solver: ``euler``, ``ab2`` or ``meanflow``.
        grid: ``steps + 1`` fp32 times from 0 to 1 (:func:`~fastflow.solvers.time_grid`).
        guided: per step, whether the step runs guided (cond and uncond halves, weighted by the input w);
            ``None``: no step is, and :meth:`forward` takes no w.

    :meth:`forward` takes noise [B, 1, 28, 28] fp32 (x at t = 0), labels [B] int64 in 0..9 and, when guided,
    w [1] fp32; returns images [B, 1, 28, 28] fp32 in [0, 1].
    """

    def __init__(self, model: nn.Module, solver: str, grid: torch.Tensor, guided: list[bool] | None = None):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        self.model = model.float().eval()
        self.solver = solver
        self.no_label = int(model.cfg.num_classes)
        g = grid.detach().to("cpu", torch.float32)
        self.register_buffer("t", g[:-1].clone(), persistent=False)  # [n] step starts
        self.register_buffer("s", g[1:].clone(), persistent=False)  # [n] step ends
        self.register_buffer("h", g[1:] - g[:-1], persistent=False)  # [n] as integrate computes grid[i+1] - grid[i]
        self.guided = list(guided) if guided is not None else [False] * (len(g) - 1)
        if len(self.guided) != len(g) - 1:
            raise ValueError(f"guided has {len(self.guided)} entries for {len(g) - 1} steps")

    @property
    def takes_w(self) -> bool:
        return any(self.guided)

    def _net(self, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
        b = x.shape[0]
        t = self.t[i].expand(b)  # [B]
        if self.solver == "meanflow":
            return self.model(x, t, y, self.s[i].expand(b))  # the average velocity over [t_i, t_{i+1}]
        return self.model(x, t, y)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        x = noise.float()  # [B, 1, 28, 28]
        b = x.shape[0]
        uncond = torch.full_like(labels, self.no_label)  # [B]
        prev = None  # ab2: (derivative, step size) of the step before
        for i, guided in enumerate(self.guided):
            h = self.h[i]
            if guided:  # one call of twice the batch, as GuidedField.both
                v = self._net(torch.cat([x, x]), torch.cat([labels, uncond]), i)  # [2B, 1, 28, 28]
                vc, vu = v[:b], v[b:]
                v = vu + w * (vc - vu)
            else:
                v = self._net(x, labels, i)
            slope = ab2_slope(v, h, prev) if self.solver == "ab2" else v
            if self.solver == "ab2":
                prev = (v, h)
            x = x + slope * h
        return (x.clamp(-1.0, 1.0) + 1.0) * 0.5


def _needs(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"exporting needs {module}: pip install -e '.[export]' (onnx, onnxscript)") from None


@contextlib.contextmanager
def _quiet():
    """The exporter prints its progress and warns about its own internals: the command's output stays its one line."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _export(graph: SamplerGraph, args: tuple, names: list[str], shapes: dict, opset: int | None):
    return torch.onnx.export(
        graph,
        args,
        dynamo=True,
        input_names=names,
        output_names=[OUTPUT],
        dynamic_shapes=shapes,
        opset_version=opset,
        external_data=False,
    )


def export_onnx(
    graph: SamplerGraph, path: str | Path, opset: int | None = None, metadata: dict[str, str] | None = None
) -> dict:
    """Export ``graph`` to ``path`` (written atomically, one file with its weights), with a dynamic batch; check
    it with ``onnx.checker``. ``metadata``: the model's custom metadata (onnxruntime: ``custom_metadata_map``).
    The exporter's per-node records (source lines, module paths: 60% of the file) are dropped.
    Returns ``{"opset", "inputs", "bytes"}``."""
    _needs("onnx")
    _needs("onnxscript")
    import onnx

    b = torch.export.Dim("batch", min=1, max=1 << 16)
    args: tuple = (torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    shapes: dict = {"noise": {0: b}, "labels": {0: b}}
    if graph.takes_w:
        args += (torch.ones(1),)
        shapes["w"] = None
    names = list(INPUTS[: len(args)])
    try:
        with torch.no_grad(), _quiet():
            program = _export(graph, args, names, shapes, opset)
    except Exception as e:  # the exporter's many error types; the first line names the op or the shape
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise UserError(f"torch's ONNX exporter could not convert this sampler ({lines[0][:200]})") from None
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": got, "inputs": [i.name for i in proto.graph.input], "bytes": len(data)}


@dataclass(frozen=True)
class ExportSettings:
    """Which checkpoint, which sampler, and where the graph goes."""

    checkpoint: str = setting("model", "checkpoint folder")
    out: str = setting("model.onnx", "ONNX file to write", metavar="ONNX")
    solver: str | None = setting(
        None, f"one of {', '.join(SOLVERS)}", choices=SOLVERS, shown="meanflow for a MeanFlow checkpoint, else euler"
    )
    steps: int | None = setting(
        None, f"steps (jumps) of the fixed grid, at most {MAX_STEPS}", metavar="N", shown="1 for meanflow, else 10"
    )
    grid: str = setting("uniform", "time grid", choices=GRIDS)
    guided: bool = setting(
        False,
        "take classifier-free guidance w as an input: 2 NFE at every stage inside --guidance-interval, whatever w "
        "(off: no w input, 1 NFE a stage)",
    )
    guidance_interval: tuple[float, float] | None = setting(
        DEFAULT_INTERVAL, "with --guided: guide the stages whose time lies in [LO, HI]; none: all",
        parse=parse_interval, metavar="LO,HI", shown="0.2,0.7",
    )  # fmt: skip
    no_ema: bool = setting(False, "use the raw weights, not the EMA ones")
    opset: int | None = setting(None, "ONNX opset", shown="the exporter's")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastflow.export",
        description="Write a checkpoint's sampler as an ONNX graph: (noise, labels[, w]) -> images in [0, 1].",
    )
    add_settings(p.add_argument_group("export"), ExportSettings)
    return p


@dataclass(frozen=True)
class ExportSpec:
    """What the graph computes: ``sampler``'s steps (its solver, grid and guidance interval); with ``guided``, the
    steps that start inside the interval run both halves at the graph's input w."""

    sampler: SamplerSpec
    guided: bool = False

    @property
    def guided_steps(self) -> list[bool] | None:
        """Per step: guided (one stage a step: the plan's only column)."""
        return [stages[0] for stages in self.sampler.plan] if self.guided else None

    @property
    def nfe(self) -> int:
        """Network evaluations per image, whatever w is fed (a guided step runs both halves even at w = 1)."""
        return sum(2 if g else 1 for g in (self.guided_steps or [False] * self.sampler.steps))

    def describe(self) -> str:
        s = self.sampler
        text = f"{s.solver}, {s.steps} step{'s' * (s.steps > 1)}" + (f" ({s.grid} grid)" if s.grid != "uniform" else "")
        if self.guided:
            iv = "everywhere" if s.interval is None else f"in [{s.interval[0]:g}, {s.interval[1]:g}]"
            text += f", guided {iv} at the input w"
        return f"{text}, {self.nfe} NFE"


def resolve_spec(
    ckpt: Checkpoint,
    solver: str | None = None,
    steps: int | None = None,
    grid: str = "uniform",
    guided: bool = False,
    interval: tuple[float, float] | None = DEFAULT_INTERVAL,
) -> ExportSpec:
    """The sampler to export for ``ckpt``; defaults: the one jump for a MeanFlow model (its U-Net takes the later
    time), 10 Euler steps otherwise. What cannot be exported is a one-line :class:`UserError`."""
    mean_flow = ckpt.model_cfg.mean_flow
    solver = solver or ("meanflow" if mean_flow else "euler")
    if solver not in SOLVERS:
        raise UserError(f"--solver {solver}: not exportable; the exported samplers are {', '.join(SOLVERS)}")
    if solver == "meanflow" and not mean_flow:
        raise UserError(
            f"--solver meanflow needs a checkpoint trained with a meanflow objective; {ckpt.path} was trained with "
            f"objective {ckpt.objective} (use euler or ab2)"
        )
    steps = steps if steps is not None else (1 if solver == "meanflow" else 10)
    if not 0 < steps <= MAX_STEPS:
        raise UserError(f"--steps must be in 1..{MAX_STEPS} (the loop is unrolled into the graph), got {steps}")
    if grid not in GRIDS:
        raise UserError(f"--grid {grid}: choose one of {', '.join(GRIDS)}")
    spec = ExportSpec(SamplerSpec(solver, steps, grid=grid, interval=interval if guided else None), guided)
    if guided and not any(spec.guided_steps):
        raise UserError(
            f"--guided: no step of this {steps}-step grid starts inside --guidance-interval "
            f"{interval[0]:g},{interval[1]:g}, so w would change nothing"
        )
    return spec


def build_graph(model: nn.Module, spec: ExportSpec) -> SamplerGraph:
    return SamplerGraph(model, spec.sampler.solver, spec.sampler.times(), spec.guided_steps)


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    spec = resolve_spec(ckpt, args.solver, args.steps, args.grid, args.guided, args.guidance_interval)
    check_writable(args.out, "--out", kind="file")
    _needs("onnx")
    _needs("onnxscript")
    graph = build_graph(build_model(ckpt, use_ema=not args.no_ema), spec)
    t0 = time.perf_counter()
    meta = {
        "fastflow.sampler": spec.describe(),
        "fastflow.checkpoint": f"{ckpt.path} ({ckpt.objective}, step {ckpt.step})",
    }
    info = export_onnx(graph, args.out, args.opset, meta)
    dt = time.perf_counter() - t0
    print(
        f"{ckpt.path} ({ckpt.objective}) -> {args.out}: {spec.describe()}; inputs {', '.join(info['inputs'])}, "
        f"opset {info['opset']}, {info['bytes'] / 1e6:.2f} MB, exported in {dt:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
