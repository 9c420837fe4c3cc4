"""``python -m bench report``: the documents that carry measurements and flags, made from their sources.

- ``docs/results.md``: every table, from ``bench/results/*.json`` (each row names the machine and the vector ISA, or
  the GPU, it was measured on);
- the README's "at a glance" table (between ``<!-- glance -->`` markers), from the same files;
- ``docs/cli.md``: every flag of every program, from the programs' own parsers.

A new measurement is a new result file and this command, never a number typed into a document:
``python -m bench report --check`` (and tests/bench/test_report.py) fails when a committed document differs from
what the command writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from fastflow.errors import ArgumentParser
from fastflow.io import atomic_write_text

from .harness import RESULTS, ROOT

__all__ = ["results_md", "glance_table", "cli_md", "documents", "main"]

GLANCE = ("<!-- glance: made by python -m bench report -->", "<!-- /glance -->")


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


# -- the README's table ---------------------------------------------------------------------------------------


def glance_table(results: Path = RESULTS) -> str:
    rows = []
    for name, d in _files("recipe-*.json", results):
        rs = d["rows"]
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        ips = sum(r["images_per_s"] for r in rs) / len(rs)
        secs = max(r["command_s"] for r in rs)
        rows.append([f"`make train`, {name[len('recipe-'):-len('.json')]}", f"{_pct(acc)} of digits right (mean of "
                     f"{len(rs)} seeds), {ips:.0f} train img/s, ≤ {secs:.0f} s", _machine(rs)])  # fmt: skip
    for name, d in _files("quality-*.json", results):
        best = d.get("summary", {}).get("best_fid_nfe_le_10")
        if best:
            what = f"{_setting(best)}, {best['nfe']} NFE"
            rows.append([f"quality vs NFE, `{name}`", f"best FID at ≤ 10 NFE: {_pct(best['accuracy'])}, "
                         f"{best['fid'] / d['floor']['fid']:.2f}× the floor ({what})", _machine([d])])  # fmt: skip
    rows += _gpu_rows(results)
    for name, d in _files("web-*.json", results):
        page = next((r for r in d["rows"] if r["runtime"].startswith("browser")), None)
        torch_1 = next((r for r in d["rows"] if "fastflow.sample" in r["runtime"] and "1 thread" in r["runtime"]), None)
        if page and torch_1:
            rows.append([f"the web page, `{name}`", f"{d['count']} digits ({d['sampler']}) in {page['median_ms']:.0f} ms "
                         f"in headless Chromium, {torch_1['median_ms']:.0f} ms in `fastflow.sample` (1 thread)",
                         f"{d['cpu']}, {d['isa']}"])  # fmt: skip
    return _table(["what", "result", "machine"], rows, "lll")


def _gpu_rows(results: Path) -> list[list[str]]:
    """The default CUDA run (the original U-Net, batch 32, bf16) per roofline file: the bound in each mode and its
    time per epoch, the largest batch that fits; and what the GPU measured, against its bound."""
    out = []
    for name, d in _files("roofline-*.json", results):
        rs = [
            r
            for r in d["rows"]
            if r.get("kind") == "train" and r.get("preset") == "original" and r.get("amp") == "bf16"
        ]
        if not rs or d.get("device") == "cpu":
            continue
        if name.endswith("-measured.json"):
            got = [(m["mode"], m["images_per_s"], m["ratio"]) for r in rs for m in r.get("measured", [])]
            text = "; ".join(f"{mode} {ips:.0f} img/s ({ratio:.2f} of its bound)" for mode, ips, ratio in got)
            out.append([f"train step measured on a GPU, `{name}`", text, rs[0]["measured"][0]["device_name"]])
            continue
        at32 = {r["mode"]: r for r in rs if r["batch"] == 32 and not r.get("largest_fit")}
        modes = [m for m in ("eager", "compile", "cudagraphs") if m in at32]
        text = ", ".join(f"{m} {at32[m]['bound_images_per_s']:,.0f} img/s ({10 * at32[m]['epoch_s']:.0f} s for 10 "
                         f"epochs)" for m in modes)  # fmt: skip
        big = [r for r in rs if r.get("largest_fit")]
        if big:
            top = max(big, key=lambda r: r["bound_images_per_s"])
            text += f"; largest batch that fits, {top['batch']}: {top['bound_images_per_s']:,.0f} img/s"
        out.append([f"**prediction, not run on this GPU**: the default CUDA run (batch 32, bf16), `{name}`", text,
                    rs[0]["device_name"]])  # fmt: skip
    if not out:
        out.append(["GPU", "**not run on a GPU**", ""])
    return out


# -- docs/cli.md ------------------------------------------------------------------------------------------------


def _programs() -> list[tuple[str, argparse.ArgumentParser]]:
    from fastflow import evaluate, export, sample, train

    from . import aot, grid, kernels, recipe, roofline, web

    return [
        ("python -m fastflow.train", train.build_parser()),
        ("python -m fastflow.sample", sample.build_parser()),
        ("python -m fastflow.evaluate", evaluate.build_parser()),
        ("python -m fastflow.export", export.build_parser()),
        ("python -m bench train | sample", grid.build_parser("train")),
        ("python -m bench kernels", kernels.build_parser()),
        ("python -m bench recipe", recipe.build_parser()),
        ("python -m bench web", web.build_parser()),
        ("python -m bench aot", aot.build_parser()),
        ("python -m bench roofline", roofline.build_parser()),
        ("python -m bench report", build_parser()),
    ]


def _flag_cell(a: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in a.option_strings)
    if a.nargs == 0:
        return names
    value = "{" + ",".join(map(str, a.choices)) + "}" if a.choices else (a.metavar or a.dest.upper())
    return f"{names} {value}".replace("|", "\\|")


def cli_md() -> str:
    out = [
        "# Command-line reference",
        "",
        "Made by `python -m bench report` from the programs' own parsers (each flag is a field of a settings "
        "dataclass: fastflow/settings.py). `--help` prints the same.",
    ]
    for prog, parser in _programs():
        out += ["", f"## `{prog}`", "", parser.description or ""]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
            if not actions:
                continue
            body = [[_flag_cell(a), (a.help or "").replace("|", "\\|")] for a in actions]
            out += ["", f"**{group.title}**", "", _table(["flag", "what (default)"], body, "ll")]
    return "\n".join(out) + "\n"


def documents(results: Path = RESULTS, root: Path = ROOT) -> dict[Path, str]:
    """Each generated document's path and the text it should have (the README: with its glance table)."""
    readme = (root / "README.md").read_text()
    start, end = readme.index(GLANCE[0]), readme.index(GLANCE[1])
    readme = readme[: start + len(GLANCE[0])] + "\n\n" + glance_table(results) + "\n\n" + readme[end:]
    return {
        root / "docs" / "results.md": results_md(results),
        root / "docs" / "cli.md": cli_md(),
        root / "README.md": readme,
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
