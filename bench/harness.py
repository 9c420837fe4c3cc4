"""What every bench suite shares: timing (per call on a CPU, CUDA-event windows on a GPU), the software and
machine a row was measured on, a fresh state between in-process rows, and the result files (JSON and CSV,
written atomically through fastflow.io after every row)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fastflow.io import atomic_write_text

__all__ = [
    "ROOT",
    "RESULTS",
    "measure",
    "quantile",
    "versions",
    "machine",
    "cpu_info",
    "torch_threads",
    "slug",
    "git_commit",
    "fresh_state",
    "write_rows",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def quantile(xs: list[float], q: float) -> float:
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
        "q20_s": quantile(times, 0.2),
        "q80_s": quantile(times, 0.8),
        "cpu_s": statistics.median(cpu),
        "compile_s": max(0.0, first - med),
        "recompiles_timed": counters["stats"]["unique_graphs"] - graphs_before,
        # graphs inductor took from its on-disk cache: then compile_s is a cache load, not a compilation
        "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "finite": finite,
        "timing": timing,
    }


def versions() -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover - platform
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def machine(device) -> dict:
    """The device's name, its vector ISA (CPU) or compute capability (CUDA), and the threads in use."""
    import torch

    from fastflow.device import cpu_isa, device_name

    out = {"device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["cuda_capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        out["isa"] = cpu_isa()
    return out


def cpu_info() -> dict:
    """This CPU from /proc/cpuinfo (the first processor's lines): ``model``, ``mhz``, ``flags`` (a set),
    ``vendor``, ``family``; empty values where the file is missing."""
    info = {"model": "", "mhz": None, "flags": set(), "vendor": "", "family": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "model name" and not info["model"]:
            info["model"] = v
        elif k == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(v)
        elif k == "flags" and not info["flags"]:
            info["flags"] = set(v.split())
        elif k == "vendor_id" and not info["vendor"]:
            info["vendor"] = v
        elif k == "cpu family" and info["family"] is None:
            info["family"] = int(v)
    return info


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (None: left as they are), restored after it."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def slug(device, tag: str = "") -> str:
    """The result files' device part: ``cpu``, or ``cuda-<gpu name>``; then ``-<tag>``."""
    import torch

    name = (
        "cpu"
        if device.type != "cuda"
        else "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    )
    return name + (f"-{tag}" if tag else "")


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            or None
        )
    except OSError:  # pragma: no cover - git missing
        return None


def fresh_state(device_type: str) -> None:
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


def write_rows(rows: list[dict], meta: dict, stem: Path, columns: list[str]) -> Path:
    """``<stem>.json`` (``meta`` and the rows) and ``<stem>.csv`` (the rows' ``columns``), each atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(stem.with_suffix(".json"), json.dumps({**meta, "rows": rows}, indent=1, default=str))
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    return stem.with_suffix(".json")
