"""The short tables ``python -m bench report`` writes into hand-written pages, between marker lines: the README's
"at a glance" table (one row per kind of result) and docs/cpu_recipe.md's screening table."""

from __future__ import annotations

from pathlib import Path

from .harness import RESULTS
from .report import _files, _machine, _pct, _setting, _table

__all__ = ["glance_table", "screen_table"]


def screen_table(results: Path = RESULTS) -> str:
    """docs/cpu_recipe.md's comparison: the default held to AVX2 against each screened variant
    (``recipe-screen-*-avx2.json``), seed by seed, with the means and the speed ratio."""
    files = _files("recipe-default-avx2.json", results) + _files("recipe-screen-*-avx2.json", results)
    if not files:
        return "No screening runs recorded."
    base = sum(r["images_per_s"] for r in files[0][1]["rows"]) / len(files[0][1]["rows"])
    body = []
    for name, d in files:
        rs = sorted(d["rows"], key=lambda r: r["seed"])
        m = rs[0]["model"]
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        ips = sum(r["images_per_s"] for r in rs) / len(rs)
        seeds = ", ".join(f"{r['seed']}: {_pct(r['accuracy'])}" for r in rs)
        body.append([f"`{name}`", "/".join(map(str, m["channels"])) + f", emb {m['emb_dim']}",
                     f"`{rs[0]['train_args']}`" if rs[0]["train_args"] else "(default)", seeds, f"**{_pct(acc)}**",
                     f"{ips:.0f}", f"{ips / base:.2f}×"])  # fmt: skip
    head = ["file", "widths", "extra flags", "accuracy by seed", "mean", "train img/s", "speed ÷ default"]
    return _table(head, body, "lllllrr") + f"\n\nAll rows: {_machine(files[0][1]['rows'])}, 300 s in 2 processes."


def glance_table(results: Path = RESULTS) -> str:
    """One row per kind of result: the CPU default's time to quality (``recipe-default-*``), quality against NFE,
    the one-jump MeanFlow model, speed by mode, the GPU, the web page."""
    rows = []
    for name, d in _files("recipe-default-*.json", results):
        rs = d["rows"]
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        ips = sum(r["images_per_s"] for r in rs) / len(rs)
        secs = max(r["command_s"] for r in rs)
        rows.append([f"`make train`'s training, `{name}`", f"{_pct(acc)} of digits right (mean of {len(rs)} seeds, "
                     f"10 Euler steps), {ips:.0f} train img/s, ≤ {secs:.0f} s", _machine(rs)])  # fmt: skip
    for name, d in _files("quality-*.json", results):
        rs, floor = d["results"], d["floor"]["fid"]
        flow = [r for r in rs if r["solver"] != "meanflow" and r["nfe"] <= 10]
        if flow:
            best = min(flow, key=lambda r: r["fid"])
            rows.append([f"[quality vs NFE](plot/quality_vs_nfe.png), `{name}`", f"best FID at ≤ 10 NFE: "
                         f"{_pct(best['accuracy'])}, {best['fid'] / floor:.2f}× the floor ({_setting(best)}, "
                         f"{best['nfe']} NFE)", _machine([d])])  # fmt: skip
        jumps = sorted((r for r in rs if r["solver"] == "meanflow"), key=lambda r: r["nfe"])
        if jumps:
            text = "; ".join(f"{r['nfe']} NFE {_pct(r['accuracy'])}, {r['fid'] / floor:.2f}× the floor" for r in jumps)
            rows.append([f"distilled MeanFlow, `{name}`", text, _machine([d])])
    rows += _speed_rows(results)
    rows += _gpu_rows(results)
    for name, d in _files("web-*.json", results):
        page = next((r for r in d["rows"] if r["runtime"].startswith("browser")), None)
        torch_1 = next((r for r in d["rows"] if "fastflow.sample" in r["runtime"] and "1 thread" in r["runtime"]), None)
        if page and torch_1:
            rows.append([f"the web page, `{name}`", f"{d['count']} digits ({d['sampler']}) in {page['median_ms']:.0f} ms "
                         f"in headless Chromium, {torch_1['median_ms']:.0f} ms in `fastflow.sample` (1 thread)",
                         f"{d['cpu']}, {d['isa']}"])  # fmt: skip
    return _table(["what", "result", "machine"], rows, "lll")


def _speed_rows(results: Path) -> list[list[str]]:
    """Per CPU bench file: images/s by mode at the default batch (train 48, sample 128 at 10 NFE)."""
    out = []
    for name, d in _files("train-cpu-*.json", results) + _files("sample-cpu-*.json", results):
        batch = 48 if d["suite"] == "train" else 128
        rs = [r for r in d["rows"] if r["batch"] == batch and r["status"] == "ok" and r.get("nfe") in (None, 10)]
        if rs:
            what = f"train step, batch {batch}" if d["suite"] == "train" else f"sampling, batch {batch}, 10 NFE"
            text = ", ".join(f"{r['mode']} {r['images_per_s']:.0f}" for r in rs) + " img/s"
            out.append([f"{what}, `{name}`", text, _machine(rs)])
    return out


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
            got = [(m["mode"], r["batch"], m["images_per_s"], m["ratio"]) for r in rs for m in r.get("measured", [])]
            text = "; ".join(
                f"{mode} at batch {b}: {ips:.0f} img/s ({ratio:.2f} of its bound)" for mode, b, ips, ratio in got
            )
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
