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
is the conditional field, 1 NFE, and the graph has no w input (a distilled MeanFlow model carries its guidance in
its weights: ``--mf-guidance``).

torch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``, through onnxscript) writes the graph; it needs
the ``export`` extra (``pip install -e '.[export]'``: onnx, onnxscript).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import build_model, load_checkpoint
from .errors import ArgumentParser, UserError, cli
from .io import atomic_save, check_writable
from .solvers import GRIDS, ab2_slope, time_grid

__all__ = [
    "SOLVERS",
    "MAX_STEPS",
    "DEFAULT_INTERVAL",
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
DEFAULT_INTERVAL = (0.2, 0.7)  # fastflow.sample's --guidance-interval default (README, "Guidance in an interval")
INPUTS = ("noise", "labels", "w")
OUTPUT = "images"


def guided_stages(grid: torch.Tensor, interval: tuple[float, float] | None) -> list[bool]:
    """Per step of ``grid`` (each of the exported solvers has one stage, at the step's start): whether it lies in
    ``interval``, closed, compared in fp32 as :func:`fastflow.solvers.stage_plan` compares (``None``: all)."""
    t = grid[:-1].to(torch.float32)
    if interval is None:
        return [True] * len(t)
    lo, hi = (torch.tensor(v, dtype=torch.float32) for v in interval)
    return ((t >= lo) & (t <= hi)).tolist()


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


def _interval(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval LO,HI (e.g. 0.2,0.7) or none") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO < HI <= 1 (t = 0 noise, t = 1 data)")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastflow.export",
        description="Write a checkpoint's sampler as an ONNX graph: (noise, labels[, w]) -> images in [0, 1].",
    )
    p.add_argument("--checkpoint", default="model", help="checkpoint folder (default: model)")
    p.add_argument("--out", default="model.onnx", help="ONNX file to write (default: model.onnx)")
    p.add_argument(
        "--solver",
        default=None,
        help=f"one of {', '.join(SOLVERS)} (default: meanflow for a MeanFlow checkpoint, else euler)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps (jumps) of the fixed grid (default: 1 for meanflow, else 10)"
    )
    p.add_argument("--grid", default="uniform", choices=GRIDS, help="time grid (default: uniform)")
    p.add_argument(
        "--guided",
        action="store_true",
        help="take classifier-free guidance w as an input: 2 NFE at every stage inside --guidance-interval, "
        "whatever w (default: no w input, 1 NFE a stage)",
    )
    p.add_argument(
        "--guidance-interval",
        type=_interval,
        default=DEFAULT_INTERVAL,
        metavar="LO,HI",
        help="with --guided: guide the stages whose time lies in [LO, HI]; none: all (default: 0.2,0.7)",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    return p


@dataclass(frozen=True)
class ExportSpec:
    """What the graph computes: ``steps`` steps of ``solver`` on a ``grid`` time grid; with ``guided``, the steps
    that start inside ``interval`` (``None``: all) run guided at the input w."""

    solver: str
    steps: int
    grid: str = "uniform"
    guided: bool = False
    interval: tuple[float, float] | None = DEFAULT_INTERVAL

    @property
    def time_grid(self) -> torch.Tensor:
        return time_grid(self.steps, self.grid)

    @property
    def guided_steps(self) -> list[bool] | None:
        return guided_stages(self.time_grid, self.interval) if self.guided else None

    @property
    def nfe(self) -> int:
        """Network evaluations per image, whatever w is fed (a guided step runs both halves even at w = 1)."""
        return sum(2 if g else 1 for g in (self.guided_steps or [False] * self.steps))

    def describe(self) -> str:
        s = f"{self.solver}, {self.steps} step{'s' * (self.steps > 1)}"
        if self.grid != "uniform":
            s += f" ({self.grid} grid)"
        if self.guided:
            iv = "everywhere" if self.interval is None else f"in [{self.interval[0]:g}, {self.interval[1]:g}]"
            s += f", guided {iv} at the input w"
        return f"{s}, {self.nfe} NFE"


def resolve_spec(
    objective: str,
    solver: str | None = None,
    steps: int | None = None,
    grid: str = "uniform",
    guided: bool = False,
    interval: tuple[float, float] | None = DEFAULT_INTERVAL,
    where: str = "the checkpoint",
) -> ExportSpec:
    """The sampler to export for a checkpoint trained with ``objective``; defaults: MeanFlow's one jump for a
    MeanFlow checkpoint, 10 Euler steps otherwise. What cannot be exported is a one-line :class:`UserError`."""
    solver = solver or ("meanflow" if objective == "meanflow" else "euler")
    if solver not in SOLVERS:
        raise UserError(f"--solver {solver}: not exportable; the exported samplers are {', '.join(SOLVERS)}")
    if solver == "meanflow" and objective != "meanflow":
        raise UserError(
            f"--solver meanflow needs a checkpoint trained with --objective meanflow; {where} was trained with "
            f"objective {objective} (use euler or ab2)"
        )
    steps = steps if steps is not None else (1 if solver == "meanflow" else 10)
    if not 0 < steps <= MAX_STEPS:
        raise UserError(f"--steps must be in 1..{MAX_STEPS} (the loop is unrolled into the graph), got {steps}")
    if grid not in GRIDS:
        raise UserError(f"--grid {grid}: choose one of {', '.join(GRIDS)}")
    spec = ExportSpec(solver, steps, grid, guided, interval)
    if guided and not any(spec.guided_steps):
        raise UserError(
            f"--guided: no step of this {steps}-step grid starts inside --guidance-interval "
            f"{interval[0]:g},{interval[1]:g}, so w would change nothing"
        )
    return spec


def build_graph(model: nn.Module, spec: ExportSpec) -> SamplerGraph:
    return SamplerGraph(model, spec.solver, spec.time_grid, spec.guided_steps)


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    spec = resolve_spec(
        ckpt.objective, args.solver, args.steps, args.grid, args.guided, args.guidance_interval, str(ckpt.path)
    )
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
