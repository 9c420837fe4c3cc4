"""The rows as documents and verdicts: the one-line-per-variant table (:func:`aot_table`) and the page
docs/kernels-aot.md (:func:`write_doc`); the compact per kernel × target summary docs/results.md shows
(:func:`summary_table`, :func:`aot_section`); the JSON layout; and :func:`problems`, everything wrong with a run."""

from __future__ import annotations

import json
from pathlib import Path

from .compiling import PROBE_MAXNREG
from .targets import LIMITS, capability

__all__ = [
    "COMMAND",
    "label",
    "fmt_map",
    "fmt_spec",
    "aot_table",
    "summary_lines",
    "summary_table",
    "variant_id",
    "aot_section",
    "write_doc",
    "to_json",
    "problems",
]

COMMAND = "python -m bench aot --out bench/results/kernels-aot.json --doc docs/kernels-aot.md"


def fmt_map(d: dict, sep: str = " ") -> str:
    return sep.join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) or "–"


def fmt_spec(d: dict) -> str:
    return " ".join(f"{k}{v}" if v.startswith("=") else f"{k}:{v}" for k, v in d.items()) or "–"


def label(r: dict) -> str:
    """A row's variant and target in one line: ``kernels.path._flow_path_bwd_kernel HAS_GU=true ... | gx=fp32 ... |
    n:16 | sm_90``."""
    return " | ".join([*variant_id(r), r["target"]])


def variant_id(r: dict) -> tuple:
    return (r["kernel"], fmt_map(r["constexprs"]), fmt_map(r["dtypes"]), fmt_spec(r["specialization"]))


def aot_table(rows: list[dict]) -> str:
    """Markdown: one line per kernel × constexprs × dtypes × specialisation, per target its registers and spill
    stores/loads in bytes, then shared memory in bytes and warps (one value, or one per target where they
    differ). A target whose compile failed shows ``error``."""
    from ..report import _table  # not at the top: importing bench.report imports kernels (see __init__)

    targets = sorted({r["target"] for r in rows}, key=capability)
    head = ["kernel", "constexprs", "dtypes", "specialisation"]
    head += [f"regs {t}" for t in targets] + [f"spill st/ld B {t}" for t in targets] + ["smem B", "warps"]
    body = []
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault(variant_id(r), {})[r["target"]] = r
    for vid in sorted(cells):
        per = cells[vid]
        regs, spills, smem, warps = [], [], [], []
        for t in targets:
            r = per.get(t)
            if r is None or "error" in r:
                regs.append("error" if r else "–")
                spills.append("–")
                continue
            regs.append(str(r["registers"]))
            spills.append(f"{r['spill_stores_bytes']}/{r['spill_loads_bytes']}")
            smem.append(str(r["shared_bytes"]))
            warps.append(str(r["num_warps"]))
        one = [(" / ".join(x) if len(set(x)) > 1 else (x[0] if x else "–")) for x in (smem, warps)]
        name = vid[0].removeprefix("kernels.")
        body.append([f"`{name}`", *vid[1:], *regs, *spills, *one])
    return _table(head, body, "llll" + "r" * (len(head) - 4))


def summary_lines(doc: dict) -> str:
    """Markdown bullets: per target its variants, register range, spill bytes and most shared memory; each spill."""
    rows = [r for r in doc["rows"] if "error" not in r]
    lines = []
    for t in doc["targets"]:
        rt = [r for r in rows if r["target"] == t]
        if not rt:
            continue
        worst = max(rt, key=lambda r: r["registers"])
        spills = sum(r["spill_stores_bytes"] + r["spill_loads_bytes"] for r in rt)
        lines.append(
            f"- {t}: {len(rt)} variants, registers {min(r['registers'] for r in rt)}–{worst['registers']} "
            f"(most: `{worst['kernel'].removeprefix('kernels.')}`), spill bytes {spills}, "
            f"shared memory up to {max(r['shared_bytes'] for r in rt)} B"
        )
    for r in rows:
        if r["spill_stores_bytes"] or r["spill_loads_bytes"]:
            lines.append(
                f"- **spills**: {label(r)}: {r['registers']} registers, {r['spill_stores_bytes']} B spill stores, "
                f"{r['spill_loads_bytes']} B spill loads ({r['example_call']}, shapes {', '.join(r['shapes'])})"
            )
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def summary_table(doc: dict) -> str:
    """Markdown, one line per kernel × target: the variants compiled, registers per thread (min–max), the most
    dynamic shared memory in bytes, the warps per program, and the spill bytes (stores + loads, all variants);
    compile errors counted where there are any. The compact form of :func:`aot_table` (docs/results.md)."""
    from ..report import _table

    targets = sorted({r["target"] for r in doc["rows"]}, key=capability)
    kernels = list(dict.fromkeys(r["kernel"] for r in doc["rows"]))
    errors = any("error" in r for r in doc["rows"])
    head = ["kernel", "target", "variants", "registers", "smem B (max)", "warps", "spill B"] + ["errors"] * errors
    body = []
    for k in kernels:
        for t in targets:
            mine = [r for r in doc["rows"] if r["kernel"] == k and r["target"] == t]
            ok = [r for r in mine if "error" not in r]
            if not mine:
                continue
            cells = [f"`{k.removeprefix('kernels.')}`", t, str(len(mine))]
            if ok:
                cells += [
                    _span([r["registers"] for r in ok]),
                    str(max(r["shared_bytes"] for r in ok)),
                    ", ".join(str(w) for w in sorted({r["num_warps"] for r in ok})),
                    str(sum(r["spill_stores_bytes"] + r["spill_loads_bytes"] for r in ok)),
                ]
            else:
                cells += ["–"] * 4
            cells += [str(len(mine) - len(ok))] * errors
            body.append(cells)
    return _table(head, body, "ll" + "r" * (len(head) - 2))


def aot_section(results: Path) -> str:
    """docs/results.md's section: :func:`summary_table` of ``results``/kernels-aot.json, with what made it, or a
    line saying there is no such file."""
    out = [
        "## Triton kernels compiled for GPUs, without a GPU",
        "",
        "`python -m bench aot`: every kernel variant the public ops launch, compiled to a cubin for each target by "
        "Triton's own LLVM and ptxas on a CPU; registers, spills, shared memory and warps are ptxas' and the "
        "kernel's own figures (no kernel ran). One line per variant: [kernels-aot.md](kernels-aot.md).",
        "",
    ]
    path = Path(results) / "kernels-aot.json"
    if not path.exists():
        return "\n".join(out + ["No AOT table recorded."])
    doc = json.loads(path.read_text())
    out.append(
        f"`{path.name}`: Triton {doc['triton']}, ptxas {doc['ptxas']}, torch {doc['torch']}; "
        f"{doc['dtypes']} dtype cases over the shapes {', '.join(doc['shapes'])}"
    )
    return "\n".join(out + ["", summary_table(doc)])


def write_doc(doc: dict, path: Path) -> None:
    """The markdown page: how it was made, a summary per target, :func:`aot_table`."""
    text = f"""# Triton kernels compiled for real GPUs, without a GPU

Made by `{COMMAND}`
(how: the docstring of bench/aot/__init__.py). `tests/kernels/test_aot.py` compiles everything again and fails on a compile
error, on any register spill, on a resource past the target's limit, or when this table no longer matches what the
tool produces.

Triton {doc["triton"]}, ptxas {doc["ptxas"]}. One line per kernel variant the public ops launch: its constexprs, the
dtypes of its pointers, and Triton's specialisation of its ints (`n:16`: divisible by 16, `m=1`: the constant 1,
`–`: none); per target the registers per thread and the spill stores / loads in bytes; dynamic shared memory in
bytes and warps per program (one value where the targets agree).

{summary_lines(doc)}

{aot_table(doc["rows"])}
"""
    from fastflow.io import atomic_write_text

    atomic_write_text(path, text)


def to_json(doc: dict) -> str:
    """Indented, but one line per row: small, and a changed figure is a one-line diff."""
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1)
    rows = ",\n".join("  " + json.dumps(r) for r in doc["rows"])
    return head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def problems(doc: dict) -> list[str]:
    """Everything wrong with a run: compile errors, spills, limits exceeded, an inconsistent register count, an
    uncovered kernel. Empty when all is well."""
    out = []
    for r in doc["rows"]:
        where = label(r)
        if "error" in r:
            out.append(f"{where}: compile error: {r['error']}")
            continue
        lim = LIMITS.get(capability(r["target"]), LIMITS[90])
        if r["spill_stores_bytes"] or r["spill_loads_bytes"] or r["stack_frame_bytes"]:
            out.append(
                f"{where}: spills {r['spill_stores_bytes']} B stored, {r['spill_loads_bytes']} B loaded, "
                f"{r['stack_frame_bytes']} B stack frame"
            )
        if r["registers"] > lim["registers"] or r["registers"] * 32 * r["num_warps"] > lim["register_file"]:
            out.append(f"{where}: {r['registers']} registers x {r['num_warps']} warps exceed the limits {lim}")
        if r["shared_bytes"] > lim["shared"]:
            out.append(f"{where}: {r['shared_bytes']} B of shared memory > {lim['shared']}")
        if r["num_warps"] * 32 > lim["threads"]:
            out.append(f"{where}: {r['num_warps']} warps > {lim['threads']} threads")
        if (r["cubin_registers"], r["cubin_stack_bytes"]) != (r["registers"], r["stack_frame_bytes"]):
            out.append(
                f"{where}: ptxas' log says {r['registers']} registers / {r['stack_frame_bytes']} B stack but the "
                f"cubin has {r['cubin_registers']} / {r['cubin_stack_bytes']} B"
            )
        if r["cubin_sha256"] != r["ptxas_cubin_sha256"]:
            out.append(f"{where}: the cubin in Triton's cache is not the one the logged ptxas run wrote")
    for r in doc.get("spill_probe", []):
        if "error" in r or not (r["spill_stores_bytes"] and r["cubin_stack_bytes"] == r["stack_frame_bytes"]):
            out.append(f"the spill detector missed the spills of a kernel held to {PROBE_MAXNREG} registers: {r}")
    k = doc["kernels"]
    if k["uncovered"]:
        out.append(f"@triton.jit functions neither launched nor called by a launched kernel: {k['uncovered']}")
    return out
