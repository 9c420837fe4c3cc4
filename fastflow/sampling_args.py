"""The flags that ``fastflow.sample`` and ``fastflow.evaluate`` share, each defined once (:class:`SampleSettings`).

``fastflow.sample`` draws with one setting, so every flag takes one value. ``fastflow.evaluate`` runs a grid of
settings: there the flags marked ``grid`` take a list (comma-separated; for ``--guidance-interval``, intervals
separated by spaces, since an interval holds a comma), and the plural alias (``--solvers``) too. Name, type,
default, choices and help live on the field (:func:`fastflow.settings.setting`); :func:`add_sampling_args` builds
either form from it, and docs/cli.md is generated from the parsers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .errors import UserError
from .settings import add_settings, finite_float, setting
from .solvers import DEFAULT_INTERVAL, GRIDS, ODE_SOLVERS, SOLVERS, Interval, SamplerSpec, check_interval

__all__ = [
    "SampleSettings",
    "DEFAULT_BATCH_SIZE",
    "parse_interval",
    "add_sampling_args",
    "resolve_spec",
    "resolve_batch_size",
    "describe_guidance",
    "check_solvers",
]

# Images integrated at a time when --batch-size is not given. CPU: 128, the fastest chunk measured for the cpu
# preset's U-Net on 2-core CPUs of both kinds (past ~128 images the activations leave the cache, and a smaller
# batch splits each op into less work per thread; the runs are in docs/history.md, "Speed"). CUDA: 1000 makes the
# usual requests one call (under guidance 2000 images of 28×28 per network call, far below a GPU's memory).
DEFAULT_BATCH_SIZE = {"cpu": 128, "cuda": 1000}


def parse_interval(text: str) -> Interval | None:
    """An argparse type: ``"LO,HI"`` -> ``(LO, HI)`` with 0 <= LO < HI <= 1. ``"none"`` and ``"0,1"`` (every
    stage time lies in [0, 1]) mean guidance everywhere: None."""
    if text.strip().lower() == "none":
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval LO,HI (e.g. 0.2,0.8) or none")
    try:
        bounds = [finite_float(p) for p in parts]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    try:
        iv = check_interval(bounds)
    except ValueError as e:  # "guidance interval 0.8,0.2: need 0 <= LO < HI <= 1 (...)"
        raise argparse.ArgumentTypeError(str(e)) from None
    return None if iv == (0.0, 1.0) else iv


@dataclass(frozen=True)
class SampleSettings:
    """What to sample from and how: the flags of both programs (a list for the ``grid`` ones in evaluate)."""

    checkpoint: str = setting("model", "checkpoint folder")
    solver: str = setting(
        "euler",
        f"solver, from {','.join(SOLVERS)}: an ODE solver (ab2: Adams-Bashforth 2, second order at 1 NFE a step), "
        "or meanflow, the jumps x + h·u(x, t, t + h) of a model trained with a meanflow objective (1 NFE a step)",
        choices=SOLVERS, metavar="S", grid=True, plural=True,
    )  # fmt: skip
    steps: int | None = setting(None, "solver steps", metavar="N", grid=True, shown="10, or from --nfe")
    nfe: int | None = setting(
        None,
        "network evaluations per image to spend instead of --steps: the most steps whose exact cost fits "
        "(evaluate skips a setting where one step costs more)",
        metavar="N", grid=True, shown="none",
    )  # fmt: skip
    guidance: float = setting(
        1.0,
        "classifier-free guidance w: 1 = conditional, 0 = unconditional; other w cost 2 NFE per stage",
        parse=finite_float, metavar="W", grid=True, plural=True,
    )  # fmt: skip
    guidance_interval: Interval | None = setting(
        DEFAULT_INTERVAL,
        "guide only at solver stages whose time t lies in [LO, HI] (t = 0 noise, t = 1 data), the conditional "
        "field (1 NFE) elsewhere; 0 <= LO < HI <= 1; none or 0,1: at every stage; at w = 1 it changes nothing",
        parse=parse_interval, metavar="LO,HI", grid=True, plural=True, spaced=True,
        shown="0.2,0.7, measured better than every stage for every w, solver and model tried: docs/results.md",
    )  # fmt: skip
    grid: str = setting(
        "uniform", f"time grid, from {','.join(GRIDS)}", choices=GRIDS, metavar="G", grid=True, plural=True
    )
    seed: int = setting(0, "noise seed")
    batch_size: int | None = setting(
        None,
        "images integrated at a time (the network sees twice as many at guided stages); a larger request runs "
        "in chunks, from the same noise as one batch",
        metavar="B", aliases=("--batch",),
        shown=f"{DEFAULT_BATCH_SIZE['cpu']} on a CPU, {DEFAULT_BATCH_SIZE['cuda']} on CUDA",
    )  # fmt: skip
    device: str = setting("auto", "where to run: auto = cuda if available", choices=("auto", "cpu", "cuda"))
    amp: str = setting(
        "none",
        "network precision: none = fp32, bf16, or auto = bf16 on CUDA with bf16 and on a CPU where native bf16 "
        "(AVX-512 BF16 / AMX) runs fast",
        choices=("auto", "none", "bf16"),
        shown="auto in fastflow.sample; none in fastflow.evaluate, so that its figures are fp32 on every machine",
    )
    no_ema: bool = setting(False, "use the raw weights, not the EMA ones")
    compile: bool = setting(
        False,
        "torch.compile the solver step (and on CUDA replay the loop as one CUDA graph); compiles once per "
        "sampling setting, so it pays off for repeated or large requests",
    )


def add_sampling_args(p: argparse.ArgumentParser, lists: bool = False) -> None:
    """The :class:`SampleSettings` flags on ``p``: one value each (``fastflow.sample``), or with ``lists``
    (``fastflow.evaluate``'s grid) a list for each ``grid`` flag."""
    add_settings(p.add_argument_group("sampling"), SampleSettings, lists=lists)


def resolve_spec(
    steps: int | None,
    nfe: int | None,
    solver: str,
    guidance: float,
    grid: str = "uniform",
    interval: Interval | None = None,
) -> SamplerSpec:
    """The sampler spec of ``--steps`` or ``--nfe`` (10 steps when neither is given), or a one-line UserError."""
    if steps is not None and nfe is not None:
        raise UserError("give --steps or --nfe, not both")
    if nfe is not None:
        if nfe <= 0:
            raise UserError(f"--nfe must be > 0, got {nfe}")
        spec = SamplerSpec.for_nfe(nfe, solver, guidance, grid, interval)
        if spec is None:
            cost = SamplerSpec(solver, 1, guidance, grid, interval).nfe
            raise UserError(
                f"--nfe {nfe} is less than one {solver} step costs at {describe_guidance(guidance, interval)} ({cost})"
            )
        return spec
    steps = 10 if steps is None else steps
    if steps <= 0:
        raise UserError(f"--steps must be > 0, got {steps}")
    return SamplerSpec(solver, steps, guidance, grid, interval)


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """``--batch-size``, or the measured default for ``device`` (:data:`DEFAULT_BATCH_SIZE`)."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])
    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {batch_size}")
    return batch_size


def describe_guidance(guidance: float, interval: Interval | None) -> str:
    """``"guidance 2"`` or ``"guidance 2 for t in [0.3, 1]"``, for messages and tables; at w = 1 (the conditional
    field at every stage) the interval changes nothing and is not named."""
    text = f"guidance {float(guidance):g}"
    if interval is None or float(guidance) == 1.0:
        return text
    return f"{text} for t in [{interval[0]:g}, {interval[1]:g}]"


def check_solvers(solvers, ckpt) -> None:
    """``--solver meanflow`` needs a MeanFlow model (its U-Net takes the later time: ``--objective meanflow`` or
    ``meanflow-distill``): a one-line UserError naming the checkpoint's objective otherwise. The ODE solvers run on
    either kind."""
    if "meanflow" in solvers and not ckpt.model_cfg.mean_flow:
        raise UserError(
            f"--solver meanflow needs a checkpoint trained with a meanflow objective; {ckpt.path} was trained with "
            f"objective {ckpt.objective} (use an ODE solver: {', '.join(ODE_SOLVERS)})"
        )
