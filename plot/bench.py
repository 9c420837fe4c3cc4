"""Draw the benchmark rows: images/s and peak memory against batch size, one line per mode.

Reads only ``bench/results/<suite>-<device>.json`` (written by ``python -m bench train|sample``) and writes
``plot/bench_<device>_<suite>.png`` next to this script (or into ``--out DIR``).
Usage: ``python plot/bench.py [--out DIR] [RESULT.json ...]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench" / "results"
STYLE = {  # mode -> (colour, marker); modes not listed get matplotlib's cycle
    "seed-baseline": ("tab:gray", "x"),
    "eager-fp32": ("tab:blue", "o"),
    "eager-bf16": ("tab:cyan", "o"),
    "eager-bf16-channels-last": ("tab:green", "^"),
    "compile": ("tab:orange", "s"),
    "compile-bf16": ("tab:red", "s"),
    "compile-bf16-cudagraphs": ("tab:purple", "D"),
}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _memory(r: dict) -> tuple[float | None, str]:
    if r.get("torch_peak_mb") is not None:
        return r["torch_peak_mb"], "peak torch.cuda memory (MiB)"
    return r.get("peak_rss_mb"), "peak RSS of the process (MiB)"


def _lines(ax, rows: list[dict], key) -> None:
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["batch"], key(r)) for r in rows if r["mode"] == mode and key(r) is not None)
        if not pts:
            continue
        colour, marker = STYLE.get(mode, (None, "o"))
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=marker, color=colour, label=mode, lw=1.5, ms=5, ls="none" if len(xs) == 1 else "-")


def _batch_axis(ax, rows: list[dict]) -> None:
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.grid(alpha=0.3, which="both")


def draw(result: Path, out_dir: Path = HERE) -> Path | None:
    data = json.loads(result.read_text())
    rows = _ok(data["rows"])
    if not rows:
        print(f"{result}: no measured rows, nothing drawn", file=sys.stderr)
        return None
    suite = data["suite"]
    first = rows[0]
    widths = f" {tuple(first['channels'])}" if first.get("channels") else ""
    title = f"{suite}: {first['device_name']}, preset {first['preset']}{widths}, torch {first['torch']}"
    nfes = sorted({r["nfe"] for r in rows if r.get("nfe") is not None})
    panels = [(f"images/s at {n} NFE", lambda r, n=n: r["images_per_s"] if r.get("nfe") == n else None) for n in nfes]
    if not panels:
        panels = [("images/s (train step, median)", lambda r: r["images_per_s"])]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.8), dpi=110)
    for ax, (label, key) in zip(axes, panels):
        _lines(ax, rows, key)
        _batch_axis(ax, rows)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    mem_rows = [r for r in rows if r.get("nfe") in (None, nfes[-1] if nfes else None)]
    mem_label = _memory(rows[0])[1]
    _lines(axes[-1], mem_rows, lambda r: _memory(r)[0])
    _batch_axis(axes[-1], rows)
    axes[-1].set_ylabel(mem_label)
    axes[-1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    slug = result.stem.split("-", 1)[1] if "-" in result.stem else "unknown"
    out = out_dir / f"bench_{slug}_{suite}.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = HERE
    if "--out" in argv:  # --out DIR: write the PNGs there instead of plot/
        i = argv.index("--out")
        out_dir = Path(argv[i + 1])
        del argv[i : i + 2]
    files = [Path(a) for a in argv] or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no results in {RESULTS}; run: python -m bench train (or sample) first", file=sys.stderr)
        return 1
    for f in files:
        out = draw(f, out_dir)
        if out:
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
