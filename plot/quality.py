"""Quality against NFE from ``python -m fastflow.evaluate --out REPORT.json``: one column per guidance scale w,
conditional accuracy on top and FID (log scale, with the floor and 1.5× the floor) below; one colour per solver,
solid for the uniform time grid and dashed for the others.

Reads only the JSON reports (plot/ imports nothing from the project). Several reports draw as one figure, e.g. a
flow-matching model's solvers beside a MeanFlow model's jumps, when they were judged alike (same number of digits,
so the same floor) and no setting appears in two of them:

    python plot/quality.py result/quality.json --out plot/quality_vs_nfe.png
    python plot/quality.py flow.json meanflow.json --out plot/quality_vs_nfe.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

SOLVER_ORDER = ("euler", "ab2", "midpoint", "heun", "rk4", "meanflow")
COLORS = {
    "euler": "tab:blue",
    "ab2": "tab:brown",
    "midpoint": "tab:orange",
    "heun": "tab:green",
    "rk4": "tab:red",
    "meanflow": "tab:purple",
}
STYLES = {"uniform": "-", "quadratic": "--"}
MARKERS = ("o", "s", "^", "v", "D", "P", "X")  # one per guidance interval (plain guidance: o)


def _interval(r: dict) -> tuple | None:
    """A row's guidance interval as (lo, hi), None when it guides at every stage (or has no such field)."""
    iv = r.get("guidance_interval")
    return tuple(iv) if iv else None


ROUND_NFE = (1, 2, 3, 4, 6, 8, 10, 16, 20, 32, 64, 128)


def _spaced(ticks: list[int], ratio: float = 1.2) -> list[int]:
    """The NFE ticks of a log axis: the round budgets among ``ticks`` (all of them if none is round), each at
    least ``ratio`` times the one before (8, 9, 10 or 15, 16, 18 would overlap)."""
    out: list[int] = []
    for t in [t for t in ticks if t in ROUND_NFE] or ticks:
        if not out or t >= ratio * out[-1]:
            out.append(t)
    return out


def _short(path: str) -> str:
    """A checkpoint path as its last two parts (runs/model), for the title."""
    return "/".join(Path(path).parts[-2:]) if path else ""


def _key(r: dict) -> tuple:
    return (r["solver"], r["grid"], r["guidance"], _interval(r), r["nfe"])


def merge(reports: list[dict]) -> dict:
    """One report from several: their results side by side, under the first one's floor. Refuses reports judged
    on different numbers of digits (their floors and FIDs are not comparable) and a setting reported twice (two
    models' points would be joined into one line)."""
    first = reports[0]
    seen: dict[tuple, int] = {}
    rows = []
    for i, rep in enumerate(reports):
        if rep["num_samples"] != first["num_samples"]:
            raise SystemExit(
                f"report {i + 1} judged {rep['num_samples']} digits per setting, report 1 {first['num_samples']}: "
                "FIDs at different N are not comparable"
            )
        for r in rep["results"]:
            k = _key(r)
            if k in seen:
                raise SystemExit(f"the setting {k} is in report {seen[k] + 1} and report {i + 1}: draw them apart")
            seen[k] = i
            rows.append(r)
    title = " + ".join(f"{_short(rep.get('checkpoint', ''))} (step {rep.get('step', '?')})" for rep in reports)
    return dict(first, results=rows, title=title)


def draw(report: dict, out: Path) -> Path:
    rows = report["results"]
    if not rows:
        raise SystemExit("the report has no results to draw")
    floor = report["floor"]["fid"]
    ws = sorted({r["guidance"] for r in rows})
    solvers = sorted({r["solver"] for r in rows}, key=lambda s: (SOLVER_ORDER.index(s) if s in SOLVER_ORDER else 99, s))
    grids = sorted({r["grid"] for r in rows}, key=lambda g: (g != "uniform", g))
    intervals = sorted({_interval(r) for r in rows}, key=lambda iv: (iv is not None, iv or ()))
    fig, axes = plt.subplots(
        2, len(ws), figsize=(3.4 * len(ws) + 0.6, 6.2), dpi=110, sharex=True, sharey="row", squeeze=False
    )
    for j, w in enumerate(ws):
        top, bottom = axes[0, j], axes[1, j]
        for solver in solvers:
            for grid in grids:
                for k, iv in enumerate(intervals):  # each guidance interval its own line, never joined to others
                    pts = sorted(
                        (r["nfe"], r["accuracy"], r["fid"])
                        for r in rows
                        if r["guidance"] == w and r["solver"] == solver and r["grid"] == grid and _interval(r) == iv
                    )
                    if not pts:
                        continue
                    nfe, acc, fid = zip(*pts)
                    marker = MARKERS[k % len(MARKERS)]
                    kw = dict(color=COLORS.get(solver), ls=STYLES.get(grid, ":"), marker=marker, ms=3, lw=1.3)
                    label = solver if len(grids) == 1 else f"{solver}, {grid}"
                    if iv is not None:
                        label += f", guided in [{iv[0]:g}, {iv[1]:g}]"
                    top.plot(nfe, [100 * a for a in acc], label=label, **kw)
                    bottom.plot(nfe, fid, **kw)
        top.axhline(99, color="gray", lw=0.8, ls=":")
        top.axhline(95, color="gray", lw=0.8, ls=":")
        bottom.axhline(floor, color="black", lw=1.0, ls="--", label=f"floor {floor:.2f}")
        bottom.axhline(1.5 * floor, color="gray", lw=0.8, ls=":", label="1.5× floor")
        top.set_title(f"guidance w = {w:g}")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(_spaced(sorted({r["nfe"] for r in rows})))
        bottom.xaxis.set_major_formatter(ticker.ScalarFormatter())
        bottom.xaxis.set_minor_locator(ticker.NullLocator())
        bottom.set_yscale("log")
        bottom.set_xlabel("NFE per image")
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("classified as asked (%)")
    axes[1, 0].set_ylabel("FID (classifier features)")
    labelled: dict = {}  # every column's lines in one legend (a solver may appear at one w only, e.g. meanflow)
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(lab, h)
    axes[0, -1].legend(list(labelled.values()), list(labelled), fontsize=7, loc="best")
    axes[1, -1].legend(fontsize=7, loc="upper right")
    title = report.get("title") or f"{_short(report.get('checkpoint', ''))} (step {report.get('step', '?')})"
    text = f"{title}, {report['weights']} weights, {report['num_samples']} samples per setting"
    fig.suptitle(textwrap.fill(text, 90), fontsize=9)  # several reports' names: wrapped, not cut at the edge
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw quality against NFE from a fastflow.evaluate JSON report.")
    p.add_argument("report", nargs="+", help="JSON written by python -m fastflow.evaluate --out (several: one figure)")
    p.add_argument("--out", default="plot/quality_vs_nfe.png", help="PNG to write (default: plot/quality_vs_nfe.png)")
    args = p.parse_args(argv)
    missing = [r for r in args.report if not Path(r).is_file()]
    if missing:
        p.error(f"no such report: {', '.join(missing)} (python -m fastflow.evaluate --out writes one)")
    report = merge([json.loads(Path(r).read_text()) for r in args.report])
    print(f"{len(report['results'])} settings -> {draw(report, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
