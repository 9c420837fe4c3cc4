"""``python -m bench train|sample``: images/s and peak memory of the train step and the sampler, across batch sizes
and modes, on whatever device runs it.

Each (mode, batch size) is measured in a fresh subprocess: peak RSS is a per-process high-water mark, so rows
measured in one process would inherit each other's peaks (``--in-process`` measures every row in this process,
quicker: on CUDA each row then starts from a reset Dynamo, freed CUDA-graph pools, an emptied cache and a reset
peak, so its peak is its own; on CPU the RSS peak accumulates). A train iteration is what the training loop does
per step: fetch the batch (the device-resident loader, or for ``seed-baseline`` a one-worker ``DataLoader`` that
converts each image as torchvision's MNIST does) and ``Trainer.train_step`` (the draws of t/ε/label-drop, the
step, eager or compiled). A sample iteration is one fixed-step Euler sampling call of ``batch`` images at 10, 20
and 50 NFE.

Timing: on CPU every call is synchronised and timed alone (median and 20/80 quantiles over calls, and the process
CPU seconds per call). On CUDA a synchronisation per call would stop the host from queueing step k+1 while the
GPU runs step k, which is exactly what CUDA graphs buy: there ``--iters`` calls run back to back between two CUDA
events, ``--repeats`` times, and the per-iteration figures are each window's time / iters (median and quantiles
over the windows).

Data (train): ``--data auto`` trains on MNIST when its files are in ``--data-root`` and otherwise on synthetic
uint8 digit-shaped noise with a line saying so (images/s does not depend on pixel values); it never downloads.

Rows go to ``bench/results/<suite>-<device>.json`` and ``.csv`` (rewritten after every row, so an interrupted
run keeps what it measured); a failing row is recorded with its one-line reason and the grid goes on. At the end
a markdown table of the rows and the README's table (mode × batch) are printed; ``python -m bench tables FILE...``
prints the latter from result files, ``plot/bench.py`` draws them.
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

from fastflow.errors import ArgumentParser, UserError

__all__ = [
    "MODES",
    "Mode",
    "DATA",
    "training_api",
    "resolve_data",
    "synthetic_mnist",
    "train_runner",
    "sample_runner",
    "measure",
    "run_row",
    "markdown_table",
    "readme_table",
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
    "eager-fp32-channels-last": Mode(channels_last=True),
    "compile": Mode(compile=True),
    "compile-bf16": Mode(compile=True, amp="bf16"),
    "compile-bf16-cudagraphs": Mode(compile=True, amp="bf16", cuda_graphs=True),
    "seed-baseline": Mode(baseline=True),
}
BASELINE_BATCH = 32  # the original project's batch size
# Row order of the README's tables: the baseline, then eager, then compiled.
TABLE_ORDER = (
    "seed-baseline",
    "eager-fp32",
    "eager-bf16",
    "eager-bf16-channels-last",
    "eager-fp32-channels-last",
    "compile",
    "compile-bf16",
    "compile-bf16-cudagraphs",
)


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


# -- the training API bench builds on -----------------------------------------------------------------------------


def training_api() -> tuple[Callable, Callable]:
    """``(fastflow.trainer.Trainer, fastflow.config.resolve_configs)``: bench's only way into training (the
    Trainer's ``train_step`` draws, schedules, steps and advances ``trainer.step`` itself). Importing them is also
    the GPU check's import test of the train side."""
    from fastflow.config import resolve_configs
    from fastflow.trainer import Trainer

    return Trainer, resolve_configs


# -- data ---------------------------------------------------------------------------------------------------------

DATA = ("auto", "synthetic", "mnist")
SYNTHETIC_IMAGES = 60000  # as many as MNIST's training set: the same epoch length and loader work


def resolve_data(kind: str, root: str) -> tuple[str, str | None]:
    """``(kind, line)``: ``auto`` becomes ``mnist`` when MNIST's files are in ``root`` and ``synthetic`` otherwise
    (``line`` then says so); nothing is downloaded or rebuilt. ``mnist`` loads as training does (which may)."""
    if kind not in DATA:
        raise UserError(f"--data {kind!r}: choose one of {', '.join(DATA)}")
    if kind != "auto":
        return kind, None
    from fastflow.data import raw_dir, verify

    if not verify(root):  # [] = all four files there with the right checksums
        return "mnist", None
    return "synthetic", (
        f"data: no MNIST in {raw_dir(root)}: training on synthetic uint8 noise of MNIST's shape "
        f"({SYNTHETIC_IMAGES} x 28 x 28, labels 0-9); images/s does not depend on the pixel values"
    )


def synthetic_mnist(n: int = SYNTHETIC_IMAGES, seed: int = 0):
    """``fastflow.data.MNISTArrays`` of uniform uint8 noise: images [n, 28, 28] uint8, labels [n] int64 in 0..9."""
    import torch

    from fastflow.data import MNISTArrays

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
    return MNISTArrays(images, labels)


class _SyntheticImages:
    """The seed loop's dataset on synthetic pixels: per item a PIL image from the uint8 array and the transform,
    the work ``torchvision.datasets.MNIST.__getitem__`` does per image (a TensorDataset of ready tensors would
    skip it and flatter the baseline)."""

    def __init__(self, arrays, transform):
        self.images, self.labels, self.transform = arrays.images, arrays.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.labels[i])


# -- the measured functions (shared with tests/bench) ------------------------------------------------------------


def train_runner(
    mode: str,
    batch: int,
    *,
    preset: str = "auto",
    device: str = "auto",
    data: str = "auto",
    data_root: str = "data",
    workdir: str | None = None,
    model: dict | None = None,
) -> tuple[Callable[[], object], dict]:
    """One training-loop iteration per call (fetch a batch, ``Trainer.train_step``); returns ``(run, info)``.
    ``run()`` returns the step's loss (a 0-d tensor, not synchronised). ``data``: auto, synthetic or mnist
    (:func:`resolve_data`); ``info["data"]`` is the one used."""
    import torch

    from fastflow.device import resolve_device

    Trainer, resolve_configs = training_api()
    m = MODES[mode]
    dev = resolve_device(device)
    data, _ = resolve_data(data, data_root)
    workdir = workdir or tempfile.mkdtemp(prefix="fastflow-bench-")
    mcfg, cfg = resolve_configs(
        preset,
        dev.type,
        model=model,
        train={
            "batch_size": batch,
            "amp": m.amp,
            "compile": m.compile,
            "cuda_graphs": m.cuda_graphs,
            "device": dev.type,
            "data_root": data_root,
            "model_dir": str(Path(workdir) / "model"),
            "result_dir": str(Path(workdir) / "result"),
            "num_epochs": 1000,  # the lr schedule never reaches its end inside a benchmark
            "time_budget": 0.0,  # a fixed schedule, not one planned from the measured rate
        },
    )
    arrays = synthetic_mnist(seed=cfg.seed) if data == "synthetic" else None  # None: the Trainer loads MNIST
    trainer = Trainer(mcfg, cfg, dev, data=arrays)
    if m.channels_last:
        trainer.model.to(memory_format=torch.channels_last)

    if m.baseline:
        batches = _baseline_batches(data_root, batch, cfg.seed, cfg.num_workers, arrays)
    else:
        batches = _device_batches(trainer)

    def run():
        z, y = next(batches)
        if m.baseline:
            z, y = z.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return trainer.train_step(z, y)

    loader = "device-resident, a seeded permutation per epoch"
    if m.baseline:
        pixels = "torchvision's MNIST" if arrays is None else "synthetic pixels"
        loader = f"DataLoader, {cfg.num_workers} worker(s), per image PIL + ToTensor + Normalize ({pixels})"
    info = {"preset": cfg.preset, "model": mcfg, "device": dev, "trainer": trainer, "data": data, "loader": loader}
    return run, info


def _device_batches(trainer):
    trainer.prepare()
    epoch = 0
    while True:
        yield from trainer.loader.epoch(epoch)
        epoch += 1


def _baseline_batches(data_root: str, batch: int, seed: int, num_workers: int, arrays=None):
    """The seed project's input pipeline: torchvision's MNIST dataset (or, with ``arrays``, synthetic pixels
    through the same per-image work), ToTensor + scaling to [-1, 1] per image in a worker process, shuffled by
    a DataLoader."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    tf = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.5,), (0.5,))]
    )
    if arrays is None:
        from fastflow.data import ensure_mnist

        ensure_mnist(data_root, verbose=False)
        ds = torchvision.datasets.MNIST(data_root, train=True, download=False, transform=tf)
    else:
        ds = _SyntheticImages(arrays, tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        generator=g,
        persistent_workers=num_workers > 0,
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
    from fastflow.solvers import SamplerSpec, sample
    from fastflow.unet import UNet

    _, resolve_configs = training_api()
    m = MODES[mode]
    dev = resolve_device(device)
    mcfg, cfg = resolve_configs(preset, dev.type, model=model)
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
            return sampler(labels, SamplerSpec("euler", steps), generator=g)[0]
    else:

        def run(steps: int):
            g.manual_seed(seed)
            return sample(model, labels, SamplerSpec("euler", steps), generator=g, ctx=ctx)[0]

    return run, {"preset": cfg.preset, "model": mcfg, "device": dev, "net": model}


# -- timing -------------------------------------------------------------------------------------------------------


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _per_call(fn: Callable[[], object], device, iters: int) -> tuple[list[float], list[float], object]:
    """CPU: each call synchronised and timed alone; wall and process CPU seconds per call."""
    from fastflow.device import synchronize

    times, cpu, out = [], [], None
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu, out


def _cuda_windows(fn: Callable[[], object], device, iters: int, repeats: int):
    """CUDA: ``repeats`` windows of ``iters`` calls queued back to back between two events (no synchronisation
    inside a window, so the host runs ahead of the GPU as in training). Per window: GPU seconds per call, and the
    host's CPU seconds per call spent queueing them (before the wait for the GPU)."""
    import torch

    times, cpu, out = [], [], None
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        c0 = time.process_time()
        start.record()
        for _ in range(iters):
            out = fn()
        end.record()
        cpu.append((time.process_time() - c0) / iters)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return times, cpu, out


def measure(fn: Callable[[], object], device, warmup: int, iters: int, repeats: int = 5) -> dict:
    """Seconds per call of ``fn``: the first call (compilation, if any) apart, ``warmup - 1`` more untimed calls,
    then on CPU ``iters`` calls each synchronised and timed alone, on CUDA ``repeats`` windows of ``iters`` calls
    timed between CUDA events (see the module docstring). Also the process CPU seconds per timed call (on a
    shared CPU wall time moves with the neighbours' load, CPU time much less)."""
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
    if device.type == "cuda":
        times, cpu, out = _cuda_windows(fn, device, iters, repeats)
        timing = f"cuda events: {repeats} windows of {iters} calls"
    else:
        times, cpu, out = _per_call(fn, device, iters)
        timing = f"per call: {iters} calls"
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
        "timing": timing,
    }


def _versions() -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover - platform
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def _isa() -> str | None:
    """The vector ISA torch's CPU kernels run with here (AVX512, AVX2, ...), where torch says."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        return None


def _fresh_state(device_type: str) -> None:
    """Leave nothing of an earlier row in this process: compiled graphs (and Dynamo's recompile counts), CUDA-graph
    pools, cached blocks and the peak statistics (on a CPU the peak RSS, where Linux lets it be reset). Needed
    with ``--in-process``; harmless in a fresh process."""
    import gc

    import torch

    from fastflow.device import reset_peak_memory

    gc.collect()
    torch._dynamo.reset()
    if device_type == "cuda":
        try:  # torch._dynamo.reset frees the CUDA-graph trees only in newer torch
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        except (ImportError, AttributeError):  # pragma: no cover - torch version
            pass
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    reset_peak_memory(torch.device(device_type))


def run_row(spec: dict) -> list[dict]:
    """Measure one (suite, mode, batch) in this process; returns its rows (one per NFE for sampling)."""
    import torch

    from fastflow.device import device_name, peak_memory_mb

    suite, mode, batch = spec["suite"], spec["mode"], spec["batch"]
    base = {"suite": suite, "mode": mode, "batch": batch}
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    _fresh_state(spec["device"])
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
        "device": dev.type,
        "device_name": device_name(dev),
        "isa": _isa(),
        "threads": torch.get_num_threads(),
        "setup_s": time.perf_counter() - t_build,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **mem,
        **_versions(),
    }
    if start_mb is not None:  # memory still held when the row began (an earlier row's, in-process): in the peak
        common["start_allocated_mb"] = start_mb
        common["cuda_capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(dev))
    for row in rows:
        row.update(common)
        row["images_per_s"] = batch / row["median_s"]
        row["images_per_s_q20"] = batch / row["q80_s"]  # the slower fifth of iterations
        row["images_per_s_q80"] = batch / row["q20_s"]
        row["ms_per_step"] = 1e3 * row["median_s"] / row["steps"]
        row["images_per_cpu_s"] = batch / row["cpu_s"] if row["cpu_s"] > 0 else None
        row["status"] = "ok" if row["finite"] else "non-finite output"
    return rows


# -- tables -------------------------------------------------------------------------------------------------------

COLUMNS = [
    "suite", "mode", "batch", "nfe", "images_per_s", "images_per_s_q20", "images_per_s_q80", "ms_per_step",
    "compile_s", "first_call_s", "fx_cache_hits", "images_per_cpu_s", "recompiles_timed", "peak_rss_mb", "torch_peak_mb",
    "nvml_used_mb", "loadavg_1m", "status", "preset", "channels", "emb_dim", "patch", "device", "device_name", "threads",
    "torch", "triton", "data", "loader", "timing", "isa", "start_allocated_mb",
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


def _peak_mib(r: dict) -> float | None:
    return r["torch_peak_mb"] if r.get("torch_peak_mb") is not None else r.get("peak_rss_mb")


def _md_row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def caption(rows: list[dict]) -> str:
    """One line naming what the rows were measured on: suite, device, versions, preset, data, timing."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return f"{rows[0]['suite'] if rows else '?'}: no measured rows"
    r = ok[0]
    data = f", data {r['data']}" if r.get("data") else ""
    return (
        f"{r['suite']} on {r.get('device_name')}, torch {r.get('torch')}, triton {r.get('triton')}, "
        f"preset {r.get('preset')} "
        f"({'/'.join(map(str, r.get('channels') or []))}){data}; timing: {r.get('timing', 'per call')}"
    )


def readme_table(rows: list[dict]) -> str:
    """The README's form of one suite's rows: a mode per line, a batch size per column, each cell images/s
    (sampling: at each NFE, ' / '-separated) and the peak memory in MiB in parentheses. An empty cell was not
    measured or skipped; failed and interrupted rows are listed under the table with their reason."""
    suite = rows[0]["suite"]
    ok = [r for r in rows if r.get("status") == "ok"]
    cuda = any(r.get("device") == "cuda" for r in ok)
    mem_name = "peak MiB, torch.cuda" if cuda else "peak RSS MiB"
    batches = sorted({r["batch"] for r in rows})
    shown = {r["mode"] for r in rows if not str(r.get("status", "")).startswith("skipped")}
    modes = [m for m in TABLE_ORDER if m in shown] + sorted(shown - set(TABLE_ORDER))
    nfes = sorted({r["nfe"] for r in ok if r.get("nfe") is not None})
    if suite == "sample":
        title = f"sample images/s at {' / '.join(map(str, nfes)) or '?'} NFE ({mem_name})"
    else:
        title = f"train images/s ({mem_name})"
    lines = [_md_row([title, *map(str, batches)]), "|---|" + "--:|" * len(batches)]
    notes = []
    for mode in modes:
        cells = []
        for b in batches:
            mine = [r for r in rows if r["mode"] == mode and r["batch"] == b]
            good = [r for r in mine if r.get("status") == "ok"]
            bad = [r for r in mine if r.get("status") != "ok" and not str(r.get("status", "")).startswith("skipped")]
            if good:
                if suite == "sample":
                    by_nfe = {r["nfe"]: r["images_per_s"] for r in good}
                    value = " / ".join(f"{by_nfe[n]:.1f}" if n in by_nfe else "–" for n in nfes)
                else:
                    value = f"{good[0]['images_per_s']:.1f}"
                peaks = [p for p in map(_peak_mib, good) if p is not None]
                cells.append(f"{value} ({max(peaks):.0f})" if peaks else value)
                left = max((r.get("start_allocated_mb") or 0.0) for r in good)
                if left >= 1.0:
                    notes.append(f"- {mode}, batch {b}: {left:.0f} MiB of earlier rows still allocated (in the peak)")
            elif bad:
                cut = str(bad[0].get("status", "")).startswith("interrupted")
                cells.append("not finished" if cut else "failed")
                notes.append(f"- {mode}, batch {b}: {bad[0].get('status')}")
            else:
                cells.append("")
        lines.append(_md_row([mode, *cells]))
    return "\n".join(lines + ([""] + notes if notes else []))


def tables(paths: list[str]) -> int:
    """``python -m bench tables FILE.json ...``: each result file's caption and README table."""
    if not paths:
        print("usage: python -m bench tables RESULT.json [...]", file=sys.stderr)
        return 2
    for i, p in enumerate(paths):
        try:
            rows = json.loads(Path(p).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {p}: not a bench result file ({type(e).__name__})", file=sys.stderr)
            return 1
        if not rows:
            print(f"{p}: no rows")
            continue
        print(("\n" if i else "") + caption(rows) + "\n")
        print(readme_table(rows))
    return 0


# -- the driver ---------------------------------------------------------------------------------------------------


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
    p.add_argument("--patch", type=int, default=None, help="override the preset's space-to-depth stem (1: off)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--iters", type=int, default=10 if train else 3, help="timed iterations per row (CUDA: per timing window)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5 if train else 3,
        help="CUDA: timing windows of --iters back-to-back calls; quantiles over windows (CPU times each call)",
    )
    p.add_argument("--warmup", type=int, default=3 if train else 1, help="untimed calls first (the first one compiles)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument(
        "--data",
        default="auto",
        choices=DATA,
        help="train images: mnist (from --data-root), synthetic (uint8 noise of MNIST's shape), "
        "auto (mnist when its files are in --data-root, else synthetic; never downloads)",
    )
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: bench/results)")
    p.add_argument("--tag", default="", help="suffix for the result files, e.g. a machine name")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure every row in this process (quicker; on CPU the RSS peak then accumulates)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is recorded as timed out")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in the result file (a row measured again replaces its old one)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker(argv[1])
    if argv and argv[0] == "tables":
        return tables(argv[1:])
    if not argv or argv[0] not in ("train", "sample"):
        print("usage: python -m bench.model {train,sample,tables} [flags]", file=sys.stderr)
        return 2
    suite = argv[0]
    args = build_parser(suite).parse_args(argv[1:])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.iters <= 0 or args.warmup <= 0 or args.repeats <= 0:
        print("error: --iters, --repeats and --warmup must be > 0", file=sys.stderr)
        return 2
    import torch

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
        **_versions(),
    }
    try:
        meta["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # pragma: no cover - git missing
        pass
    model_over = {
        k: v
        for k, v in (("channels", args.channels), ("emb_dim", args.emb_dim), ("patch", args.patch))
        if v is not None
    }
    rows: list[dict] = []
    slug = (
        "cpu"
        if dev.type != "cuda"
        else "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")
    )
    slug += f"-{args.tag}" if args.tag else ""
    out_dir = Path(args.out)
    previous = out_dir / f"{suite}-{slug}.json"
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
        _write(rows, {**meta, "finished": None}, out_dir, suite, slug)
        for r in new:
            ips = f"{r['images_per_s']:.1f} img/s" if r.get("status") == "ok" else r.get("status")
            nfe = "" if r.get("nfe") is None else f" NFE {r['nfe']:3d}"
            print(f"[{suite}] {mode:24s} batch {batch:4d}{nfe}: {ips}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if interrupted:
            break
    path = _write(rows, {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, out_dir, suite, slug)
    print(f"\n{caption(rows)}\n")
    print(markdown_table(rows))
    print("\nThe README's table:\n")
    print(readme_table(rows))
    print(f"\nrows: {path} and {path.with_suffix('.csv')}")
    if interrupted:
        return 130
    return 0 if all(r.get("status") == "ok" or str(r.get("status", "")).startswith("skipped") for r in rows) else 1


def _run_subprocess(spec: dict, timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "bench.model", "--worker", json.dumps(spec)]
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
