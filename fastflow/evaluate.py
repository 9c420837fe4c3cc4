"""``python -m fastflow.evaluate``: how often generated digits are the digit asked for.

A small CNN (:mod:`fastflow.classifier`, ≥ 98% on MNIST's test set, cached after the first run) classifies
``--num-samples`` generated digits, an equal share of each; the report gives the share classified as asked,
overall and per digit, as JSON on stdout (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .checkpoint import build_model, load_checkpoint
from .classifier import load_or_train_classifier
from .device import autocast, resolve_amp, resolve_device, synchronize
from .errors import UserError, cli
from .io import atomic_write_json, check_writable
from .sample import add_sampling_args, resolve_steps
from .solvers import sample

__all__ = ["generate", "conditional_accuracy", "main"]


@torch.no_grad()
def generate(model, num_samples: int, steps: int, *, solver="euler", guidance=1.0, grid="uniform", seed=0, ctx=None, batch=500, device="cpu"):
    """``num_samples`` digits, an equal share of each (digit by digit). Returns (images [N,1,28,28] in [0,1],
    labels [N], nfe per image, seconds)."""
    per = num_samples // 10
    labels = torch.arange(10, device=device).repeat_interleave(per)
    g = torch.Generator(device=device).manual_seed(seed)
    out, nfe = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        imgs, nfe = sample(model, labels[i : i + batch], steps, solver=solver, guidance=guidance, grid=grid, generator=g, ctx=ctx)
        out.append(imgs.float())
    synchronize(torch.device(device))
    return torch.cat(out), labels, nfe, time.perf_counter() - t0


@torch.no_grad()
def conditional_accuracy(clf, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Overall and per-digit share of ``images`` that ``clf`` assigns to the label asked for."""
    clf = clf.to(images.device).eval()
    pred = torch.cat([clf(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    hit = pred == labels
    per = {str(d): float(hit[labels == d].float().mean()) for d in range(10) if (labels == d).any()}
    return {"accuracy": float(hit.float().mean()), "per_digit": per}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastflow.evaluate", description="Judge generated digits with a classifier.")
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=1000, help="digits to generate, a tenth of each (default: 1000)")
    p.add_argument("--data-root", default="data", help="MNIST folder, also the classifier cache (default: data)")
    p.add_argument("--classifier", default=None, help="classifier cache folder (default: <data-root>/classifier)")
    p.add_argument("--out", default=None, help="write the JSON report here instead of stdout")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 10:
        raise UserError(f"--num-samples must be at least 10 (one per digit), got {args.num_samples}")
    steps = resolve_steps(args.steps, args.nfe, args.solver, args.guidance)
    if args.out:
        check_writable(args.out, "--out")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    model = build_model(ckpt, use_ema=not args.no_ema).to(device).eval()
    clf, clf_acc = load_or_train_classifier(args.data_root, args.classifier, verbose=True)
    ctx = autocast(device, resolve_amp(args.amp, device))
    images, labels, nfe, secs = generate(
        model, args.num_samples, steps, solver=args.solver, guidance=args.guidance, grid=args.grid, seed=args.seed, ctx=ctx, device=device
    )
    report = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "solver": args.solver,
        "steps": steps,
        "nfe": nfe,
        "guidance": args.guidance,
        "grid": args.grid,
        "num_samples": len(labels),
        "seconds": round(secs, 3),
        "classifier_test_accuracy": clf_acc,
        **conditional_accuracy(clf.to(device), images, labels),
    }
    if args.out:
        atomic_write_json(args.out, report)
        print(f"accuracy {report['accuracy']:.2%} over {len(labels)} digits ({args.solver}, {nfe} NFE) -> {args.out}")
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
