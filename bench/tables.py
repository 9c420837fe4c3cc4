"""The tables of train and sample rows: the full markdown table of a run, and the compact one (a mode per line,
a batch size per column) that docs/results.md shows; ``python -m bench tables FILE...`` prints them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .train_rows import MODES, TABLE_ORDER, Mode

__all__ = ["COLUMNS", "markdown_table", "caption", "readme_table", "main"]


COLUMNS = [
    "suite", "mode", "batch", "nfe", "images_per_s", "images_per_s_q20", "images_per_s_q80", "ms_per_step",
    "compile_s", "first_call_s", "fx_cache_hits", "images_per_cpu_s", "recompiles_timed", "peak_rss_mb", "torch_peak_mb",
    "nvml_used_mb", "loadavg_1m", "status", "preset", "channels", "emb_dim", "patch", "device", "device_name", "threads",
    "torch", "triton", "data", "loader", "timing", "isa", "start_allocated_mb",
]  # fmt: skip


def _fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: images/s median [q20–q80], ms per step, compile s, peak memory."""
    sample = any(r["suite"] == "sample" for r in rows)
    head = (
        ["mode", "batch"]
        + (["NFE"] if sample else [])
        + ["images/s", "q20–q80", "ms/step", "compile s", "peak MB", "note"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = r.get("torch_peak_mb")
        mem = f"{mem:.0f} (NVML {r['nvml_used_mb']:.0f})" if mem is not None and r.get("nvml_used_mb") else mem
        mem = mem if mem is not None else r.get("peak_rss_mb")
        ok = r.get("status") == "ok"
        cells = [r["mode"], str(r["batch"])] + ([_fmt(r.get("nfe"))] if sample else [])
        if ok:
            cells += [
                _fmt(r["images_per_s"]),
                f"{r['images_per_s_q20']:.1f}–{r['images_per_s_q80']:.1f}",
                _fmt(r["ms_per_step"]),
                _fmt(r["compile_s"]) if MODES.get(r["mode"], Mode()).compile else "–",
                mem if isinstance(mem, str) else _fmt(mem, 0),
                "; ".join(
                    ([f"{r['recompiles_timed']} recompiles while timed"] if r.get("recompiles_timed") else [])
                    + (["compile s: from inductor's disk cache"] if r.get("fx_cache_hits") else [])
                ),
            ]
        else:
            cells += ["–"] * 5 + [r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _peak_mib(r: dict) -> float | None:
    return r["torch_peak_mb"] if r.get("torch_peak_mb") is not None else r.get("peak_rss_mb")


def _md_row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def caption(rows: list[dict]) -> str:
    """One line naming what the rows were measured on: suite, device, versions, preset, data, timing."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return f"{rows[0]['suite'] if rows else '?'}: no measured rows"
    r = ok[0]
    data = f", data {r['data']}" if r.get("data") else ""
    return (
        f"{r['suite']} on {r.get('device_name')}, torch {r.get('torch')}, triton {r.get('triton')}, "
        f"preset {r.get('preset')} "
        f"({'/'.join(map(str, r.get('channels') or []))}){data}; timing: {r.get('timing', 'per call')}"
    )


def readme_table(rows: list[dict]) -> str:
    """The compact form of one suite's rows (docs/results.md's): a mode per line, a batch size per column, each cell images/s
    (sampling: at each NFE, ' / '-separated) and the peak memory in MiB in parentheses. An empty cell was not
    measured or skipped; failed and interrupted rows are listed under the table with their reason."""
    suite = rows[0]["suite"]
    ok = [r for r in rows if r.get("status") == "ok"]
    cuda = any(r.get("device") == "cuda" for r in ok)
    mem_name = "peak MiB, torch.cuda" if cuda else "peak RSS MiB"
    batches = sorted({r["batch"] for r in rows})
    shown = {r["mode"] for r in rows if not str(r.get("status", "")).startswith("skipped")}
    modes = [m for m in TABLE_ORDER if m in shown] + sorted(shown - set(TABLE_ORDER))
    nfes = sorted({r["nfe"] for r in ok if r.get("nfe") is not None})
    if suite == "sample":
        title = f"sample images/s at {' / '.join(map(str, nfes)) or '?'} NFE ({mem_name})"
    else:
        title = f"train images/s ({mem_name})"
    lines = [_md_row([title, *map(str, batches)]), "|---|" + "--:|" * len(batches)]
    notes = []
    for mode in modes:
        cells = []
        for b in batches:
            mine = [r for r in rows if r["mode"] == mode and r["batch"] == b]
            good = [r for r in mine if r.get("status") == "ok"]
            bad = [r for r in mine if r.get("status") != "ok" and not str(r.get("status", "")).startswith("skipped")]
            if good:
                if suite == "sample":
                    by_nfe = {r["nfe"]: r["images_per_s"] for r in good}
                    value = " / ".join(f"{by_nfe[n]:.1f}" if n in by_nfe else "–" for n in nfes)
                else:
                    value = f"{good[0]['images_per_s']:.1f}"
                peaks = [p for p in map(_peak_mib, good) if p is not None]
                cells.append(f"{value} ({max(peaks):.0f})" if peaks else value)
                left = max((r.get("start_allocated_mb") or 0.0) for r in good)
                if left >= 1.0:
                    notes.append(f"- {mode}, batch {b}: {left:.0f} MiB of earlier rows still allocated (in the peak)")
            elif bad:
                cut = str(bad[0].get("status", "")).startswith("interrupted")
                cells.append("not finished" if cut else "failed")
                notes.append(f"- {mode}, batch {b}: {bad[0].get('status')}")
            else:
                cells.append("")
        lines.append(_md_row([mode, *cells]))
    return "\n".join(lines + ([""] + notes if notes else []))


def main(paths: list[str]) -> int:
    """``python -m bench tables FILE.json ...``: each result file's caption and compact table."""
    if not paths:
        print("usage: python -m bench tables RESULT.json [...]", file=sys.stderr)
        return 2
    for i, p in enumerate(paths):
        try:
            rows = json.loads(Path(p).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {p}: not a bench result file ({type(e).__name__})", file=sys.stderr)
            return 1
        if not rows:
            print(f"{p}: no rows")
            continue
        print(("\n" if i else "") + caption(rows) + "\n")
        print(readme_table(rows))
    return 0
