"""The rows as text: :func:`roofline_table` (every term of every row), :func:`measured_table` (bound against
measurement), :func:`roofline_section` (docs/results.md: one compact table per result file), and the CPU probe's
and the default CPU step's lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .model import MEMORY_HELD_BACK

__all__ = ["si", "roofline_table", "measured_table", "compact_table", "roofline_section", "probe_lines", "step_lines"]


def si(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _md(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _us(x: float | None) -> str:
    return "–" if x is None else f"{1e6 * x:.1f}"


def _measured_cell(r: dict) -> tuple[str, str]:
    ms = r.get("measured") or []
    if not ms:
        return "", ""
    if r["kind"] == "sample":
        vals = "; ".join(f"{m['images_per_s']:,.0f} @{m['nfe']}NFE" for m in ms)
    else:
        vals = "; ".join(
            f"{m['images_per_s']:,.0f}"
            + (f" ({m['mode']})" if len(ms) > 1 else "")
            + (f", peak {m['peak_over_estimate']:.2f}x the memory estimate" if m.get("peak_over_estimate") else "")
            for m in ms
        )
    return vals, "; ".join(f"{m['ratio']:.2f}" for m in ms)


def roofline_table(rows: list[dict]) -> str:
    """The rows as markdown: a train table (per step) and a sampler table (per network evaluation), each row its
    FLOPs, least bytes, launches (and on a GPU kernels), the times, the bound and the limit that binds; measured images/s and
    measured ÷ bound where rows were joined. Predicted figures are labelled as predictions."""
    out = []
    measured = any(r.get("measured") for r in rows)
    floor = any(r.get("kernel_s") for r in rows)  # the GPU's floor per kernel: GPU rows only
    for kind in ("train", "sample"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        pred, where = mine[0].get("prediction"), str(mine[0].get("counted_on", "cpu"))
        what = "train step" if kind == "train" else "sampler evaluation (one forward at batch B; guided: 2B)"
        label = ""
        if pred:
            label = (
                " (a prediction: not run on a GPU)"
                if where == "cpu"
                else f" (a bound, its launches counted on {where}; a prediction unless measured)"
            )
        out.append(f"**{what}** on {mine[0]['device_name']}{label}")
        out.append("")
        head = ["preset", "batch", "amp", "mode", "GFLOP", "least MB", "launches", "compute ms", "memory ms",
                "launch ms"] + ["kernels", "kernel ms"] * floor  # fmt: skip
        head += ["bound img/s" if kind == "train" else "bound img·NFE/s", "binds"]
        head += ["epoch s"] if kind == "train" else []
        head += ["measured", "measured ÷ bound"] if measured else []
        out += [_md(head), "|" + "---|" * 4 + "--:|" * (len(head) - 4)]
        for r in mine:
            cells = [
                r["preset"], f"{r['batch']}{'*' if r.get('largest_fit') else ''}", r["amp"], r["mode"],
                _num(r["flops"] / 1e9), _num(r["bytes"] / 1e6), f"{r['launches']:.0f}", _num(1e3 * r["t_compute_s"]),
                _num(1e3 * r["t_memory_s"]), _num(1e3 * r["t_launch_s"]),
            ] + [f"{r['kernels']:.0f}", _num(1e3 * r["t_kernel_s"])] * floor  # fmt: skip
            cells += [f"{r['bound_images_per_s']:,.0f}", r["binds"]]
            cells += [_num(r["epoch_s"])] if kind == "train" else []
            cells += list(_measured_cell(r)) if measured else []
            out.append(_md(cells))
        out.append("")
    notes = []
    if any(r.get("largest_fit") for r in rows):
        fits = {(r["preset"], r["amp"], r["batch"], r["memory_estimate_bytes"], r["device_memory_bytes"])
                for r in rows if r.get("largest_fit")}  # fmt: skip
        for p, a, b, est, mem in sorted(fits):
            notes.append(
                f"- \\* {p}, {a}: batch {b} is the largest power of two whose memory estimate fits (an estimate: "
                f"{est / 1e9:.1f} GB of weights, gradients, AdamW, EMA, saved activations and inputs, within "
                f"{100 * (1 - MEMORY_HELD_BACK):.0f}% of {mem / 1e9:.0f} GB)"
            )
    srcs = sorted({f"{r['mode']}: {r['launch_source']}" for r in rows if r["kind"] == "train"})
    notes.append("- launches, " + "; ".join(srcs))
    if floor:
        srcs = sorted({f"{r['mode']}: {r['kernel_source']}" for r in rows if r["kind"] == "train"})
        notes.append(
            f"- kernels ({1e6 * rows[0]['kernel_s']:.1f} us each on the GPU, an assumption), " + "; ".join(srcs)
        )
    return "\n".join(out + notes)


def probe_lines(probe: dict) -> list[str]:
    m, th = probe["measured"], probe["theoretical_per_thread"]
    n = probe["threads"]
    lines = [
        f"CPU: {probe['cpu']}, {probe['cores']} cores, {probe['mhz']} MHz (/proc/cpuinfo), torch ISA {probe['isa']}"
        + (f", ONEDNN_MAX_CPU_ISA={probe['onednn_max_cpu_isa']}" if probe["onednn_max_cpu_isa"] else "")
        + f", avx512_bf16 {'listed' if probe['avx512_bf16'] else 'absent'}; probe with {n} thread{'s' * (n > 1)}"
        + (" (--quick-probe: small shapes, few calls)" if probe["quick"] else ""),
        f"theoretical per thread: {si(th['fp32'], 'FLOP/s')} fp32, "
        + (f"{si(th['bf16'], 'FLOP/s')} bf16" if th["bf16"] else "bf16 emulated")
        + f" ({probe['theoretical_rule']}); x{n} threads: {si(n * th['fp32'], 'FLOP/s')} fp32",
        f"the fastest probe implies a clock of at least {probe['implied_mhz']:.0f} MHz under that FMA model"
        + (
            " (above /proc/cpuinfo's: a VM sees the host's nominal clock, boost runs higher; shares of the "
            "theoretical peak over 100% mean that)"
            if probe["implied_mhz"] > (probe["mhz"] or 0)
            else ""
        ),
        "",
        "| probe | measured | library / implementation | share of theoretical |",
        "|---|--:|---|--:|",
    ]
    for k in ("conv_fp32", "gemm_fp32", "conv_bf16", "gemm_bf16"):
        prec = k.split("_")[1]
        theo = th[prec] * n if th[prec] else None
        share = f"{m[k]['flops'] / theo:.0%}" if theo else "– (emulated)"
        label = k.replace("_", " ") + ("" if m[k]["native"] else " (emulated)")
        lines.append(f"| {label} | {si(m[k]['flops'], 'FLOP/s')} | {m[k]['impl']} | {share} |")
    lines += [
        f"| copy bandwidth | {si(m['copy_bytes_per_s'], 'B/s')} | dst.copy_(src), read + write | |",
        f"| eager dispatch | {1e6 * m['dispatch_s']:.2f} us/op | one-element add | |",
        "",
        f"probed peak: {si(probe['peak']['fp32'], 'FLOP/s')} fp32, "
        + (f"{si(probe['peak']['bf16'], 'FLOP/s')} bf16" if probe["peak"]["bf16"] else "bf16 emulated (no peak)")
        + " (the best of the conv and GEMM probes)",
    ]
    return lines


def step_lines(step: dict) -> list[str]:
    return [
        f"default CPU train step (the cpu preset, eager, amp auto = {step['amp']}, batch {step['batch']}, "
        f"{step['threads']} thread: one of the default run's two single-thread processes at global batch 48, "
        "timed without the all-reduce between them):",
        f"  {1e3 * step['median_s']:.1f} ms a step (median of {step['iters']}; 20-80%: {1e3 * step['q20_s']:.1f}-"
        f"{1e3 * step['q80_s']:.1f} ms; process CPU time {1e3 * step['cpu_s']:.1f} ms; load average "
        f"{step['loadavg_1m']:.1f}: a shared CPU, noisy), {step['batch'] / step['median_s']:.0f} images/s, "
        f"{step['flops'] / 1e9:.3g} GFLOP counted (convolutions and matmuls)",
        f"  achieved {si(step['achieved_flops'], 'FLOP/s')} = {step['share_of_probed']:.1%} of the probed "
        f"{step['precision']} peak ({si(step['probed_peak'], 'FLOP/s')}), {step['share_of_conv_probe']:.1%} of the "
        f"{step['precision']} conv probe ({si(step['conv_probe'], 'FLOP/s')}), "
        + (
            f"{step['share_of_theoretical']:.1%} of the theoretical ({si(step['theoretical_peak'], 'FLOP/s')})"
            if step.get("theoretical_peak")
            else "no theoretical peak (emulated)"
        )
        + f"; on process CPU time {si(step['flops'] / step['cpu_s'], 'FLOP/s')} = "
        f"{step['flops'] / step['cpu_s'] / step['probed_peak']:.1%} of the probed peak",
        f"  one profiled step: {step['library_s'] / step['profiled_s']:.0%} of its {1e3 * step['profiled_s']:.1f} ms in "
        f"convolutions and matmuls, at {si(step['flops'] / step['library_s'], 'FLOP/s')} while there "
        f"({step['flops'] / step['library_s'] / step['probed_peak']:.0%} of the probed peak); the rest: "
        f"{step['eager_ops'] - step['library_calls']} other ops (GroupNorm, SiLU, elementwise, casts, AdamW, EMA)",
        f"  the roofline's bound for this step: {step['bound_images_per_s']:.0f} images/s ({step['binds']}-bound): "
        f"measured ÷ bound {step['batch'] / step['median_s'] / step['bound_images_per_s']:.2f}",
    ] + ([step["note"]] if step.get("note") else [])


def measured_table(rows: list[dict]) -> str:
    """Markdown, one line per measurement joined to a row: the bound (a prediction) and what binds it, the measured
    rate and measured ÷ bound, the measured step (or evaluation) time and the host CPU time in it, and the time per
    host launch and per GPU kernel that the measured step time implies. Empty without measurements."""
    mine = [(r, m) for r in rows for m in r.get("measured") or []]
    if not mine:
        return ""
    where = sorted({f"{m['device_name']} (torch {m['torch']})" for _, m in mine if m.get("device_name")})
    out = [
        f"**bound against measurement**: measured on {', '.join(where) or 'a GPU'}; the bound is a prediction "
        "(datasheet peaks, counts made on this CPU); µs per launch / kernel: the measured step time over the "
        "counted host launches / GPU kernels (what each would cost if they alone took the time)",
        "",
        _md(
            [
                "kind",
                "batch",
                "amp",
                "mode",
                "bound /s",
                "binds",
                "measured /s",
                "measured ÷ bound",
                "step ms",
                "host CPU ms",
                "launches",
                "µs per launch",
                "kernels",
                "µs per kernel",
            ]
        ),  # fmt: skip
        "|" + "---|" * 4 + "--:|---|" + "--:|" * 8,
    ]
    for r, m in mine:
        out.append(_md([
            r["kind"], r["batch"], r["amp"], r["mode"], f"{r['bound_images_per_s']:,.0f}", r["binds"],
            f"{m['images_per_s']:,.0f}" + (f" ({m['nfe']} NFE)" if m.get("nfe") else ""), f"{m['ratio']:.2f}",
            _num(1e3 * m["step_s"]), "–" if m["host_cpu_s"] is None else _num(1e3 * m["host_cpu_s"]),
            f"{r['launches']:.0f}", _us(m["per_launch_s"]), f"{r.get('kernels', 0):.0f}", _us(m["per_kernel_s"]),
        ]))  # fmt: skip
    return "\n".join(out)


def compact_table(doc: dict) -> str:
    """Markdown for docs/results.md. A file with measurements joined: one line per joined measurement (kind, batch,
    precision, mode, the bound and what binds it, measured, measured ÷ bound, and the µs per host launch and per GPU
    kernel the measured time implies). Otherwise one line per (kind, precision, mode) and one column per batch
    (``*``: the largest that fits), each cell the bound (images/s; a sample row: image evaluations/s) and what binds."""
    rows = doc["rows"]
    if any(r.get("measured") for r in rows):
        head = ["kind", "batch", "amp", "mode", "bound /s", "binds", "measured /s", "÷ bound", "µs per launch"]
        out = [_md(head + ["µs per kernel"]), "|" + "---|" * 4 + "--:|---|" + "--:|" * 4]
        for r in rows:
            for m in r.get("measured") or []:
                out.append(_md([
                    r["kind"], r["batch"], r["amp"], r["mode"], f"{r['bound_images_per_s']:,.0f}", r["binds"],
                    f"{m['images_per_s']:,.0f}", f"{m['ratio']:.2f}", _us(m.get("per_launch_s")),
                    _us(m.get("per_kernel_s")),
                ]))  # fmt: skip
        return "\n".join(out)
    batches = sorted({(r["batch"], bool(r.get("largest_fit"))) for r in rows})
    cols = [f"{b}{'*' if fit else ''}" for b, fit in batches]
    lines = list(dict.fromkeys((r["kind"], r["amp"], r["mode"]) for r in rows))
    cell = {(r["kind"], r["amp"], r["mode"], r["batch"]): r for r in rows}
    out = [_md(["kind", "amp", "mode", *cols]), "|" + "---|" * 3 + "--:|" * len(cols)]
    for kind, amp, mode in lines:
        vals = [cell.get((kind, amp, mode, b)) for b, _ in batches]
        out.append(_md([kind, amp, mode, *(f"{r['bound_images_per_s']:,.0f} {r['binds']}" if r else "" for r in vals)]))
    return "\n".join(out)


def _caption(name: str, doc: dict) -> str:
    peak, rows = doc.get("peak", {}), doc["rows"]
    if doc.get("device") == "cpu" or not rows or not rows[0].get("prediction"):
        what = f"this CPU's peaks measured by the probe ({peak.get('name', '?')}); eager steps"
    else:
        what = (
            f"a prediction for {peak.get('name', '?')} ({peak.get('source', 'datasheet')}), counted on "
            f"{rows[0].get('counted_on', 'cpu')}; {1e6 * peak.get('launch_s', 0):.1f} µs per host launch"
            + (f", {1e6 * peak['kernel_s']:.1f} µs per GPU kernel" if peak.get("kernel_s") else "")
            + " (assumptions)"
        )
    measured = sorted({m["file"].rsplit("/", 1)[-1] for r in rows for m in r.get("measured") or []})
    tail = (
        f"; joined to {', '.join(measured)}: the measured rows only (measured on the GPU; the bound, a prediction)"
        if measured
        else ""
    )
    return f"`{name}`: {what}; torch {doc.get('torch', '?')}{tail}"


def roofline_section(results: Path) -> str:
    """docs/results.md's section: for each ``results``/roofline-*.json its caption (what is predicted, what was
    measured, where) and :func:`compact_table`."""
    out = [
        "## Roofline: bounds on images/s",
        "",
        "`python -m bench roofline`: images/s at most, from the larger of four lower bounds on a step's time: its "
        "convolution and matmul FLOPs at peak, its least bytes at peak bandwidth, its host launches at an assumed "
        "cost each, and its GPU kernels one after another at an assumed floor each (a sample row: one network "
        "evaluation, per second of image evaluations). A GPU file is a prediction unless it says measured; `*`: "
        "the largest batch whose memory estimate fits.",
    ]
    files = sorted(Path(results).glob("roofline-*.json"))
    if not files:
        return "\n".join(out + ["", "No roofline runs recorded."])
    for p in files:
        doc = json.loads(p.read_text())
        out += ["", _caption(p.name, doc), "", compact_table(doc)]
    return "\n".join(out)
