"""``python -m bench train|sample``: images/s and peak memory of the train step and the sampler, across batch sizes
and modes, on whatever device runs it.

Each (mode, batch size) is measured in a fresh subprocess: peak RSS is a per-process high-water mark, so rows
measured in one process would inherit each other's peaks (``--in-process`` measures every row in this process,
quicker: on CUDA each row then starts from a reset Dynamo, freed CUDA-graph pools, an emptied cache and a reset
peak, so its peak is its own; on CPU the RSS peak is reset through /proc/self/clear_refs). A train iteration is
what the training loop does per step: fetch the batch (the device-resident loader, or for ``seed-baseline`` a
one-worker ``DataLoader`` that converts each image as torchvision's MNIST does) and ``Trainer.train_step`` (the
objective's draws, the step, eager or compiled). A sample iteration is one fixed-step Euler sampling call of
``batch`` images at 10, 20 and 50 NFE.

Timing (:func:`bench.harness.measure`): on CPU every call is synchronised and timed alone (median and 20/80
quantiles over calls, and the process CPU seconds per call). On CUDA ``--iters`` calls run back to back between two
CUDA events, ``--repeats`` times, and the per-iteration figures are each window's time / iters.

Rows go to ``bench/results/<suite>-<device>.json`` and ``.csv`` (rewritten after every row, so an interrupted
run keeps what it measured); a failing row is recorded with its one-line reason and the grid goes on. At the end
the full table and the compact one (mode × batch) are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastflow.config import ModelConfig, TrainConfig
from fastflow.errors import ArgumentParser, UserError
from fastflow.settings import add_settings, setting

from .harness import RESULTS, ROOT, fresh_state, git_commit, machine, measure, slug, versions, write_rows
from .sample_rows import sample_runner
from .tables import COLUMNS, caption, markdown_table, readme_table
from .train_rows import BASELINE_BATCH, DATA, MODES, resolve_data, skip_reason, train_runner

__all__ = ["GridSettings", "TimingSettings", "run_row", "build_parser", "main"]


def run_row(spec: dict) -> list[dict]:
    """Measure one (suite, mode, batch) in this process; returns its rows (one per NFE for sampling)."""
    import torch

    from fastflow.device import peak_memory_mb

    suite, mode, batch = spec["suite"], spec["mode"], spec["batch"]
    base = {"suite": suite, "mode": mode, "batch": batch}
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fresh_state(spec["device"])
    start_mb = torch.cuda.memory_allocated() / 2**20 if spec["device"] == "cuda" else None
    warmup, iters, repeats = spec["warmup"], spec["iters"], spec.get("repeats", 5)
    t_build = time.perf_counter()
    rows = []
    # Static shapes, as torch.compile(dynamic=False): each row is one batch size, and a graph made dynamic by an
    # earlier row's shape would not be the graph training runs.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, assume_static_by_default=True):
        if suite == "train":
            run, info = train_runner(
                mode,
                batch,
                preset=spec["preset"],
                device=spec["device"],
                data=spec.get("data", "auto"),
                data_root=spec["data_root"],
                model=spec.get("model"),
            )
            r = measure(run, info["device"], warmup, iters, repeats)
            rows.append({**base, "nfe": None, "steps": 1, "data": info["data"], "loader": info["loader"], **r})
        else:
            run, info = sample_runner(
                mode, batch, preset=spec["preset"], device=spec["device"], model=spec.get("model")
            )
            for nfe in spec["nfe"]:
                r = measure(lambda n=nfe: run(n), info["device"], warmup, iters, repeats)
                rows.append({**base, "nfe": nfe, "steps": nfe, "data": None, **r})
    dev = info["device"]
    mem = peak_memory_mb(dev)
    common = {
        "preset": info["preset"],
        "channels": list(info["model"].channels),
        "emb_dim": info["model"].emb_dim,
        "patch": info["model"].patch,
        **machine(dev),
        "setup_s": time.perf_counter() - t_build,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **mem,
        **versions(),
    }
    if start_mb is not None:  # memory still held when the row began (an earlier row's, in-process): in the peak
        common["start_allocated_mb"] = start_mb
    for row in rows:
        row.update(common)
        row["images_per_s"] = batch / row["median_s"]
        row["images_per_s_q20"] = batch / row["q80_s"]  # the slower fifth of iterations
        row["images_per_s_q80"] = batch / row["q20_s"]
        row["ms_per_step"] = 1e3 * row["median_s"] / row["steps"]
        row["images_per_cpu_s"] = batch / row["cpu_s"] if row["cpu_s"] > 0 else None
        row["status"] = "ok" if row["finite"] else "non-finite output"
    return rows


def _one_line(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _failed(spec: dict, status: str) -> list[dict]:
    return [
        {**{k: spec[k] for k in ("suite", "mode", "batch")}, "nfe": None, "device": spec["device"], "status": status}
    ]


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        rows = run_row(spec)
    except Exception as e:  # one failing row must not end the grid: report it as the row's status
        import traceback

        traceback.print_exc()
        rows = _failed(spec, _one_line(e))
    print("ROWS " + json.dumps(rows, default=str), flush=True)
    return 0


@dataclass(frozen=True)
class GridSettings:
    """What to measure: the rows of the grid."""

    batch_sizes: tuple[int, ...] = setting((32, 64, 128, 256, 512), "batch sizes, one row each")
    modes: str = setting(",".join(MODES), f"comma-separated, from {', '.join(MODES)}", metavar="M,M,...", shown="all")
    nfe: tuple[int, ...] = setting((10, 20, 50), "sample: NFE per row (Euler: steps)")
    device: str = setting("auto", "where to measure: auto = cuda if available", choices=("auto", "cpu", "cuda"))
    data: str = setting(
        "auto",
        "train images: mnist (from --data-root), synthetic (uint8 noise of MNIST's shape), auto (mnist when its "
        "files are in --data-root, else synthetic; never downloads)",
        choices=DATA,
    )
    data_root: str = setting("data", "MNIST folder")


@dataclass(frozen=True)
class TimingSettings:
    """How each row is timed, and where it goes."""

    iters: int | None = setting(
        None, "timed calls per row (CUDA: per timing window)", metavar="N", shown="10 for train, 3 for sample"
    )
    repeats: int | None = setting(
        None, "CUDA: timing windows of --iters back-to-back calls, quantiles over windows (a CPU times each call)",
        metavar="N", shown="5 for train, 3 for sample",
    )  # fmt: skip
    warmup: int | None = setting(
        None, "untimed calls first (the first one compiles)", metavar="N", shown="3 for train, 1 for sample"
    )
    threads: int = setting(0, "torch.set_num_threads (0: torch's default)")
    in_process: bool = setting(
        False, "measure every row in this process (quicker; on CPU the RSS peak is then reset between rows)"
    )
    timeout: float = setting(1800.0, "seconds per row before it is recorded as timed out")
    out: str = setting(str(RESULTS), "results folder", shown="bench/results")
    tag: str = setting("", "suffix for the result files, e.g. a machine name", shown="none")
    append: bool = setting(
        False, "keep the rows already in the result file (a row measured again replaces its old one)"
    )


DEFAULTS = {"train": dict(iters=10, repeats=5, warmup=3), "sample": dict(iters=3, repeats=3, warmup=1)}


def build_parser(suite: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m bench {suite}", description=__doc__.split("\n\n")[0])
    add_settings(p.add_argument_group("grid"), GridSettings)
    model = p.add_argument_group("model")
    add_settings(model, TrainConfig, preset=True, only=("preset",))
    add_settings(model, ModelConfig, preset=True, only=("channels", "emb_dim", "patch"))
    add_settings(p.add_argument_group("timing and output"), TimingSettings)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker(argv[1])
    if not argv or argv[0] not in ("train", "sample"):
        print("usage: python -m bench.grid {train,sample} [flags]", file=sys.stderr)
        return 2
    suite = argv[0]
    args = build_parser(suite).parse_args(argv[1:])
    for k, v in DEFAULTS[suite].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.preset = args.preset or "auto"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.iters <= 0 or args.warmup <= 0 or args.repeats <= 0:
        print("error: --iters, --repeats and --warmup must be > 0", file=sys.stderr)
        return 2
    from fastflow.device import resolve_device

    try:
        dev = resolve_device(args.device)
        data, line = resolve_data(args.data, args.data_root) if suite == "train" else (None, None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if line:
        print(line, flush=True)
    meta = {
        "format": "fastflow-bench-1",
        "suite": suite,
        "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "data": data,
        "git_commit": git_commit(),
        **versions(),
    }
    model_over = {
        k: v
        for k, v in (("channels", args.channels), ("emb_dim", args.emb_dim), ("patch", args.patch))
        if v is not None
    }
    rows: list[dict] = []
    stem = Path(args.out) / f"{suite}-{slug(dev, args.tag)}"
    previous = stem.with_suffix(".json")
    if args.append and previous.exists():
        try:
            rows = list(json.loads(previous.read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --append: {previous} is not a bench result file ({type(e).__name__})", file=sys.stderr)
            return 2
    interrupted = False
    grid = [(mode, batch) for mode in modes for batch in args.batch_sizes]
    for mode, batch in grid:
        rows = [r for r in rows if (r.get("mode"), r.get("batch")) != (mode, batch)]  # --append: measured anew
        why = skip_reason(suite, mode, batch, dev.type)
        if why:
            if not (MODES[mode].baseline and batch != BASELINE_BATCH and BASELINE_BATCH in args.batch_sizes):
                rows.append({"suite": suite, "mode": mode, "batch": batch, "nfe": None, "status": f"skipped: {why}"})
            continue
        spec = {
            "suite": suite, "mode": mode, "batch": batch, "preset": args.preset, "device": dev.type,
            "data": data, "data_root": args.data_root, "warmup": args.warmup, "iters": args.iters,
            "repeats": args.repeats, "nfe": list(args.nfe), "threads": args.threads, "model": model_over,
        }  # fmt: skip
        t0 = time.perf_counter()
        try:
            new = run_row(spec) if args.in_process else _run_subprocess(spec, args.timeout)
        except KeyboardInterrupt:  # Ctrl-C, or a caller's time budget (gpu_check.sh sends SIGINT): keep the rest
            new, interrupted = _failed(spec, "interrupted (Ctrl-C or the caller's time budget)"), True
        except Exception as e:  # in-process: one failing row must not end the grid
            import traceback

            traceback.print_exc()
            new = _failed(spec, _one_line(e))
        rows.extend(new)
        write_rows(rows, {**meta, "finished": None}, stem, COLUMNS)
        for r in new:
            ips = f"{r['images_per_s']:.1f} img/s" if r.get("status") == "ok" else r.get("status")
            nfe = "" if r.get("nfe") is None else f" NFE {r['nfe']:3d}"
            print(f"[{suite}] {mode:24s} batch {batch:4d}{nfe}: {ips}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if interrupted:
            break
    path = write_rows(rows, {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, stem, COLUMNS)
    print(f"\n{caption(rows)}\n")
    print(markdown_table(rows))
    print("\nThe compact table (docs/results.md's form):\n")
    print(readme_table(rows))
    print(f"\nrows: {path} and {path.with_suffix('.csv')}")
    if interrupted:
        return 130
    return 0 if all(r.get("status") == "ok" or str(r.get("status", "")).startswith("skipped") for r in rows) else 1


def _run_subprocess(spec: dict, timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "bench.grid", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(spec, f"error: timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROWS "):
            return json.loads(line[5:])
    tail = " ".join((proc.stderr or proc.stdout)[-300:].split())
    return _failed(spec, f"error: exit {proc.returncode}: {tail}")


if __name__ == "__main__":
    sys.exit(main())
