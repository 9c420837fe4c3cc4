"""``python -m fastflow.evaluate``: sample quality against compute, over a grid of sampler settings.

For every setting (solver × time grid × guidance w × guidance interval × NFE budget, or × steps) the same seeded
noise is turned into ``--num-samples`` digits, an equal share of each, and judged by the project's classifier
(:mod:`fastflow.classifier`, ≥ 98% on MNIST's test set, cached after the first run):

- conditional accuracy: the share classified as the digit asked for, overall and per digit;
- FID: the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features of the
  generated digits and of MNIST's 10000 test images (:mod:`fastflow.fid`).

FID depends on the sample size (its bias falls like 1/N), so every report carries the floor: the FID of N real
training images (N/10 of each digit, like the generated set) against the same test set.

A budget of B NFE gives each solver the most steps whose cost fits: a step costs 1 (Euler, and the MeanFlow jump
``meanflow`` of a model trained with ``--objective meanflow``), 2 (midpoint, Heun) or 4 (RK4) network
evaluations, twice that at a guidance w other than 0 or 1; with a guidance interval only the stages whose time
lies in it pay double, so the cost is counted stage by stage (:attr:`~fastflow.solvers.SamplerSpec.nfe`). A
setting where one step costs more than B is skipped and listed under ``skipped``. The NFE reported is the count
:class:`~fastflow.solvers.GuidedField` made, per image (eager), or the same stage plan's count (``--compile``).

Output: the JSON report (``--out``; on stdout without it, the table then going to stderr), a markdown table,
and with ``--plot`` the picture drawn by ``plot/quality.py`` from the JSON. With ``--out`` the JSON is rewritten
after every setting (``"complete": false`` until the end) and ``--resume`` reuses the finished settings of a
report made with the same checkpoint, sample count, seed and weights.

Cost: the issue's grid (4 solvers × NFE 4, 8, 16, 32, 64 × w 0, 1, 2, 4, uniform grid) spends 1976 network
evaluations per digit. The ``cpu`` preset's U-Net (2.27 M parameters) measured 65–77 images per CPU-second in
fp32 and 150–190 in bf16 (``--amp auto`` on CPUs with AVX-512 BF16, as it trains), so at 1000 digits per
setting it takes about 1.5–2 h (bf16) or 3.5–4 h (fp32) on 2 free cores, and ten times that at 10000.
``--dry-run`` measures and estimates for the machine at hand. Sampling runs in chunks of ``--batch-size`` from one
draw of the noise. ``--compile`` compiles once per (solver, guidance, grid, interval), the settings that share
those running one after another; on 2 CPU cores it gained about 1.4× per image for about a minute of compiling
each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import build_model, load_checkpoint
from .classifier import load_or_train_classifier
from .compile import make_sampler
from .data import load_mnist
from .device import autocast, cpu_isa, device_name, resolve_amp, resolve_device, synchronize
from .errors import ArgumentParser, UserError, cli
from .fid import feature_stats, frechet_distance
from .io import atomic_write_json, check_writable
from .sampling_args import add_sampling_args, check_solvers, resolve_batch_size
from .settings import add_settings, setting
from .solvers import Interval, SamplerSpec

__all__ = [
    "generate",
    "classify",
    "conditional_accuracy",
    "plan_settings",
    "reference_stats",
    "summarize",
    "markdown_table",
    "EvaluateSettings",
    "build_parser",
    "main",
]

FORMAT = "fastflow-quality-1"
PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "plot" / "quality.py"


@torch.no_grad()
def generate(draw, num_samples: int, spec: SamplerSpec, *, seed: int = 0, device="cpu"):
    """``num_samples // 10`` digits of each class, digit by digit, from noise seeded by ``seed``, through
    ``draw(labels, spec, generator=...)`` (:func:`fastflow.compile.make_sampler`).

    Returns (images [N, 1, 28, 28] fp32 in [0, 1], labels [N], NFE per image as counted, seconds)."""
    per = num_samples // 10
    labels = torch.arange(10, device=device).repeat_interleave(per)
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    images, nfe = draw(labels, spec, generator=g)
    synchronize(torch.device(device))
    return images.float(), labels, nfe, time.perf_counter() - t0


@torch.no_grad()
def classify(clf, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted digits [N], penultimate features [N, 128] fp32) of ``images`` [N, 1, 28, 28] in [0, 1]."""
    clf = clf.to(images.device).eval()
    preds, feats = [], []
    for i in range(0, len(images), batch):
        f = clf.features(images[i : i + batch].float())  # [b, 128]
        preds.append(clf.fc2(f).argmax(1))
        feats.append(f.float())
    return torch.cat(preds), torch.cat(feats)


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    hit = pred == labels
    per = {str(d): float(hit[labels == d].float().mean()) for d in range(10) if (labels == d).any()}
    return {"accuracy": float(hit.float().mean()), "per_digit": per}


@torch.no_grad()
def conditional_accuracy(clf, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Overall and per-digit share of ``images`` that ``clf`` assigns to the label asked for."""
    return _accuracy(classify(clf, images)[0], labels)


def _interval(s: dict) -> Interval | None:
    """A setting's guidance interval as a tuple (the JSON report holds a list, or null)."""
    iv = s.get("guidance_interval")
    return None if iv is None else (float(iv[0]), float(iv[1]))


def _w_text(s: dict) -> str:
    """``2`` or ``2 [0.3,1]``: the guidance scale and, when there is one, its interval."""
    iv = _interval(s)
    return f"{s['guidance']:g}" + ("" if iv is None else f" [{iv[0]:g},{iv[1]:g}]")


def plan_settings(solvers, grids, guidances, nfes=None, steps=None, intervals=None) -> tuple[list[dict], list[dict]]:
    """The settings to run and the ones skipped, in a stable order (grid, guidance, interval, solver, budget).

    Each setting has ``solver, grid, guidance, guidance_interval`` (None, or ``[lo, hi]``), ``nfe_budget`` (None
    with ``steps``) and ``steps``; each skipped one has a ``reason`` instead of ``steps``. At w = 1 an interval
    changes nothing (the conditional field everywhere): such rows are planned once, without an interval."""
    if nfes is not None and steps is not None:
        raise UserError("give --steps or --nfe, not both")
    if nfes is None and steps is None:
        steps = [10]
    for v, flag in [(v, "--nfe") for v in nfes or []] + [(v, "--steps") for v in steps or []]:
        if v <= 0:
            raise UserError(f"{flag} must be > 0, got {v}")
    run, skipped = [], []
    planned: set[tuple] = set()
    seen: dict[tuple, int] = {}  # (grid, guidance, interval, solver, steps) -> the first NFE budget that ran it
    for grid, w, iv, solver, n in itertools.product(grids, guidances, intervals or [None], solvers, nfes or steps):
        w = float(w)
        iv = None if w == 1.0 or iv is None else (float(iv[0]), float(iv[1]))
        if (grid, w, iv, solver, n) in planned:  # w = 1 under several intervals
            continue
        planned.add((grid, w, iv, solver, n))
        s = {"solver": solver, "grid": grid, "guidance": w, "guidance_interval": None if iv is None else list(iv)}
        if nfes is None:
            run.append({**s, "nfe_budget": None, "steps": n})
            continue
        spec = SamplerSpec.for_nfe(n, solver, w, grid, iv)
        k = 0 if spec is None else spec.steps
        if k == 0:
            cost = SamplerSpec(solver, 1, w, grid, iv).nfe
            skipped.append(
                {**s, "nfe_budget": n, "reason": f"one {solver} step costs {cost} NFE at guidance {_w_text(s)} > {n}"}
            )
        elif (grid, w, iv, solver, k) in seen:  # e.g. midpoint at 8 and 10 NFE: both 4 steps
            skipped.append(
                {**s, "nfe_budget": n, "reason": f"the same {k} steps as at {seen[grid, w, iv, solver, k]} NFE"}
            )
        else:
            seen[grid, w, iv, solver, k] = n
            run.append({**s, "nfe_budget": n, "steps": k})
    return run, skipped


@torch.no_grad()
def reference_stats(clf, data_root, num: int, seed: int, device) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The test set's feature statistics, and the floor: the FID of ``num`` training images (``num // 10``
    of each digit, drawn with ``seed``) against them."""
    test, train = load_mnist(data_root, train=False, verbose=False), load_mnist(data_root, train=True, verbose=False)
    per = num // 10
    g = torch.Generator().manual_seed(seed)
    idx = []
    for d in range(10):
        pool = (train.labels == d).nonzero().flatten()
        if per > len(pool):
            raise UserError(
                f"--num-samples {num}: the floor needs {per} training images of digit {d}, MNIST has {len(pool)}"
            )
        idx.append(pool[torch.randperm(len(pool), generator=g)[:per]])
    real = train.images[torch.cat(idx)]

    def unit(u8):  # uint8 [N, 28, 28] -> [N, 1, 28, 28] in [0, 1]
        return u8.unsqueeze(1).to(device=device, dtype=torch.float32) / 255.0

    ref = feature_stats(classify(clf, unit(test.images))[1])
    floor = frechet_distance(*feature_stats(classify(clf, unit(real))[1]), *ref)
    return ref, floor


def summarize(results: list[dict], floor: float) -> dict:
    """The issue's questions: the best accuracy and FID at ≤ 10 and ≤ 20 NFE; the settings at ≤ 10 NFE with
    accuracy ≥ 99% and FID ≤ 1.5× the floor; the fewest NFE reaching 95% accuracy."""

    def brief(r):
        keys = ("solver", "grid", "guidance", "guidance_interval", "steps", "nfe", "accuracy", "fid")
        return None if r is None else {k: r.get(k) for k in keys}

    out: dict = {}
    for limit in (10, 20):
        rs = [r for r in results if r["nfe"] <= limit]
        out[f"best_accuracy_nfe_le_{limit}"] = brief(max(rs, key=lambda r: (r["accuracy"], -r["fid"]), default=None))
        out[f"best_fid_nfe_le_{limit}"] = brief(min(rs, key=lambda r: r["fid"], default=None))
    out["aim_nfe_le_10"] = [
        brief(r) for r in results if r["nfe"] <= 10 and r["accuracy"] >= 0.99 and r["fid"] <= 1.5 * floor
    ]
    hit = [r for r in results if r["accuracy"] >= 0.95]
    out["fewest_nfe_accuracy_95"] = brief(min(hit, key=lambda r: (r["nfe"], -r["accuracy"]), default=None))
    return out


def markdown_table(report: dict) -> str:
    """The results as a markdown table, the floor and the skipped settings below it."""
    floor = report["floor"]["fid"]
    lines = [
        "| solver | grid | w | steps | NFE | accuracy | worst digit | FID | FID / floor |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        worst = min(r["per_digit"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {r['solver']} | {r['grid']} | {_w_text(r)} | {r['steps']} | {r['nfe']} | {r['accuracy']:.2%} | "
            f"{worst[0]}: {worst[1]:.1%} | {r['fid']:.3f} | {r['fid'] / floor:.2f} |"
        )
    n = report["floor"]["num_samples"]
    lines.append("")
    lines.append(
        f"Floor: FID {floor:.3f} for {n} MNIST training images vs the {report['reference']['num_images']} test images."
    )
    if report["skipped"]:
        lines.append(
            "Skipped: "
            + "; ".join(
                f"{s['solver']}/{s['grid']} w={_w_text(s)} at {s['nfe_budget']} NFE ({s['reason']})"
                for s in report["skipped"]
            )
            + "."
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class EvaluateSettings:
    """How many digits, the judge, and where the report goes."""

    num_samples: int = setting(1000, "digits per setting, a tenth of each; also the floor's sample size", metavar="N")
    data_root: str = setting("data", "MNIST folder, also the classifier cache")
    classifier: str | None = setting(None, "classifier cache folder", shown="<data-root>/classifier")
    out: str | None = setting(
        None, "write the JSON report here (rewritten after every setting) instead of stdout", metavar="JSON",
        shown="none",
    )  # fmt: skip
    resume: bool = setting(
        False,
        "reuse the finished settings in --out when it was made with the same checkpoint, --num-samples, --seed and "
        "weights",
    )
    plot: str | None = setting(
        None, "then draw quality against NFE with plot/quality.py from --out (e.g. plot/quality_vs_nfe.png)",
        metavar="PNG", shown="none",
    )  # fmt: skip
    dry_run: bool = setting(
        False, "list the settings, time a few network calls and estimate the run time; generate nothing"
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastflow.evaluate",
        description="Judge generated digits by conditional accuracy and FID (the classifier's features), over a grid "
        "of solvers, time grids, guidance scales, guidance intervals and NFE budgets (or steps). Every list flag "
        "takes one value or a comma-separated list, e.g. --solvers euler,midpoint,heun,rk4 --nfe 4,8,16,32,64 "
        "--guidance 0,1,2,4; guidance intervals are separated by spaces: --guidance-interval none 0.2,1 0.4,1.",
    )
    add_sampling_args(p, lists=True)
    add_settings(p.add_argument_group("evaluation"), EvaluateSettings)
    return p


def _spec(s: dict) -> SamplerSpec:
    """A planned setting's sampler spec."""
    return SamplerSpec(s["solver"], s["steps"], s["guidance"], s["grid"], _interval(s))


def _cost(s: dict) -> int:
    """Network evaluations per image of a planned setting."""
    return _spec(s).nfe


@torch.no_grad()
def measure_throughput(model, batch: int, ctx, device, repeats: int = 3) -> float:
    """Images per second through ``model`` at ``batch`` images per call (after one warm-up call)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.rand(batch, device=device)
    y = torch.arange(batch, device=device) % 11
    with ctx:
        model(x, t, y)
        synchronize(torch.device(device))
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, t, y)
        synchronize(torch.device(device))
    return repeats * batch / (time.perf_counter() - t0)


def report_amp(amp) -> str:
    return str(amp).replace("torch.", "") if amp else "fp32"


def _key(s: dict) -> tuple:
    return (s["solver"], s["grid"], s["guidance"], _interval(s), s["nfe_budget"], s["steps"])


def _sampler_key(s: dict) -> tuple:
    """What a sampler is built for: the settings that share it differ only in steps and time grid."""
    return _spec(s).family


def _previous(path: str, meta: dict) -> dict[tuple, dict]:
    """Finished rows of an earlier report at ``path`` with the same identity fields, keyed by setting."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != v for k, v in meta.items()):
        print(f"--resume: {path} was made with other settings ({', '.join(meta)}); starting afresh", file=sys.stderr)
        return {}
    return {_key(r): r for r in old.get("results", [])}


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 10:
        raise UserError(f"--num-samples must be at least 10 (one per digit), got {args.num_samples}")
    if args.plot and not args.out:
        raise UserError("--plot draws from the JSON report: give --out too")
    if args.resume and not args.out:
        raise UserError("--resume reads the report in --out: give --out too")
    todo, skipped = plan_settings(args.solver, args.grid, args.guidance, args.nfe, args.steps, args.guidance_interval)
    if not todo:
        raise UserError("no setting fits its NFE budget: " + "; ".join(s["reason"] for s in skipped))
    for path, flag in ((args.out, "--out"), (args.plot, "--plot")):
        if path:
            check_writable(path, flag, kind="file")
    n = args.num_samples // 10 * 10

    device = resolve_device(args.device)
    batch_size = resolve_batch_size(args.batch_size, device)
    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    check_solvers(args.solver, ckpt)
    use_ema = not args.no_ema and ckpt.ema_weights is not None
    model = build_model(ckpt, use_ema=use_ema).to(device).eval()
    amp = resolve_amp(args.amp, device)
    ctx = autocast(device, amp)
    if args.dry_run:
        work = sum(_cost(s) for s in todo) * n  # images through the network, all settings together
        ips = measure_throughput(model, min(batch_size, n), ctx, device)
        for s in todo:
            print(f"{s['solver']:8s} {s['grid']:9s} w={_w_text(s):<4s} {s['steps']:3d} steps {_cost(s):3d} NFE")
        for s in skipped:
            print(f"skipped: {s['solver']}/{s['grid']} w={_w_text(s)} at {s['nfe_budget']} NFE ({s['reason']})")
        print(
            f"{len(todo)} settings, {len(skipped)} skipped; {work:,} image evaluations of the network for {n} digits each; "
            f"measured {ips:.0f} images/s ({device}, {report_amp(amp)}, batch {min(batch_size, n)}, eager): about {work / ips / 60:.0f} min "
            "of sampling, plus the classifier's pass over the 10000 test images"
        )
        return 0
    clf, clf_acc = load_or_train_classifier(args.data_root, args.classifier, verbose=True)
    clf = clf.to(device).eval()
    t_start = time.perf_counter()
    ref, floor = reference_stats(clf, args.data_root, n, args.seed, device)

    meta = {
        "format": FORMAT,
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "weights": "ema" if use_ema else "raw",
        "num_samples": n,
        "seed": args.seed,
    }
    done = _previous(args.out, meta) if args.resume else {}
    report = {
        **meta,
        "device": str(device),
        "device_name": device_name(device),
        "isa": cpu_isa() if device.type == "cpu" else None,
        "amp": report_amp(amp),
        "batch_size": batch_size,
        "compiled": bool(args.compile),
        "classifier": {"cache": str(args.classifier or Path(args.data_root) / "classifier"), "test_accuracy": clf_acc},
        "classifier_test_accuracy": clf_acc,
        "reference": {"set": "MNIST test", "num_images": 10000, "features": "classifier penultimate (128-d)"},
        "floor": {"fid": floor, "num_samples": n, "set": "MNIST train, N/10 per digit"},
        "results": [],
        "skipped": skipped,
        "complete": False,
    }
    left, spent, work_done = sum(_cost(s) for s in todo if _key(s) not in done) * n, 0.0, 0
    draw, drawing = None, None  # the sampler of the current (solver, grid, guidance, interval), kept while it lasts
    for i, s in enumerate(todo):
        if _key(s) in done:
            report["results"].append(done[_key(s)])
            continue
        if _sampler_key(s) != drawing:
            if args.compile and draw is not None:
                # each compiled sampler adds graphs to the same step function; past Dynamo's recompile limit
                # it would fall back to eager without a word, so start afresh for each sampler setting
                torch._dynamo.reset()
            draw = make_sampler(model, compiled=args.compile, ctx=ctx, batch_size=batch_size)
            drawing = _sampler_key(s)
        images, labels, nfe, secs = generate(draw, n, _spec(s), seed=args.seed, device=device)
        pred, feats = classify(clf, images)
        fid = frechet_distance(*feature_stats(feats), *ref)
        row = {
            **s,
            "nfe": nfe,
            **_accuracy(pred, labels),
            "fid": fid,
            "fid_over_floor": fid / floor if floor > 0 else None,
            "seconds": round(secs, 3),
        }
        report["results"].append(row)
        spent, work_done = spent + secs, work_done + nfe * n
        eta = spent / work_done * (left - work_done)
        print(
            f"[{i + 1}/{len(todo)}] {s['solver']:8s} {s['grid']:9s} w={_w_text(s):<4s} {s['steps']:3d} steps {nfe:3d} NFE: "
            f"accuracy {row['accuracy']:.2%}, FID {fid:.3f} (floor {floor:.3f}), {secs:.1f} s, about {eta / 60:.0f} min left",
            file=sys.stderr,
            flush=True,
        )
        if args.out:
            atomic_write_json(args.out, report)
    report["summary"] = summarize(report["results"], floor)
    report["complete"] = True
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    if len(report["results"]) == 1:  # one setting: its fields at the top level too, as single runs always had
        report.update({k: v for k, v in report["results"][0].items() if k not in report})
    table = markdown_table(report)
    if args.out:
        atomic_write_json(args.out, report)
        print(table)
        print(f"report -> {args.out}")
    else:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    if args.plot:
        if not PLOT_SCRIPT.exists():
            print(
                f"note: {PLOT_SCRIPT} not found (an installed copy of fastflow); run plot/quality.py {args.out} --out {args.plot} from the repository",
                file=sys.stderr,
            )
        else:
            if subprocess.run([sys.executable, str(PLOT_SCRIPT), args.out, "--out", args.plot]).returncode != 0:
                raise UserError(f"{PLOT_SCRIPT.name} failed (see above); the report in {args.out} is complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
