"""``python -m fastflow.sample``: draw digits from a trained checkpoint and save them as a PNG grid."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import build_model, load_checkpoint
from .compile import compiled_sample
from .device import autocast, resolve_amp, resolve_device, synchronize
from .errors import ArgumentParser, UserError, cli
from .io import atomic_save, check_writable
from .solvers import GRIDS, SOLVERS, sample, steps_for_nfe

__all__ = ["parse_digits", "resolve_steps", "add_sampling_args", "comma_list", "main"]


def parse_digits(text: str) -> list[int]:
    """``"0-9"`` -> [0..9]; ``"3,7"`` -> [3, 7]; ranges and lists mix (``"0-2,7"``)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise UserError(f"--digits: {part!r} is not a digit or a range like 0-9") from None
        if not (0 <= a <= 9 and 0 <= b <= 9):
            raise UserError(f"--digits: {part!r} is outside 0-9")
        if a > b:
            raise UserError(f"--digits: range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    if not out:
        raise UserError("--digits: empty list; give digits like 0-9 or 3,7")
    return out


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


def comma_list(parse, choices: tuple | None = None):
    """An argparse type: ``"a,b,c"`` -> ``[parse(a), parse(b), parse(c)]``, each checked against ``choices``."""

    def convert(text: str) -> list:
        out = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            v = parse(part)
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {part!r} (choose from {', '.join(choices)})")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError("expected at least one value")
        return out

    return convert


def add_sampling_args(p: argparse.ArgumentParser, lists: bool = False) -> None:
    """Flags shared by ``fastflow.sample`` and ``fastflow.evaluate``.

    With ``lists`` (``fastflow.evaluate``'s grid) ``--solver``, ``--steps``, ``--nfe``, ``--guidance`` and
    ``--grid`` each take a comma-separated list (one value is a list of one), and each has a plural alias.
    """
    p.add_argument("--checkpoint", default="model", help="checkpoint folder (default: model)")
    if lists:
        p.add_argument(
            "--solver",
            "--solvers",
            dest="solver",
            type=comma_list(str, SOLVERS),
            default=["euler"],
            metavar="S[,S...]",
            help=f"ODE solvers, from {','.join(SOLVERS)} (default: euler)",
        )
        p.add_argument(
            "--steps",
            type=comma_list(int),
            default=None,
            metavar="N[,N...]",
            help="solver steps per setting (default: 10, or from --nfe)",
        )
        p.add_argument(
            "--nfe",
            type=comma_list(int),
            default=None,
            metavar="N[,N...]",
            help="NFE budgets instead of --steps: each setting takes the most steps that fit the budget and is skipped when one step costs more",
        )
        p.add_argument(
            "--guidance",
            "--guidances",
            dest="guidance",
            type=comma_list(_float),
            default=[1.0],
            metavar="W[,W...]",
            help="classifier-free guidance scales w: 1 = conditional, 0 = unconditional (default: 1)",
        )
        p.add_argument(
            "--grid",
            "--grids",
            dest="grid",
            type=comma_list(str, GRIDS),
            default=["uniform"],
            metavar="G[,G...]",
            help=f"time grids, from {','.join(GRIDS)} (default: uniform)",
        )
    else:
        p.add_argument("--solver", default="euler", choices=SOLVERS, help="ODE solver (default: euler)")
        p.add_argument("--steps", type=int, default=None, help="solver steps (default: 10, or from --nfe)")
        p.add_argument("--nfe", type=int, default=None, help="network evaluations to spend instead of --steps")
        p.add_argument(
            "--guidance",
            type=_float,
            default=1.0,
            help="classifier-free guidance w: 1 = conditional, 0 = unconditional (default: 1)",
        )
        p.add_argument("--grid", default="uniform", choices=GRIDS, help="time grid (default: uniform)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--amp", default="none", choices=("auto", "none", "bf16"), help="network precision (default: none = fp32)"
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    if not lists:  # fastflow.evaluate samples eagerly: it counts NFE through GuidedField as it goes
        p.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the solver step (and on CUDA replay the loop as one CUDA graph); pays off for repeated or large batches",
        )


def resolve_steps(steps: int | None, nfe: int | None, solver: str, guidance: float) -> int:
    if steps is not None and nfe is not None:
        raise UserError("give --steps or --nfe, not both")
    if nfe is not None:
        if nfe <= 0:
            raise UserError(f"--nfe must be > 0, got {nfe}")
        s = steps_for_nfe(nfe, solver, guidance)
        if s == 0:
            raise UserError(f"--nfe {nfe} is less than one {solver} step costs at guidance {guidance}")
        return s
    steps = 10 if steps is None else steps
    if steps <= 0:
        raise UserError(f"--steps must be > 0, got {steps}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastflow.sample", description="Draw MNIST digits from a checkpoint.")
    add_sampling_args(p)
    p.add_argument("--digits", default="0-9", help="digits to draw: a range or a list, e.g. 0-9 or 3,7 (default: 0-9)")
    p.add_argument("--per-digit", type=int, default=10, help="images per digit; one grid row per digit (default: 10)")
    p.add_argument("--out", default="result/grid.png", help="PNG grid to write (default: result/grid.png)")
    p.add_argument("--save-tensor", default=None, help="also save {'images': N×1×28×28 in [0,1], 'labels': N} here")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    digits = parse_digits(args.digits)
    if args.per_digit <= 0:
        raise UserError(f"--per-digit must be > 0, got {args.per_digit}")
    steps = resolve_steps(args.steps, args.nfe, args.solver, args.guidance)
    check_writable(args.out, "--out", kind="file")
    if args.save_tensor:
        check_writable(args.save_tensor, "--save-tensor", kind="file")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    model = build_model(ckpt, use_ema=not args.no_ema).to(device).eval()
    ctx = autocast(device, resolve_amp(args.amp, device))

    labels = torch.tensor(digits, device=device).repeat_interleave(args.per_digit)  # [N], digit by digit
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    sampler = compiled_sample if args.compile else sample  # same noise and grid; compiled: fastflow.compile
    images, nfe = sampler(
        model, labels, steps, solver=args.solver, guidance=args.guidance, grid=args.grid, generator=g, ctx=ctx
    )
    synchronize(device)
    dt = time.perf_counter() - t0

    from .trainer import save_grid

    save_grid(images, args.out, nrow=args.per_digit)
    if args.save_tensor:
        payload = {"images": images.float().cpu(), "labels": labels.cpu()}
        atomic_save(args.save_tensor, lambda tmp: torch.save(payload, tmp))
    print(
        f"{len(labels)} images ({args.solver}, {steps} steps, {nfe} NFE, guidance {args.guidance:g}) "
        f"in {dt:.2f} s -> {Path(args.out)}" + (f", {args.save_tensor}" if args.save_tensor else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
