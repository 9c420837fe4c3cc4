"""``python -m bench report``: the documents that carry measurements and flags, made from their sources.

- ``docs/results.md``: every table, from ``bench/results/*.json`` (each row names the machine and the vector ISA, or
  the GPU, it was measured on);
- the README's "at a glance" table (between ``<!-- glance -->`` markers), from the same files;
- docs/cpu_recipe.md's screening table (between ``<!-- screen -->`` markers), from ``recipe-*-avx2.json``;
- ``docs/cli.md``: every flag of every program, from the programs' own parsers.

A new measurement is a new result file and this command, never a number typed into a document:
``python -m bench report --check`` (and tests/bench/test_report.py) fails when a committed document differs from
what the command writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from fastflow.errors import ArgumentParser
from fastflow.io import atomic_write_text

from .harness import RESULTS, ROOT

__all__ = ["results_md", "documents", "main"]

GLANCE = ("<!-- glance: made by python -m bench report -->", "<!-- /glance -->")
SCREEN = ("<!-- screen: made by python -m bench report -->", "<!-- /screen -->")


def _load(name: str, results: Path) -> dict | None:
    p = results / name
    return json.loads(p.read_text()) if p.exists() else None


def _files(pattern: str, results: Path) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(results.glob(pattern))]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _machine(rows: list[dict]) -> str:
    """``AMD EPYC (2 threads), AVX2``: the distinct machines and ISAs of some rows."""
    seen = dict.fromkeys(
        ", ".join(v for v in (r.get("device_name"), r.get("isa") or r.get("cuda_capability")) if v)
        for r in rows
        if r.get("device_name")
    )
    return "; ".join(seen) or "machine not recorded"


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = "|" + "|".join("---" if a == "l" else "--:" for a in align) + "|"
    return "\n".join(["| " + " | ".join(head) + " |", sep] + ["| " + " | ".join(r) + " |" for r in rows])


# -- sections of docs/results.md ------------------------------------------------------------------------------


def recipe_section(results: Path) -> str:
    out = [
        "## Time to quality on a CPU (`make train`)",
        "",
        "Each row: the training command (the CPU default unless the caption says otherwise) in a fresh folder, then "
        "the judge: `fastflow.evaluate`, 1000 digits, 10 Euler steps, no guidance, noise seed 0, fp32, the project's "
        "classifier (`python -m bench recipe`). images/s is the mean of the training log's windows; seconds are the "
        "whole training command, start to exit.",
    ]
    files = _files("recipe-*.json", results)
    if not files:
        out += ["", "No recipe runs recorded."]
    for name, d in files:
        rows = sorted(d["rows"], key=lambda r: r["seed"])
        args = rows[0].get("train_args") or "(none)"
        m = rows[0].get("model", {})
        out += ["", f"`{name}`: {_machine(rows)}; model {'/'.join(map(str, m.get('channels', [])))} (patch "
                f"{m.get('patch')}), extra flags {args}", ""]  # fmt: skip
        body = [
            [str(r["seed"]), str(r["steps"]), f"{r['images_per_s']:.0f}", f"{r['command_s']:.0f}",
             _pct(r["accuracy"]), f"{r['fid']:.2f} ({r['fid_over_floor']:.2f}×)"]
            for r in rows
        ]  # fmt: skip
        if len(rows) > 1:

            def mean(k: str, rows=rows) -> float:
                return sum(r[k] for r in rows) / len(rows)

            body.append(
                ["**mean**", f"{mean('steps'):.0f}", f"{mean('images_per_s'):.0f}", f"{mean('command_s'):.0f}",
                 f"**{_pct(mean('accuracy'))}**", f"{mean('fid'):.2f} ({mean('fid_over_floor'):.2f}×)"]
            )  # fmt: skip
        out.append(_table(["seed", "steps", "images/s", "seconds", "accuracy", "FID (÷ floor)"], body))
    return "\n".join(out)


def _setting(r: dict) -> str:
    w, iv = r["guidance"], r.get("guidance_interval")
    g = "unguided" if w == 1.0 else f"w {w:g}" + (f" in [{iv[0]:g}, {iv[1]:g}]" if iv else " everywhere")
    return f"{r['solver']}, {r['grid']}, {g}"


def quality_section(results: Path) -> str:
    out = [
        "## Quality against compute",
        "",
        "Accuracy (the share of digits the project's classifier assigns to the digit asked for) and FID in that "
        "classifier's features, as a multiple of the floor (the FID of as many real training images), per sampler "
        "setting and NFE (`python -m fastflow.evaluate`). One table per result file.",
    ]
    for name, d in _files("quality-*.json", results):
        rs = d["results"]
        nfes = sorted({r["nfe"] for r in rs})
        settings = list(dict.fromkeys(_setting(r) for r in rs))
        cell = {(_setting(r), r["nfe"]): r for r in rs}
        amp = d.get("amp", "fp32")
        where = _machine([d]) if d.get("device_name") else "machine not recorded"
        out += ["", f"`{name}`: checkpoint `{Path(d['checkpoint']).name}` (step {d['step']}, {d['weights']} weights), "
                f"{d['num_samples']} digits, noise seed {d['seed']}, {amp}, floor FID {d['floor']['fid']:.2f}; "
                f"{where}", ""]  # fmt: skip
        body = []
        for s in settings:
            row = [s]
            for n in nfes:
                r = cell.get((s, n))
                row.append(f"{_pct(r['accuracy'])}, {r['fid_over_floor']:.2f}×" if r else "")
            body.append(row)
        out.append(_table(["setting", *[f"{n} NFE" for n in nfes]], body))
    return "\n".join(out)


def speed_section(results: Path) -> str:
    from .tables import caption, readme_table

    out = [
        "## Speed by mode",
        "",
        "`python -m bench train|sample`: images/s (the median over timed calls after warm-up) and, in parentheses, "
        "the peak memory, per mode and batch size. A train image is one image through a whole optimizer step "
        "(forward, backward, AdamW, EMA); a sample image is one finished image.",
    ]
    files = _files("train-*.json", results) + _files("sample-*.json", results)
    if not any(n.startswith("train-cuda") for n, _ in files):
        out += ["", "GPU rows: **not run on a GPU** (no GPU result file)."]
    for name, d in files:
        rows = d["rows"]
        out += ["", f"`{name}`: {caption(rows)}; {_machine(rows)}", "", readme_table(rows)]
    return "\n".join(out)


def kernels_section(results: Path) -> str:
    from .kernels import MNIST

    out = [
        "## Kernels",
        "",
        "`python -m bench kernels`: each op's bandwidth per provider at N = 128·784 elements (a batch of 128 "
        "images), fp32 storage. On a CPU the Triton kernels run only in Triton's interpreter (a test tool, not "
        "a provider), so the CPU rows are the reference math, eager and compiled.",
    ]
    for name, d in _files("kernels-*.json", results):
        rows = [r for r in d["rows"] if r.get("n") == 128 * MNIST]
        if not rows:
            continue
        provs = list(dict.fromkeys(r["provider"] for r in rows))
        body = []
        for op in dict.fromkeys(r["op"] for r in rows):
            cell = {r["provider"]: r for r in rows if r["op"] == op}
            body.append([op, str(next(iter(cell.values()))["bytes_per_element"])]
                        + [f"{cell[p]['gb_per_s']:.1f}" if p in cell else "" for p in provs])  # fmt: skip
        out += ["", f"`{name}`: {_machine(rows)}, torch {rows[0].get('torch')}", ""]
        out.append(_table(["op", "B/elem", *[f"{p} GB/s" for p in provs]], body))
    return "\n".join(out)


def aot_section(results: Path) -> str:
    from .aot import aot_section as section

    return section(results)


def roofline_section(results: Path) -> str:
    from .roofline import roofline_section as section

    return section(results)


def web_section(results: Path) -> str:
    from .web import markdown_table

    files = _files("web-*.json", results)
    out = [
        "## The web page",
        "",
        "`python -m bench web`: the exported sampler's time for the same digits in the demo page (onnxruntime-web, "
        "wasm, one thread, headless Chromium), in onnxruntime's Python CPU runtime and in `fastflow.sample`, in "
        "interleaved rounds (docs/export.md).",
    ]
    for name, d in files:
        out += ["", f"`{name}`:", "", markdown_table([d])]
    return "\n".join(out)


SECTIONS: list[Callable[[Path], str]] = [
    recipe_section, quality_section, speed_section, roofline_section, kernels_section, aot_section, web_section,
]  # fmt: skip


def results_md(results: Path = RESULTS) -> str:
    head = [
        "# Results",
        "",
        "Made by `python -m bench report` from `bench/results/*.json`: edit those files' commands, not this page "
        "(tests/bench/test_report.py fails when the two differ). Every figure names the machine and the vector ISA "
        "(or the GPU) it was measured on. How the defaults were chosen: [cpu_recipe.md](cpu_recipe.md), "
        "[meanflow.md](meanflow.md); runs of earlier defaults: [history.md](history.md).",
    ]
    return "\n\n".join(["\n".join(head), *(section(results) for section in SECTIONS)]) + "\n"


def _fill(path: Path, markers: tuple[str, str], block: str) -> str:
    """``path``'s text with ``block`` between its two marker lines."""
    text = path.read_text()
    start, end = text.index(markers[0]), text.index(markers[1])
    return text[: start + len(markers[0])] + "\n\n" + block + "\n\n" + text[end:]


def documents(results: Path = RESULTS, root: Path = ROOT) -> dict[Path, str]:
    """Each generated document's path and the text it should have (the README and docs/cpu_recipe.md: with their
    tables between markers)."""
    from . import cli_doc, glance

    return {
        root / "docs" / "results.md": results_md(results),
        root / "docs" / "cli.md": cli_doc.cli_md(),
        root / "README.md": _fill(root / "README.md", GLANCE, glance.glance_table(results)),
        root / "docs" / "cpu_recipe.md": _fill(root / "docs" / "cpu_recipe.md", SCREEN, glance.screen_table(results)),
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document differs (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stale = []
    for path, text in documents().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            atomic_write_text(path, text)
    verb = "differ from what python -m bench report writes" if args.check else "written"
    print(f"{', '.join(map(str, stale))}: {verb}" if stale else "up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
