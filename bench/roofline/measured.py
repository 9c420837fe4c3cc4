"""Bounds against measurements: the rows of bench result files (``python -m bench train|sample`` on a GPU) joined
to the roofline rows of the same preset, batch, precision and step mode, with what each measurement implies:
measured ÷ bound, the step's seconds, the host's CPU seconds in it, and per launch / per kernel the seconds that
step time spread over the counted launches (host) or kernels (GPU) comes to."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .counting import model_config

__all__ = ["bench_mode", "load_measured", "matches", "join_measured"]


def bench_mode(name: str) -> tuple[str, str] | None:
    """``(step mode, amp)`` of a bench row's mode (``compile-bf16-cudagraphs`` -> ``(cudagraphs, bf16)``), or None
    for the seed baseline (a different loop)."""
    if name.startswith("seed"):
        return None
    amp = "bf16" if "bf16" in name.split("-") else "none"
    mode = "cudagraphs" if "cudagraphs" in name else "compile" if name.startswith("compile") else "eager"
    return mode, amp


def load_measured(paths: Iterable[str]) -> list[dict]:
    """The ok rows of bench result files (``bench/results/train-*.json``, ``sample-*.json``), each with its file and
    the file's torch version."""
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data.get("rows", []):
            if r.get("status") == "ok" and r.get("suite") in ("train", "sample") and bench_mode(r.get("mode", "")):
                rows.append({**r, "file": str(p), "file_torch": data.get("torch")})
    return rows


def matches(pred: dict, m: dict) -> bool:
    mode, amp = bench_mode(m["mode"])
    channels = list(model_config(pred["preset"]).channels)
    return (
        m.get("preset") == pred["preset"]
        and (m.get("channels") is None or list(m["channels"]) == channels)
        and m["batch"] == pred["batch"]
        and (mode, amp) == (pred["mode"], pred["amp"])
        and m["suite"] == pred["kind"]
    )


def join_measured(rows: list[dict], measured: list[dict]) -> None:
    """Add ``measured`` to each row some measurement matches: per measurement its images/s (a sample row: image
    evaluations per second, images/s x NFE), ``ratio`` (measured ÷ bound), ``step_s`` (the measured seconds of one
    step or one evaluation), ``host_cpu_s`` (the host's CPU seconds in it, where the file has them), and
    ``per_launch_s`` / ``per_kernel_s``: ``step_s`` over the row's host launches / GPU kernels (what one of them
    would cost if they alone took the time: a launch-bound step's measured cost per launch)."""
    for r in rows:
        mine = [m for m in measured if matches(r, m)]
        if not mine:
            continue
        r["measured"] = []
        for m in mine:
            nfe = m.get("nfe") or 1
            ips = m["images_per_s"] * nfe if r["kind"] == "sample" else m["images_per_s"]
            step_s = r["batch"] / ips
            cpu = m.get("cpu_s")  # per call: a train step, or a whole sampling run of nfe evaluations
            host = cpu / nfe if cpu is not None and r["kind"] == "sample" else cpu
            peak_mb = m.get("torch_peak_mb")  # torch's allocator peak (CUDA): what the estimate estimates
            r["measured"].append({
                "mode": m["mode"], "nfe": m.get("nfe"), "images_per_s": ips, "ratio": ips / r["bound_images_per_s"],
                "step_s": step_s, "host_cpu_s": host,
                "per_launch_s": step_s / r["launches"] if r["launches"] > 1 else None,
                "per_kernel_s": step_s / r["kernels"] if r.get("kernels") else None,
                "device_name": m.get("device_name"), "torch": m.get("torch") or m.get("file_torch"),
                "torch_peak_mb": peak_mb,
                "peak_over_estimate": peak_mb * 2**20 / r["memory_estimate_bytes"] if peak_mb else None,
                "file": m["file"],
            })  # fmt: skip
