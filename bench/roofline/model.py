"""The bound: images/s at most from the larger of four lower bounds on a step's time (compute at peak, the least
bytes at peak bandwidth, the host's launches, the GPU's kernels one after another), per step mode, and the rows
of a run: every (preset, batch, precision, mode) for the train step and for a sampler evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .counting import Counts, counts, model_config
from .launches import LaunchCount, step_launches
from .peaks import Peak, cuda_name

__all__ = [
    "TERMS",
    "EPOCH_IMAGES",
    "MEMORY_HELD_BACK",
    "bound",
    "peak_flops",
    "mode_launches",
    "mode_kernels",
    "largest_batch",
    "build_rows",
]

EPOCH_IMAGES = 60000  # MNIST's training set
MEMORY_HELD_BACK = 0.10  # share of device memory not planned for: allocator slack, workspaces, transients
TERMS = ("compute", "memory", "launches", "kernels")


def bound(
    batch: int,
    flops: float,
    nbytes: float,
    launches: float,
    peak_flops: float,
    bandwidth: float,
    launch_s: float,
    kernels: float = 0,
    kernel_s: float = 0.0,
) -> dict:
    """Images/s at most: ``batch / max(flops / peak_flops, nbytes / bandwidth, launches x launch_s, kernels x
    kernel_s)`` (seconds), and which term binds (``compute``, ``memory``, ``launches``: the host's, or
    ``kernels``: the GPU's floor per kernel, run one after another)."""
    t = {
        "compute": flops / peak_flops,
        "memory": nbytes / bandwidth,
        "launches": launches * launch_s,
        "kernels": kernels * kernel_s,
    }
    binds = max(TERMS, key=lambda k: t[k])
    return {
        "t_compute_s": t["compute"],
        "t_memory_s": t["memory"],
        "t_launch_s": t["launches"],
        "t_kernel_s": t["kernels"],
        "bound_s": t[binds],
        "bound_images_per_s": batch / t[binds] if t[binds] > 0 else math.inf,
        "binds": binds,
    }


def peak_flops(peak: Peak, amp: str, device_type: str) -> tuple[float, str]:
    """The FLOP/s a step's convolutions and matmuls can reach: bf16 under bf16 autocast; fp32 otherwise, which on a
    GPU runs on TF32 tensor cores (the trainer's default ``--tf32``)."""
    if amp == "bf16":
        return peak.flops["bf16"], "bf16"
    if device_type == "cuda":
        return peak.flops["tf32"], "tf32"
    return peak.flops["fp32"], "fp32"


def mode_launches(mode: str, eager: LaunchCount, compiled: LaunchCount | None, cpu: bool = False) -> tuple[float, str]:
    """The host launches (on a CPU, ``cpu``: the ops dispatched one by one) a step costs in ``mode`` and where the
    figure comes from. ``compiled``: the compiled step's kernels (each launched by the host without a graph)."""
    if mode == "eager":
        return (eager.ops, f"{eager.source}, ops") if cpu else (eager.launches, eager.source)
    if mode == "cudagraphs":
        return 1, "one graph launch"
    if compiled is not None:
        return compiled.launches, f"compiled step, {compiled.source}"
    return eager.library, "assumed: the eager step's conv/matmul library calls (a lower bound)"


def mode_kernels(mode: str, eager: LaunchCount, compiled: LaunchCount | None) -> tuple[float, str]:
    """The kernels the GPU runs one after another in a step of ``mode``, and where the figure comes from: the eager
    step's launches, or the compiled step's kernels (with or without a CUDA graph: the same kernels)."""
    if mode == "eager":
        return eager.launches, eager.source
    if compiled is not None:
        return compiled.launches, compiled.source
    return eager.library, "assumed: the eager step's conv/matmul library calls (a lower bound)"


def largest_batch(
    preset: str, amp: str, device_type: str, memory: float, known: Iterable[int] = ()
) -> tuple[int, Counts] | None:
    """The largest power-of-two batch whose memory estimate (:class:`Counts` ``memory_estimate``) stays within
    (1 − :data:`MEMORY_HELD_BACK`) of ``memory``: a linear fit of the estimate between two batches (the smallest
    and largest of ``known``, else 64 and 128), then counted at the batch itself and halved while it does not fit."""
    room = (1 - MEMORY_HELD_BACK) * memory
    known = sorted(set(known))
    b0, b1 = (known[0], known[-1]) if len(known) > 1 else (64, 128)
    lo, hi = counts(preset, b0, amp, device_type), counts(preset, b1, amp, device_type)
    per_image = (hi.memory_estimate - lo.memory_estimate) / (b1 - b0)
    fixed = lo.memory_estimate - b0 * per_image
    if per_image <= 0 or room <= fixed:
        return None
    b = 2 ** int(math.log2(max(1.0, (room - fixed) / per_image)))
    while b >= 1:
        c = counts(preset, b, amp, device_type)
        if c.memory_estimate <= room:
            return b, c
        b //= 2
    return None


def build_rows(
    device: str,
    peak: Peak,
    presets: list[str],
    batches: list[int],
    amps: list[str],
    modes: list[str],
    *,
    count_device,
    launch_batch: int = 2,
    compiled_counts=None,
    max_batch: bool = True,
) -> list[dict]:
    """Train and sampler rows for every (preset, batch, amp, mode); ``count_device``: where launches are counted
    (a CUDA device counts its own kernels). ``compiled_counts(preset, amp)``: ``(train, forward)``
    :class:`LaunchCount` of the compiled step, or None (then the compile rows assume the eager library calls).
    With ``max_batch`` each (preset, amp) gets rows at the largest batch whose memory estimate fits
    ``peak.memory``."""
    device_type = "cpu" if device == "cpu" else "cuda"
    rows = []
    for preset in presets:
        for amp in amps:
            sizes = [(b, False) for b in batches]
            fit = largest_batch(preset, amp, device_type, peak.memory, batches) if max_batch and peak.memory else None
            if fit and fit[0] not in batches:
                sizes.append((fit[0], True))
            need = compiled_counts is not None and ({"compile", "cudagraphs"} & set(modes))
            comp_train, comp_fwd = compiled_counts(preset, amp) if need else (None, None)
            for b, is_max in sizes:
                c = counts(preset, b, amp, device_type)
                # CUDA: counted at the row's batch (the largest-fit row: at the largest batch asked for, which
                # surely fits); a CPU's count does not depend on the batch.
                lb = (max(batches) if is_max else b) if count_device.type == "cuda" else launch_batch
                train_l, fwd_l = step_launches(preset, amp, count_device, lb)
                pf, precision = peak_flops(peak, amp, device_type)
                common = {
                    "device": device, "device_name": peak.name, "preset": preset,
                    "channels": list(model_config(preset).channels), "batch": b, "amp": amp, "precision": precision,
                    "largest_fit": is_max or (fit is not None and fit[0] == b), "params": c.params,
                    "memory_estimate_bytes": c.memory_estimate, "device_memory_bytes": peak.memory,
                    "saved_bytes": c.saved_bytes, "saved_by_dtype": c.saved_by_dtype, "peak_flops": pf,
                    "bandwidth": peak.bandwidth, "launch_s": peak.launch_s, "kernel_s": peak.kernel_s,
                    "prediction": device != "cpu",
                    "counted_on": str(count_device) if count_device.type == "cpu" else cuda_name(),
                }  # fmt: skip
                for mode in modes:
                    for kind, eager, comp in (("train", train_l, comp_train), ("sample", fwd_l, comp_fwd)):
                        n, src = mode_launches(mode, eager, comp, cpu=device == "cpu")
                        k, ksrc = mode_kernels(mode, eager, comp) if peak.kernel_s else (0, "")
                        r = {**common, "kind": kind, "mode": mode, "launches": n, "launch_source": src,
                             "kernels": k, "kernel_source": ksrc, "eager_launches": eager.launches,
                             "library_calls": eager.library}  # fmt: skip
                        if kind == "train":
                            r.update(flops=c.train_flops, bytes=c.train_bytes, bytes_parts=c.train_bytes_parts,
                                     eager_ops=eager.ops, flops_by_op=c.train_flops_by_op)  # fmt: skip
                        else:
                            r.update(flops=c.sample_flops, bytes=c.sample_bytes)
                        r.update(
                            bound(b, r["flops"], r["bytes"], n, pf, peak.bandwidth, peak.launch_s, k, peak.kernel_s)
                        )
                        if kind == "train":
                            r["epoch_s"] = EPOCH_IMAGES / r["bound_images_per_s"]
                        rows.append(r)
    return rows
