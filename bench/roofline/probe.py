"""Probes of this machine: the host's seconds per eager op, and for ``--device cpu`` this CPU's peaks (convolution
and GEMM FLOP/s through the libraries the step uses, copy bandwidth) next to the theoretical peak from ISA x FMA
units x clock, and the default CPU train step timed and profiled."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..harness import quantile
from .launches import LIBRARY, real_step
from .peaks import Peak

__all__ = [
    "CPU_STEP_BATCH",
    "dispatch_seconds",
    "memtotal",
    "theoretical_cpu_peak",
    "onednn_impl",
    "probe_cpu",
    "cpu_peak",
    "time_default_cpu_step",
]

CPU_STEP_BATCH = 24  # the default CPU run: global batch 48 over 2 single-thread processes (the cpu preset)


def _best(fn: Callable[[], object], reps: int, warmup: int = 1, sync: Callable[[], object] = lambda: None) -> float:
    """The fastest of ``reps`` timed calls (after ``warmup``): a peak, on a CPU others share."""
    for _ in range(warmup):
        fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def dispatch_seconds(device, n: int = 2000, rounds: int = 5) -> float:
    """Host seconds per eager op: ``torch.add(a, b, out=c)`` on one-element tensors, ``n`` back to back (no
    synchronisation inside a round), the median round. On CUDA: dispatch + launch as the host sees it, the least an
    eager kernel launch costs (a convolution's dispatch costs more)."""
    import torch

    a = torch.ones(1, device=device)
    b, c = a.clone(), a.clone()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    per = []
    for _ in range(rounds + 1):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(a, b, out=c)
        per.append((time.perf_counter() - t0) / n)
        sync()
    return statistics.median(per[1:])


def _cpuinfo() -> dict:
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


def memtotal() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def theoretical_cpu_peak(isa: str, vendor: str, family: int | None, flags: set, mhz: float) -> dict:
    """FLOP/s per core from ISA x FMA units x clock: 2 FLOP per FMA lane, 2 FMA pipes per core (Zen 2-5; Intel
    server cores with two AVX-512 FMA ports), lanes = the narrower of the ISA's vector width and the core's FMA
    datapath (AMD Zen 3 and Zen 4, families 25: 256 bits, so AVX-512 runs as two halves and peaks no higher
    than AVX2; Zen 5, family 26: 512) / 32 bits. bf16 (AVX-512 BF16's vdpbf16ps: two bf16 products summed into
    each fp32 lane): twice fp32, only where the ISA in use is AVX-512 and the CPU has avx512_bf16; elsewhere
    torch emulates bf16 (no peak). ``mhz``: /proc/cpuinfo's clock (a VM reports the host's nominal clock; boost
    may run higher)."""
    isa_bits = {"AVX512": 512, "AVX2": 256}.get(isa.upper(), 128)
    datapath = isa_bits
    if vendor == "AuthenticAMD" and family is not None:
        datapath = 512 if family >= 26 else 256 if family >= 23 else 128
    lanes = min(isa_bits, datapath) // 32
    fp32 = 2 * 2 * lanes  # FLOP per cycle
    bf16 = 2 * fp32 if isa_bits == 512 and "avx512_bf16" in flags else None
    hz = mhz * 1e6
    return {
        "fp32_flop_per_cycle": fp32,
        "bf16_flop_per_cycle": bf16,
        "fp32": fp32 * hz,
        "bf16": bf16 * hz if bf16 else None,
        "rule": f"2 FMA pipes x {lanes} fp32 lanes ({min(isa_bits, datapath)}-bit FMA of {isa}) x 2 FLOP x "
        f"{mhz:.0f} MHz" + (", bf16 2x (vdpbf16ps)" if bf16 else ", bf16 emulated"),
    }


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no libc
        pass


def onednn_impl(fn: Callable[[], object]) -> str:
    """The oneDNN implementation that runs ``fn()``'s convolution / matmul (``jit:avx2``,
    ``brg_conv_fwd:avx512_core_bf16``, ...), from oneDNN's verbose output, or ``not oneDNN`` when oneDNN ran
    none (MKL's GEMM, or torch's own fallback: bf16 where oneDNN has no bf16 ISA)."""
    import torch

    sys.stdout.flush()
    _flush_c_stdout()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
            _flush_c_stdout()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    impls = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[0] == "onednn_verbose" and "exec" in parts and parts[-1]:
            i = parts.index("exec")
            if i + 3 < len(parts) and parts[i + 2] in ("convolution", "matmul", "inner_product"):
                impls.append(parts[i + 3])
    return ", ".join(dict.fromkeys(impls)) or "not oneDNN"


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def probe_cpu(threads: int = 1, quick: bool = False) -> dict:
    """This CPU's peaks with ``threads`` threads, measured: a convolution (64 -> 64 channels, 3x3, 28x28: the
    original U-Net's widest level at full size) through oneDNN, as the step's convolutions run, in fp32 and in
    bf16; a square GEMM through ``torch.mm`` (fp32: MKL here, bf16: oneDNN); copy bandwidth (bytes read + written
    per second of ``dst.copy_(src)``); the eager per-op dispatch time. Each FLOP/s and GB/s is the fastest of a
    few calls (a shared CPU slows some). The peak of a precision is the best of its convolution and GEMM. Also the
    ISA torch's kernels use, oneDNN's implementation of each call, cores, clock and the theoretical peak."""
    import torch
    import torch.nn.functional as F

    info = _cpuinfo()
    isa = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    isa_used = "AVX2" if cap.upper().startswith("AVX2") or isa.upper() == "AVX2" else isa
    theo = theoretical_cpu_peak(isa_used, info["vendor"], info["family"], info["flags"], info["mhz"] or 0.0)
    reps = 2 if quick else 5
    n, side, c, mm = (2, 14, 32, 256) if quick else (16, 28, 64, 1024)
    out = {
        "cpu": info["model"], "isa": isa, "onednn_max_cpu_isa": cap or None, "threads": threads,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mhz": info["mhz"], "avx512_bf16": "avx512_bf16" in info["flags"],
        "theoretical_per_thread": {k: theo[k] for k in ("fp32", "bf16")}, "theoretical_rule": theo["rule"],
        "quick": quick, "measured": {},
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with _threads(threads), torch.no_grad():
        x = torch.randn(n, c, side, side, generator=g)
        w = torch.randn(c, c, 3, 3, generator=g) * 0.05
        a = torch.randn(mm, mm, generator=g)
        conv_flops = 2 * n * c * c * 9 * side * side
        for dtype in ("fp32", "bf16"):
            xd, wd, ad = (x, w, a) if dtype == "fp32" else (x.bfloat16(), w.bfloat16(), a.bfloat16())
            conv = lambda xd=xd, wd=wd: F.conv2d(xd, wd, padding=1)  # noqa: E731
            gemm = lambda ad=ad: ad @ ad  # noqa: E731
            impl_conv, impl_gemm = onednn_impl(conv), onednn_impl(gemm)
            native = dtype == "fp32" or "bf16" in impl_conv
            r = 2 if native else 1  # emulated bf16 is tens of times slower: one call says so
            tc, tg = _best(conv, r if not native else reps), _best(gemm, r if not native else reps)
            out["measured"][f"conv_{dtype}"] = {"flops": conv_flops / tc, "impl": impl_conv, "native": native}
            out["measured"][f"gemm_{dtype}"] = {
                "flops": 2 * mm**3 / tg, "impl": impl_gemm if impl_gemm != "not oneDNN" else "not oneDNN (MKL)"
                if dtype == "fp32" else "not oneDNN (torch fallback)", "native": native,
            }  # fmt: skip
        nbytes = (8 if quick else 64) * 2**20
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        tcopy = _best(lambda: dst.copy_(src), reps)
        out["measured"]["copy_bytes_per_s"] = 2 * nbytes / tcopy
        out["measured"]["dispatch_s"] = dispatch_seconds(torch.device("cpu"), n=500 if quick else 2000)
    m = out["measured"]
    peak = {"fp32": max(m["conv_fp32"]["flops"], m["gemm_fp32"]["flops"])}
    peak["bf16"] = max(m["conv_bf16"]["flops"], m["gemm_bf16"]["flops"]) if m["conv_bf16"]["native"] else None
    out["peak"] = peak
    # The clock the probes imply under the FMA model: no core does more FLOP a cycle than the model allows.
    per_cycle = [(peak["fp32"], theo["fp32_flop_per_cycle"]), (peak["bf16"], theo["bf16_flop_per_cycle"])]
    out["implied_mhz"] = max(f / (c * threads) / 1e6 for f, c in per_cycle if f and c)
    return out


def cpu_peak(probe: dict, memory: float | None) -> Peak:
    """The :class:`Peak` of this CPU from :func:`probe_cpu` (emulated bf16: its measured rate, marked)."""
    m = probe["measured"]
    flops = {"fp32": probe["peak"]["fp32"], "tf32": probe["peak"]["fp32"]}
    flops["bf16"] = probe["peak"]["bf16"] or max(m["conv_bf16"]["flops"], m["gemm_bf16"]["flops"])
    return Peak(
        f"{probe['cpu']} ({probe['isa']}, {probe['threads']} thread{'s' if probe['threads'] > 1 else ''})",
        flops, m["copy_bytes_per_s"], memory or 0.0, m["dispatch_s"],
        "measured by this probe", "measured: eager dispatch of a one-element add on this CPU",
    )  # fmt: skip


def time_default_cpu_step(batch: int = CPU_STEP_BATCH, threads: int = 1, warmup: int = 3, iters: int = 30) -> dict:
    """The default CPU train step as training runs it: the ``cpu`` preset, eager, ``--amp auto`` (bf16 where this
    CPU runs it natively, fp32 held to AVX2), ``batch`` images in ``threads`` threads: one of the default run's two
    single-thread processes at global batch 48 (without the gradient all-reduce between them). Seconds per step:
    median and 20/80% quantiles of ``iters`` calls after ``warmup``, and the median process CPU seconds. Then one
    profiled step: ``library_s``, its seconds inside convolutions and matmuls (:data:`LIBRARY`, with all they run
    beneath them), of ``profiled_s`` (the profiler's own cost per op inflates the rest a little)."""
    import torch

    from fastflow.device import resolve_amp

    cpu = torch.device("cpu")
    amp = "bf16" if resolve_amp("auto", cpu) == torch.bfloat16 else "none"
    with _threads(threads):
        _, run, (z, y, t, eps) = real_step("cpu", amp, cpu, batch)
        for _ in range(warmup):
            run(z, y, t, eps)
        times, cpu_times = [], []
        for _ in range(iters):
            t0, c0 = time.perf_counter(), time.process_time()
            run(z, y, t, eps)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:  # where the time goes: one more step
            t0 = time.perf_counter()
            run(z, y, t, eps)
            profiled_s = time.perf_counter() - t0
    library_s = sum(e.cpu_time_total for e in prof.events() if e.name in LIBRARY) / 1e6  # they do not nest
    return {"preset": "cpu", "batch": batch, "threads": threads, "amp": amp, "iters": iters,
            "median_s": statistics.median(times), "q20_s": quantile(times, 0.2), "q80_s": quantile(times, 0.8),
            "cpu_s": statistics.median(cpu_times), "loadavg_1m": os.getloadavg()[0],
            "profiled_s": profiled_s, "library_s": library_s}  # fmt: skip
