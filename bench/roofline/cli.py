"""The command line of ``python -m bench roofline``: its settings (one field each, :func:`fastflow.settings.setting`)
and :func:`main`, which picks the peaks (a GPU's datasheet, or this CPU probed), counts, bounds, joins measurements
and writes the rows."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastflow.config import PRESETS
from fastflow.errors import ArgumentParser
from fastflow.io import atomic_write_json
from fastflow.settings import add_settings, setting

from ..harness import RESULTS
from .counting import counts
from .inductor import count_inductor_kernels
from .launches import LaunchCount, step_launches
from .measured import bench_mode, join_measured, load_measured
from .model import bound, build_rows, peak_flops
from .peaks import DEVICES, GPU_PEAKS, Peak, gpu_key
from .probe import cpu_peak, dispatch_seconds, memtotal, probe_cpu, time_default_cpu_step
from .tables import measured_table, probe_lines, roofline_table, si, step_lines

__all__ = ["RooflineSettings", "build_parser", "main"]

DEFAULT_BATCHES = (32, 128, 512, 2048)


@dataclass(frozen=True)
class RooflineSettings:
    """What to bound, against which peaks, and what to join."""

    preset: str = setting(
        "",
        f"comma-separated, from {', '.join(PRESETS)}",
        metavar="P,...",
        shown="original on a GPU, cpu for --device cpu",
    )
    batch_sizes: tuple[int, ...] = setting(DEFAULT_BATCHES, "batch sizes, one row each")
    device: str = setting(
        "a100", "the peaks to bound against: a GPU of the datasheet table, cpu (this machine, probed), or cuda (the "
        "GPU here, by name)", choices=DEVICES,
    )  # fmt: skip
    amp: str = setting(
        "auto", "bf16, none, or both comma-separated; auto: bf16 on a GPU, the CPU's --amp auto choice (bf16 where "
        "native) on cpu", metavar="AMP,...",
    )  # fmt: skip
    modes: str = setting(
        "", "from eager, compile, cudagraphs", metavar="M,...", shown="all three on a GPU, eager on cpu"
    )
    # A list of file names, space-separated (add_settings' list form: grid + spaced, with lists=True).
    measured: tuple[str, ...] | None = setting(
        None, "bench result files (train-*.json, sample-*.json) to join: measured ÷ bound, and the time per launch "
        "and per kernel the measurement implies", parse=str, metavar="RESULT.json", grid=True, spaced=True,
        shown="none",
    )  # fmt: skip
    out: str = setting(
        "",
        "rows as JSON (a folder: the default name in it)",
        metavar="FILE.json",
        shown="bench/results/roofline-<device>.json; with --measured -measured.json",
    )
    threads: int = setting(
        1, "cpu: threads of the probe and the bound (1: the default CPU run's processes have one)", metavar="N"
    )
    quick_probe: bool = setting(False, "cpu: a short probe and step timing (tests)")
    no_max_batch: bool = setting(False, "no rows at the largest batch that fits")
    count_compiled: bool = setting(
        False, "on a CUDA machine: count the compiled step's kernels by running it (compiles it: a minute or more)"
    )
    no_inductor_count: bool = setting(
        False, "compile and cudagraphs rows: assume the eager step's library calls instead of counting the kernels "
        "Inductor writes for CUDA on this CPU (a subprocess: a minute or more per preset and precision)",
    )  # fmt: skip
    launch_batch: int = setting(2, "batch of the CPU launch count (it does not depend on the batch)", metavar="N")


def build_parser() -> ArgumentParser:
    from . import __doc__ as doc

    p = ArgumentParser(prog="python -m bench roofline", description=doc.split("\n\n")[0].replace("``", "`"))
    add_settings(p.add_argument_group("roofline"), RooflineSettings, lists=True)
    return p


def _inductor_counts(batch: int):
    """``compiled_counts`` for :func:`build_rows`: Inductor's kernels for CUDA, generated on this CPU."""

    def get(preset: str, amp: str):
        try:
            c = count_inductor_kernels(preset, batch, amp)
        except Exception as e:  # said on stderr; the compile rows keep the assumed count
            print(f"warning: {e}; the compile rows assume the eager library calls", file=sys.stderr)
            return None, None
        src = f"Inductor's code for sm_90 written on this CPU at batch {batch} (an estimate, not run)"
        out = []
        for part in ("train", "forward"):
            k = c[part]
            lib = sum(k["extern"].values()) + k["fallback"].get("convolution_backward", 0)
            names = {"triton": k["triton"], **{f"extern {n}": v for n, v in k["extern"].items()}}
            names.update({f"aten {n}": v for n, v in k["fallback"].items()})
            out.append(LaunchCount(k["kernels"], k["kernels"], lib, names, src))
        return tuple(out)

    return get


def _cuda_counts(device, batch: int):
    def get(preset: str, amp: str):
        try:
            return step_launches(preset, amp, device, batch, compiled=True)
        except Exception:  # said on stderr by step_launches; the compile rows keep the assumed count
            return None, None

    return get


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "roofline":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    import torch

    from fastflow.device import resolve_amp

    on_cuda = torch.cuda.is_available()
    device = args.device
    if device == "cuda":
        if not on_cuda:
            print("error: --device cuda: no CUDA device here (name a GPU: a100, h200, ...)", file=sys.stderr)
            return 2
        device = gpu_key(torch.cuda.get_device_name())
        if device is None:
            print(f"error: no peaks for {torch.cuda.get_device_name()!r}; name one of {', '.join(GPU_PEAKS)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    gpu = device != "cpu"
    measured = load_measured(args.measured or [])
    presets = (args.preset or ("original" if gpu else "cpu")).split(",")
    presets += sorted({m["preset"] for m in measured if m.get("preset") in PRESETS} - set(presets))
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        print(f"error: unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    batches = sorted(set(args.batch_sizes) | {m["batch"] for m in measured})
    if args.amp == "auto":
        native = resolve_amp("auto", torch.device("cpu")) == torch.bfloat16
        amps = ["bf16"] if gpu or native else ["none"]
    else:
        amps = args.amp.split(",")
    amps += sorted({bench_mode(m["mode"])[1] for m in measured} - set(amps))
    modes = (args.modes or ("eager,compile,cudagraphs" if gpu else "eager")).split(",")
    if any(a not in ("bf16", "none") for a in amps) or any(m not in ("eager", "compile", "cudagraphs") for m in modes):
        print("error: --amp takes bf16, none; --modes eager, compile, cudagraphs", file=sys.stderr)
        return 2
    if not gpu and "cudagraphs" in modes:
        print("error: --device cpu: no CUDA graphs on a CPU (--modes eager,compile)", file=sys.stderr)
        return 2

    payload: dict = {"format": "fastflow-roofline-2", "device": device, "argv": argv, "torch": torch.__version__,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    lines: list[str] = []
    count_device = torch.device("cuda" if gpu and on_cuda else "cpu")
    if gpu:
        peak = GPU_PEAKS[device]
        if on_cuda:
            host = dispatch_seconds(count_device)
            peak = Peak(**{**asdict(peak), "launch_s": host,
                           "launch_source": f"measured on this host ({torch.cuda.get_device_name()}): eager "
                           f"dispatch + launch of a one-element add, {1e6 * host:.2f} us"})  # fmt: skip
        lines.append(f"device: {peak.name} ({peak.source}): {si(peak.flops['bf16'], 'FLOP/s')} bf16, "
                     f"{si(peak.flops['tf32'], 'FLOP/s')} tf32 (fp32 runs: --tf32 is the default), "
                     f"{si(peak.bandwidth, 'B/s')}, {peak.memory / 1e9:.0f} GB")  # fmt: skip
        lines.append(f"per eager launch: {1e6 * peak.launch_s:.2f} us ({peak.launch_source})")
        lines.append(f"per GPU kernel: {1e6 * peak.kernel_s:.2f} us ({peak.kernel_source})")
        here = dispatch_seconds(torch.device("cpu"), n=1000)
        lines.append(f"(this host's CPU dispatch of an eager op: {1e6 * here:.2f} us, a lower bound for a CUDA launch)")
        if not on_cuda:
            lines.append("every bound below is a prediction: not run on a GPU (counted on this CPU, fake tensors)")
    else:
        probe = probe_cpu(args.threads, args.quick_probe)
        peak = cpu_peak(probe, memtotal())
        payload["probe"] = probe
        lines += probe_lines(probe)
        lines.append(f"per op: {1e6 * peak.launch_s:.2f} us (eager dispatch, measured); memory "
                     f"{peak.memory / 1e9:.0f} GB (MemTotal); the rows are per process at {args.threads} "
                     "thread(s)")  # fmt: skip
    lines.append(f"launches counted on {count_device.type}: "
                 + ("the profiler's CUDA activity (kernels, memcpy, memset)" if count_device.type == "cuda"
                    else f"a CPU profile of one eager step at batch {args.launch_batch} "
                         "(count_launches' rule: a lower bound of CUDA's kernels)"))  # fmt: skip

    compiled = None
    if gpu and {"compile", "cudagraphs"} & set(modes):
        if count_device.type == "cuda" and args.count_compiled:
            compiled = _cuda_counts(count_device, min(batches))
        elif not args.no_inductor_count:
            compiled = _inductor_counts(min(batches))
    rows = build_rows(
        device, peak, presets, batches, amps, modes, count_device=count_device, launch_batch=args.launch_batch,
        compiled_counts=compiled, max_batch=gpu and not args.no_max_batch,
    )  # fmt: skip
    join_measured(rows, measured)
    if measured:
        payload["measured_files"] = {
            "files": list(args.measured),
            "measured": "rows[].measured[]: images_per_s, step_s, host_cpu_s, torch_peak_mb, measured on the GPU "
            "each names (device_name, torch); ratio, per_launch_s, per_kernel_s: derived from them and this file's "
            "counts",
            "predicted": "every other figure of a row (bound_*, t_*, flops, bytes, launches, kernels): a prediction "
            "from datasheet peaks and counts made on this machine",
        }
    payload["peak"] = asdict(peak)
    payload["rows"] = rows
    print("\n".join(lines))
    print()
    print(roofline_table(rows))
    if measured:
        print()
        print(measured_table(rows) or "(no measured row matches a bound row)")

    if not gpu and args.threads != 1:
        print("\n(the default CPU train step is timed with --threads 1 only: its processes run one thread each)")
    elif not gpu:
        payload["default_step"] = _cpu_step(args, peak, probe)
        print()
        print("\n".join(step_lines(payload["default_step"])))
    slug = device if gpu else f"cpu-{probe['isa'].lower()}"
    out = Path(args.out or RESULTS)
    if out.is_dir():
        out = out / f"roofline-{slug}{'-measured' if measured else ''}.json"
    payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out, payload)
    print(f"\nrows: {out}")
    return 0


def _cpu_step(args, peak: Peak, probe: dict) -> dict:
    """The default CPU train step timed, against the probed peaks and its own bound."""
    import torch

    step = time_default_cpu_step(threads=args.threads, warmup=1 if args.quick_probe else 3,
                                 iters=3 if args.quick_probe else 30)  # fmt: skip
    c = counts("cpu", step["batch"], step["amp"], "cpu")
    pf, precision = peak_flops(peak, step["amp"], "cpu")
    theo = probe["theoretical_per_thread"][precision if precision == "bf16" else "fp32"]
    train_l, _ = step_launches("cpu", step["amp"], torch.device("cpu"), args.launch_batch)
    b = bound(step["batch"], c.train_flops, c.train_bytes, train_l.ops, pf, peak.bandwidth, peak.launch_s)
    step.update(
        flops=c.train_flops, achieved_flops=c.train_flops / step["median_s"], precision=precision,
        probed_peak=pf, share_of_probed=c.train_flops / step["median_s"] / pf,
        theoretical_peak=theo * args.threads if theo else None,
        share_of_theoretical=c.train_flops / step["median_s"] / (theo * args.threads) if theo else None,
        eager_ops=train_l.ops, library_calls=train_l.library, conv_probe=probe["measured"][f"conv_{precision}"]["flops"], **b,
    )  # fmt: skip
    step["share_of_conv_probe"] = step["achieved_flops"] / step["conv_probe"]
    m = probe["measured"]
    if step["amp"] == "none" and m["conv_bf16"]["native"] and m["conv_bf16"]["flops"] > m["conv_fp32"]["flops"]:
        from fastflow.device import cpu_bf16_probe

        fp32_s, bf16_s = cpu_bf16_probe()
        step["note"] = (
            f"  note: --amp auto chose fp32 in this process (its matmul probe: bf16 {bf16_s / fp32_s:.2g}x fp32's "
            "time), though bf16 runs natively here and faster than fp32 (the conv probes above): a loaded CPU "
            "can tip that probe; training started now would run fp32 too"
        )
    return step
