"""``python -m bench train|sample``: images/s and peak memory of the train step and the sampler, across batch sizes
and modes, on whatever device runs it.

Each (mode, batch size) is measured in a fresh subprocess: peak RSS is a per-process high-water mark, so rows
measured in one process would inherit each other's peaks (``--in-process`` does that anyway, for quick looks).
A train iteration is what the training loop does per step: fetch the batch (the device-resident loader, or for
``seed-baseline`` torchvision's MNIST through a ``DataLoader`` with one worker), draw t/ε/label-drop, and
:meth:`fastflow.train.Trainer.train_step` (eager, or the compiled unit of :mod:`fastflow.compile`). A sample
iteration is one fixed-step Euler sampling call of ``batch`` images at 10, 20 and 50 NFE.

Rows go to ``bench/results/<suite>-<device>.json`` and ``.csv`` (rewritten after every row, so an interrupted
run keeps what it measured); a markdown table is printed at the end. ``plot/bench.py`` draws them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastflow.errors import ArgumentParser

__all__ = [
    "MODES",
    "Mode",
    "train_runner",
    "sample_runner",
    "measure",
    "run_row",
    "markdown_table",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Mode:
    compile: bool = False
    amp: str = "none"  # none | bf16
    cuda_graphs: bool = False
    baseline: bool = False  # the original loop: torchvision dataset + DataLoader, fixed batch 32
    channels_last: bool = False


MODES: dict[str, Mode] = {
    "eager-fp32": Mode(),
    "eager-bf16": Mode(amp="bf16"),
    "eager-bf16-channels-last": Mode(amp="bf16", channels_last=True),
    "compile": Mode(compile=True),
    "compile-bf16": Mode(compile=True, amp="bf16"),
    "compile-bf16-cudagraphs": Mode(compile=True, amp="bf16", cuda_graphs=True),
    "seed-baseline": Mode(baseline=True),
}
BASELINE_BATCH = 32  # the original project's batch size


def skip_reason(suite: str, mode: str, batch: int, device_type: str) -> str | None:
    """Why a (suite, mode, batch) row is not measured on this device, or None."""
    m = MODES[mode]
    if m.cuda_graphs and device_type != "cuda":
        return "CUDA graphs need a CUDA device"
    if m.baseline and suite == "sample":
        return "the original sampler is the eager-fp32 loop: see eager-fp32"
    if m.baseline and batch != BASELINE_BATCH:
        return f"the original loop runs batch {BASELINE_BATCH} only"
    return None


# -- the measured functions (shared with tests/bench) ------------------------------------------------------------


def _configs(preset: str, device_type: str, model: dict | None = None):
    """(preset name, ModelConfig, training overrides); ``model`` overrides the preset's model fields."""
    from fastflow.config import PRESETS, ModelConfig

    if preset == "auto":
        preset = "original" if device_type == "cuda" else "cpu"
    model_over, train_over = PRESETS[preset]
    return preset, ModelConfig(**{**model_over, **(model or {})}), dict(train_over)


def train_runner(
    mode: str,
    batch: int,
    *,
    preset: str = "auto",
    device: str = "auto",
    data_root: str = "data",
    workdir: str | None = None,
    model: dict | None = None,
) -> tuple[Callable[[], object], dict]:
    """One training-loop iteration per call (fetch a batch, draw t/ε/labels, Trainer.train_step); returns
    ``(run, info)``. ``run()`` returns the step's loss (a 0-d tensor, not synchronised)."""
    import torch

    from fastflow.config import TrainConfig
    from fastflow.device import resolve_device
    from fastflow.train import Trainer

    m = MODES[mode]
    dev = resolve_device(device)
    preset, mcfg, train_over = _configs(preset, dev.type, model)
    workdir = workdir or tempfile.mkdtemp(prefix="fastflow-bench-")
    cfg = TrainConfig(
        **{
            **train_over,
            "preset": preset,
            "batch_size": batch,
            "amp": m.amp,
            "compile": m.compile,
            "cuda_graphs": m.cuda_graphs,
            "device": dev.type,
            "data_root": data_root,
            "model_dir": str(Path(workdir) / "model"),
            "result_dir": str(Path(workdir) / "result"),
            "num_epochs": 1000,  # the lr schedule never reaches its end inside a benchmark
        }
    )
    trainer = Trainer(mcfg, cfg, dev)
    if m.channels_last:
        trainer.model.to(memory_format=torch.channels_last)

    if m.baseline:
        batches = _baseline_batches(data_root, batch, cfg.seed, cfg.num_workers)
    else:
        batches = _device_batches(trainer)

    def run():
        z, y = next(batches)
        if m.baseline:
            z, y = z.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = trainer.train_step(z, y)
        trainer.step += 1
        return loss

    info = {"preset": preset, "model": mcfg, "device": dev, "trainer": trainer}
    return run, info


def _device_batches(trainer):
    epoch = 0
    while True:
        yield from trainer.loader.epoch(epoch)
        epoch += 1


def _baseline_batches(data_root: str, batch: int, seed: int, num_workers: int):
    """The seed project's input pipeline: torchvision's MNIST dataset, ToTensor + scaling to [-1, 1] per image
    in a worker process, shuffled by a DataLoader."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from fastflow.data import ensure_mnist

    ensure_mnist(data_root, verbose=False)
    tf = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.5,), (0.5,))]
    )
    ds = torchvision.datasets.MNIST(data_root, train=True, download=False, transform=tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        generator=g,
        persistent_workers=True,
    )
    while True:
        yield from loader


def sample_runner(
    mode: str, batch: int, *, preset: str = "auto", device: str = "auto", seed: int = 0, model: dict | None = None
) -> tuple[Callable[[int], object], dict]:
    """``run(steps)`` draws ``batch`` images with ``steps`` Euler steps (1 NFE each) and returns them
    ([B, 1, 28, 28] fp32 in [0, 1]). The model is a freshly initialised U-Net of the preset's shape (speed does
    not depend on the weights)."""
    import torch

    from fastflow.compile import CompiledSampler
    from fastflow.device import autocast, resolve_amp, resolve_device
    from fastflow.solvers import sample
    from fastflow.unet import UNet

    m = MODES[mode]
    dev = resolve_device(device)
    preset, mcfg, _ = _configs(preset, dev.type, model)
    torch.manual_seed(seed)
    model = UNet(mcfg).to(dev).eval().requires_grad_(False)
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    ctx = autocast(dev, resolve_amp(m.amp, dev))
    labels = torch.arange(batch, device=dev) % 10
    g = torch.Generator(device=dev)
    if m.compile:
        sampler = CompiledSampler(model, ctx=ctx, cuda_graphs=m.cuda_graphs)

        def run(steps: int):
            g.manual_seed(seed)
            return sampler(labels, steps, generator=g)[0]
    else:

        def run(steps: int):
            g.manual_seed(seed)
            return sample(model, labels, steps, generator=g, ctx=ctx)[0]

    return run, {"preset": preset, "model": mcfg, "device": dev, "net": model}


# -- timing -------------------------------------------------------------------------------------------------------


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn: Callable[[], object], device, warmup: int, iters: int) -> dict:
    """Wall time of ``fn`` per call: the first call (compilation, if any) apart, ``warmup - 1`` more untimed calls,
    then ``iters`` timed ones, each synchronised. Also the process CPU seconds per timed call (on a shared CPU,
    wall time moves with the neighbours' load; CPU time much less)."""
    import torch
    from torch._dynamo.utils import counters

    from fastflow.device import synchronize

    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        out = fn()
    synchronize(device)
    graphs_before = counters["stats"]["unique_graphs"]
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    finite = bool(torch.isfinite(torch.as_tensor(out).float()).all())
    med = statistics.median(times)
    return {
        "first_call_s": first,
        "median_s": med,
        "q20_s": _quantile(times, 0.2),
        "q80_s": _quantile(times, 0.8),
        "cpu_s": statistics.median(cpu),
        "compile_s": max(0.0, first - med),
        "recompiles_timed": counters["stats"]["unique_graphs"] - graphs_before,
        # graphs inductor took from its on-disk cache: then compile_s is a cache load, not a compilation
        "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "finite": finite,
    }


def _versions() -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover - platform
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def run_row(spec: dict) -> list[dict]:
    """Measure one (suite, mode, batch) in this process; returns its rows (one per NFE for sampling)."""
    import torch

    from fastflow.device import device_name, peak_memory_mb

    suite, mode, batch = spec["suite"], spec["mode"], spec["batch"]
    base = {"suite": suite, "mode": mode, "batch": batch}
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda":  # peak per row, also when rows share a process (--in-process)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    rows = []
    if suite == "train":
        run, info = train_runner(
            mode,
            batch,
            preset=spec["preset"],
            device=spec["device"],
            data_root=spec["data_root"],
            model=spec.get("model"),
        )
        r = measure(run, info["device"], spec["warmup"], spec["iters"])
        rows.append({**base, "nfe": None, "steps": 1, **r})
    else:
        run, info = sample_runner(mode, batch, preset=spec["preset"], device=spec["device"], model=spec.get("model"))
        for nfe in spec["nfe"]:
            r = measure(lambda n=nfe: run(n), info["device"], spec["warmup"], spec["iters"])
            rows.append({**base, "nfe": nfe, "steps": nfe, **r})
    dev = info["device"]
    mem = peak_memory_mb(dev)
    common = {
        "preset": info["preset"],
        "channels": list(info["model"].channels),
        "emb_dim": info["model"].emb_dim,
        "device": dev.type,
        "device_name": device_name(dev),
        "threads": torch.get_num_threads(),
        "setup_s": time.perf_counter() - t_build,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **mem,
        **_versions(),
    }
    for row in rows:
        row.update(common)
        row["images_per_s"] = batch / row["median_s"]
        row["images_per_s_q20"] = batch / row["q80_s"]  # the slower fifth of iterations
        row["images_per_s_q80"] = batch / row["q20_s"]
        row["ms_per_step"] = 1e3 * row["median_s"] / row["steps"]
        row["images_per_cpu_s"] = batch / row["cpu_s"] if row["cpu_s"] > 0 else None
        row["status"] = "ok" if row["finite"] else "non-finite output"
    return rows


# -- the driver ---------------------------------------------------------------------------------------------------

COLUMNS = [
    "suite", "mode", "batch", "nfe", "images_per_s", "images_per_s_q20", "images_per_s_q80", "ms_per_step",
    "compile_s", "first_call_s", "fx_cache_hits", "images_per_cpu_s", "recompiles_timed", "peak_rss_mb", "torch_peak_mb",
    "nvml_used_mb", "loadavg_1m", "status", "preset", "channels", "emb_dim", "device", "device_name", "threads",
    "torch", "triton",
]  # fmt: skip


def _fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: images/s median [q20–q80], ms per step, compile s, peak memory."""
    sample = any(r["suite"] == "sample" for r in rows)
    head = (
        ["mode", "batch"]
        + (["NFE"] if sample else [])
        + ["images/s", "q20–q80", "ms/step", "compile s", "peak MB", "note"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = r.get("torch_peak_mb")
        mem = f"{mem:.0f} (NVML {r['nvml_used_mb']:.0f})" if mem is not None and r.get("nvml_used_mb") else mem
        mem = mem if mem is not None else r.get("peak_rss_mb")
        ok = r.get("status") == "ok"
        cells = [r["mode"], str(r["batch"])] + ([_fmt(r.get("nfe"))] if sample else [])
        if ok:
            cells += [
                _fmt(r["images_per_s"]),
                f"{r['images_per_s_q20']:.1f}–{r['images_per_s_q80']:.1f}",
                _fmt(r["ms_per_step"]),
                _fmt(r["compile_s"]) if MODES.get(r["mode"], Mode()).compile else "–",
                mem if isinstance(mem, str) else _fmt(mem, 0),
                "; ".join(
                    ([f"{r['recompiles_timed']} recompiles while timed"] if r.get("recompiles_timed") else [])
                    + (["compile s: from inductor's disk cache"] if r.get("fx_cache_hits") else [])
                ),
            ]
        else:
            cells += ["–"] * 5 + [r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(rows: list[dict], meta: dict, out_dir: Path, suite: str, slug: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{suite}-{slug}"
    payload = {**meta, "rows": rows}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    for path, text in (
        (stem.with_suffix(".json"), json.dumps(payload, indent=1, default=str)),
        (stem.with_suffix(".csv"), buf.getvalue()),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return stem.with_suffix(".json")


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        rows = run_row(spec)
    except Exception as e:  # one failing row must not end the grid: report it as the row's status
        import traceback

        traceback.print_exc()
        rows = [
            {
                "suite": spec["suite"],
                "mode": spec["mode"],
                "batch": spec["batch"],
                "nfe": None,
                "status": f"error: {type(e).__name__}: {str(e)[:300]}",
            }
        ]
    print("ROWS " + json.dumps(rows, default=str), flush=True)
    return 0


def build_parser(suite: str) -> argparse.ArgumentParser:
    from fastflow.config import parse_int_list

    train = suite == "train"
    p = ArgumentParser(prog=f"python -m bench {suite}", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=parse_int_list, default=(32, 64, 128, 256, 512))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (default: all)")
    p.add_argument("--nfe", type=parse_int_list, default=(10, 20, 50), help="sampling: NFE per row (Euler: steps)")
    p.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "original", "cpu", "tiny"),
        help="model size (auto: cpu on CPU, original on CUDA)",
    )
    p.add_argument("--channels", type=parse_int_list, default=None, help="override the preset's U-Net widths")
    p.add_argument("--emb-dim", type=int, default=None, help="override the preset's embedding width")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--iters", type=int, default=10 if train else 3, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=3 if train else 1, help="untimed calls first (the first one compiles)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: bench/results)")
    p.add_argument("--tag", default="", help="suffix for the result files, e.g. a machine name")
    p.add_argument(
        "--in-process", action="store_true", help="measure every row in this process (peak memory then accumulates)"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is recorded as timed out")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker(argv[1])
    if not argv or argv[0] not in ("train", "sample"):
        print("usage: python -m bench.model {train,sample} [flags]", file=sys.stderr)
        return 2
    suite = argv[0]
    args = build_parser(suite).parse_args(argv[1:])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.iters <= 0 or args.warmup <= 0:
        print("error: --iters and --warmup must be > 0", file=sys.stderr)
        return 2
    import torch

    from fastflow.device import resolve_device

    dev = resolve_device(args.device)
    meta = {
        "format": "fastflow-bench-1",
        "suite": suite,
        "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        **_versions(),
    }
    try:
        meta["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # pragma: no cover - git missing
        pass
    model_over = {k: v for k, v in (("channels", args.channels), ("emb_dim", args.emb_dim)) if v is not None}
    rows: list[dict] = []
    slug = (
        "cpu"
        if dev.type != "cuda"
        else "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")
    )
    slug += f"-{args.tag}" if args.tag else ""
    out_dir = Path(args.out)
    for mode in modes:
        for batch in args.batch_sizes:
            why = skip_reason(suite, mode, batch, dev.type)
            if why:
                if not (MODES[mode].baseline and batch != BASELINE_BATCH and BASELINE_BATCH in args.batch_sizes):
                    rows.append(
                        {"suite": suite, "mode": mode, "batch": batch, "nfe": None, "status": f"skipped: {why}"}
                    )
                continue
            spec = {
                "suite": suite, "mode": mode, "batch": batch, "preset": args.preset, "device": dev.type,
                "data_root": args.data_root, "warmup": args.warmup, "iters": args.iters, "nfe": list(args.nfe),
                "threads": args.threads, "model": model_over,
            }  # fmt: skip
            t0 = time.perf_counter()
            if args.in_process:
                new = run_row(spec)
            else:
                new = _run_subprocess(spec, args.timeout)
            rows.extend(new)
            _write(rows, {**meta, "finished": None}, out_dir, suite, slug)
            for r in new:
                ips = f"{r['images_per_s']:.1f} img/s" if r.get("status") == "ok" else r.get("status")
                nfe = "" if r.get("nfe") is None else f" NFE {r['nfe']:3d}"
                print(
                    f"[{suite}] {mode:24s} batch {batch:4d}{nfe}: {ips}  ({time.perf_counter() - t0:.0f} s)", flush=True
                )
    path = _write(rows, {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, out_dir, suite, slug)
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        print(
            f"\n{suite} on {ok[0]['device_name']}, torch {ok[0]['torch']}, triton {ok[0]['triton']}, preset {ok[0]['preset']}:\n"
        )
    print(markdown_table(rows))
    print(f"\nrows: {path} and {path.with_suffix('.csv')}")
    return 0 if all(r.get("status") == "ok" or str(r.get("status", "")).startswith("skipped") for r in rows) else 1


def _run_subprocess(spec: dict, timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "bench.model", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            {
                **{k: spec[k] for k in ("suite", "mode", "batch")},
                "nfe": None,
                "status": f"error: timed out after {timeout:.0f} s",
            }
        ]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROWS "):
            return json.loads(line[5:])
    tail = (proc.stderr or proc.stdout)[-300:].replace("\n", " ")
    return [
        {
            **{k: spec[k] for k in ("suite", "mode", "batch")},
            "nfe": None,
            "status": f"error: exit {proc.returncode}: {tail}",
        }
    ]


if __name__ == "__main__":
    sys.exit(main())
