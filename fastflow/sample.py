"""``python -m fastflow.sample``: draw digits from a trained checkpoint and save them as a PNG grid."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import build_model, load_checkpoint
from .compile import make_sampler
from .device import autocast, describe_amp, resolve_amp, resolve_device, synchronize
from .errors import ArgumentParser, UserError, cli
from .images import save_grid
from .io import atomic_save, check_writable
from .sampling_args import add_sampling_args, check_solvers, describe_guidance, resolve_batch_size, resolve_spec
from .settings import add_settings, setting
from .solvers import chunks

__all__ = ["SampleOutput", "parse_digits", "build_parser", "main"]


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


@dataclass(frozen=True)
class SampleOutput:
    """What to draw and where it goes."""

    digits: str = setting("0-9", "digits to draw: a range or a list, e.g. 0-9 or 3,7")
    per_digit: int = setting(10, "images per digit; one grid row per digit", metavar="N")
    out: str = setting("result/grid.png", "PNG grid to write", metavar="PNG")
    save_tensor: str | None = setting(
        None, "also save {'images': N×1×28×28 in [0,1], 'labels': N} here", metavar="PT", shown="none"
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastflow.sample", description="Draw MNIST digits from a checkpoint.")
    add_sampling_args(p)
    p.set_defaults(amp="auto")  # the fastest precision here (measured); fastflow.evaluate stays fp32 unless asked
    add_settings(p.add_argument_group("output"), SampleOutput)
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    digits = parse_digits(args.digits)
    if args.per_digit <= 0:
        raise UserError(f"--per-digit must be > 0, got {args.per_digit}")
    spec = resolve_spec(args.steps, args.nfe, args.solver, args.guidance, args.grid, args.guidance_interval)
    check_writable(args.out, "--out", kind="file")
    if args.save_tensor:
        check_writable(args.save_tensor, "--save-tensor", kind="file")
    device = resolve_device(args.device)
    batch_size = resolve_batch_size(args.batch_size, device)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    check_solvers([args.solver], ckpt)
    model = build_model(ckpt, use_ema=not args.no_ema).to(device).eval()
    dtype = resolve_amp(args.amp, device)
    ctx = autocast(device, dtype)

    labels = torch.tensor(digits, device=device).repeat_interleave(args.per_digit)  # [N], digit by digit
    g = torch.Generator(device=device).manual_seed(args.seed)
    # the same noise, grid and stage plan eager or compiled; chunked at batch_size
    draw = make_sampler(model, compiled=args.compile, ctx=ctx, batch_size=batch_size)
    t0 = time.perf_counter()
    images, nfe = draw(labels, spec, generator=g)
    synchronize(device)
    dt = time.perf_counter() - t0

    save_grid(images, args.out, nrow=args.per_digit)
    if args.save_tensor:
        payload = {"images": images.float().cpu(), "labels": labels.cpu()}
        atomic_save(args.save_tensor, lambda tmp: torch.save(payload, tmp))
    parts = chunks(len(labels), batch_size)
    batches = "one batch" if len(parts) == 1 else f"{len(parts)} batches of {parts[0][1] - parts[0][0]}"
    print(
        f"{len(labels)} images ({spec.solver}, {spec.steps} steps, {nfe} NFE, "
        f"{describe_guidance(args.guidance, args.guidance_interval)}) in {dt:.2f} s ({batches}, "
        f"{describe_amp(args.amp, dtype, device)}"
        f"{', compiled' if args.compile else ''}) -> {Path(args.out)}"
        + (f", {args.save_tensor}" if args.save_tensor else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
