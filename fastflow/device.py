"""Resolve device and dtype once; autocast; synchronisation; memory figures."""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

from .errors import UserError

__all__ = [
    "resolve_device",
    "resolve_amp",
    "describe_amp",
    "cpu_bf16_probe",
    "autocast",
    "configure_backends",
    "synchronize",
    "peak_memory_mb",
    "reset_peak_memory",
    "device_name",
    "cpu_isa",
]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without CUDA is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA with bf16 support; on a CPU, bf16 where it
    both has native bf16 instructions (AVX-512 BF16 / AMX) and runs them fast, which is measured once per process
    (:func:`cpu_bf16_probe`): a CPU held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) still lists ``avx512_bf16`` in
    /proc/cpuinfo, and there bf16 autocast is emulated, 7× slower than fp32. fp32 elsewhere."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if not _cpu_has_bf16():
            return None
        fp32_s, bf16_s = cpu_bf16_probe()
        # 0.05x fp32's time natively, 35-42x held to AVX2 (cpu_bf16_probe): the threshold sits far from both.
        return torch.bfloat16 if bf16_s < 2.0 * fp32_s else None
    raise UserError(f"unknown --amp {amp!r}; choose auto, none or bf16")


_PROBE: tuple[float, float] | None = None
PROBE_ENV = "FASTFLOW_BF16_PROBE"  # "fp32_s,bf16_s": the --procs launcher's probe, so every rank picks alike


def cpu_bf16_probe() -> tuple[float, float]:
    """Seconds per 512×512×512 matmul in fp32 and in bf16, the fastest of 5 interleaved calls each after 2
    warm-up calls; measured once per process (a few ms; about 1 s where bf16 is emulated). Seen on the 2-core
    EPYC (AVX-512 BF16), under load from other jobs too: bf16 0.05x fp32's time; the same CPU held to AVX2
    (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``): 35-42x. (A single small convolution separated the two
    less well under load: 1.5-1.7x against 2.2x.)"""
    global _PROBE
    if _PROBE is None and os.environ.get(PROBE_ENV):  # a child of the --procs launcher: its parent measured
        fp32_s, bf16_s = (float(v) for v in os.environ[PROBE_ENV].split(","))
        _PROBE = (fp32_s, bf16_s)
    if _PROBE is None:
        import time

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
        a16, b16 = a.bfloat16(), b.bfloat16()

        def once(x: torch.Tensor, y: torch.Tensor) -> float:
            t = time.perf_counter()
            x @ y
            return time.perf_counter() - t

        for _ in range(2):  # warm-up: the BLAS builds its kernels, OpenMP starts its threads
            once(a, b), once(a16, b16)
        rounds = [(once(a, b), once(a16, b16)) for _ in range(5)]  # interleaved: load changes hit both alike
        _PROBE = (min(r[0] for r in rounds), min(r[1] for r in rounds))
    return _PROBE


def describe_amp(amp: str, dtype: torch.dtype | None, device: torch.device) -> str:
    """One line on the precision chosen and why (what the programs print at start)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    if amp != "auto" or device.type != "cpu":
        return name
    if not _cpu_has_bf16():
        return f"{name} (auto: this CPU has no bf16 instructions)"
    fp32_s, bf16_s = cpu_bf16_probe()
    return f"{name} (auto: a bf16 matmul took {bf16_s / fp32_s:.2g}x fp32's time here)"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the network; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device, tf32: bool) -> None:
    """Process-wide CUDA settings for a run: cuDNN autotuning on (the shapes are fixed, so each convolution is
    timed once) and TF32 for fp32 matmuls and convolutions as asked (an explicit choice: it changes fp32 results
    at the 1e-3 level; tests that compare fp32 numbers turn it off). Nothing to do on a CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_isa() -> str | None:
    """The vector ISA torch's CPU kernels run with here (``AVX512``, ``AVX2``, ...): what a CPU figure is quoted
    with. ``ATEN_CPU_CAPABILITY=avx2`` lowers it (and ``ONEDNN_MAX_CPU_ISA=AVX2`` the convolutions')."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        return None


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak that :func:`peak_memory_mb` reports again from now: torch's allocator peak on CUDA; on a CPU
    the process's peak RSS (ru_maxrss), through ``/proc/self/clear_refs`` where Linux has it (elsewhere the peak
    stays the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory since the start or the last :func:`reset_peak_memory`: torch's allocator peak and NVML's used
    memory on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        out = {"torch_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            out["nvml_used_mb"] = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
        except Exception:  # NVML is optional: a missing driver library just drops the figure
            pass
        return out
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
