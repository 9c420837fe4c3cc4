"""The quality grid of ``python -m fastflow.evaluate``: planning and skipping by NFE budget, the summary, the
table, the list flags, the plot script, and one small end-to-end run on a freshly trained tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastflow.errors import UserError
from fastflow.evaluate import build_parser, markdown_table, plan_settings, summarize

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
PLOT = ROOT / "plot" / "quality.py"


def test_plan_by_nfe_budget_skips_what_does_not_fit():
    run, skipped = plan_settings(["euler", "rk4"], ["uniform"], [1.0, 2.0], nfes=[4, 8])
    steps = {(s["solver"], s["guidance"], s["nfe_budget"]): s["steps"] for s in run}
    assert steps == {
        ("euler", 1.0, 4): 4, ("euler", 1.0, 8): 8, ("rk4", 1.0, 4): 1, ("rk4", 1.0, 8): 2,
        ("euler", 2.0, 4): 2, ("euler", 2.0, 8): 4, ("rk4", 2.0, 8): 1,
    }  # fmt: skip
    assert [(s["solver"], s["guidance"], s["nfe_budget"]) for s in skipped] == [("rk4", 2.0, 4)]
    assert "8 NFE" in skipped[0]["reason"]


def test_plan_skips_a_budget_that_rounds_to_steps_already_planned():
    # midpoint costs 2 NFE a step: 8 and 9 NFE are both 4 steps; the row is run once, under the smaller budget
    run, skipped = plan_settings(["midpoint"], ["uniform"], [1.0], nfes=[8, 9, 10])
    assert [(s["nfe_budget"], s["steps"]) for s in run] == [(8, 4), (10, 5)]
    assert [(s["nfe_budget"], s["reason"]) for s in skipped] == [(9, "the same 4 steps as at 8 NFE")]


def test_plan_by_steps_and_defaults():
    run, skipped = plan_settings(["heun"], ["uniform", "quadratic"], [0.0], steps=[3, 5])
    assert [(s["grid"], s["steps"], s["nfe_budget"]) for s in run] == [
        ("uniform", 3, None),
        ("uniform", 5, None),
        ("quadratic", 3, None),
        ("quadratic", 5, None),
    ]
    assert skipped == []
    run, _ = plan_settings(["euler"], ["uniform"], [1.0])
    assert [s["steps"] for s in run] == [10]
    with pytest.raises(UserError):
        plan_settings(["euler"], ["uniform"], [1.0], nfes=[4], steps=[4])
    with pytest.raises(UserError):
        plan_settings(["euler"], ["uniform"], [1.0], nfes=[0])


def test_plan_with_guidance_intervals():
    run, skipped = plan_settings(["euler", "heun"], ["uniform"], [1.0, 2.0], nfes=[6], intervals=[None, (0.5, 1.0)])
    got = {
        (s["solver"], s["guidance"], None if s["guidance_interval"] is None else tuple(s["guidance_interval"])): s[
            "steps"
        ]
        for s in run
    }
    # w = 2 in [0.5, 1]: Euler's 4 steps cost 1 + 1 + 2 + 2 = 6 (guided everywhere: 3 steps); Heun's stages at t
    # and t + h: 2 steps cost (1 + 2) + (2 + 2) = 7 > 6, 1 step 1 + 2 = 3. w = 1 is planned once.
    assert got == {
        ("euler", 1.0, None): 6, ("heun", 1.0, None): 3,
        ("euler", 2.0, None): 3, ("heun", 2.0, None): 1,
        ("euler", 2.0, (0.5, 1.0)): 4, ("heun", 2.0, (0.5, 1.0)): 1,
    }  # fmt: skip
    assert skipped == []
    _, skipped = plan_settings(["rk4"], ["uniform"], [2.0], nfes=[4], intervals=[(0.0, 0.4)])
    # one RK4 step over [0, 1]: stages at 0 (in), .5, .5, 1 (out): 2 + 1 + 1 + 1
    assert [s["reason"] for s in skipped] == ["one rk4 step costs 5 NFE at guidance 2 [0,0.4] > 4"]


def test_list_flags_and_single_flags_both_parse():
    a = build_parser().parse_args(
        [
            "--solvers",
            "euler,midpoint,heun,rk4",
            "--nfe",
            "4,8,16",
            "--guidance",
            "0,1,2,4",
            "--grid",
            "uniform,quadratic",
        ]
    )
    assert a.solver == ["euler", "midpoint", "heun", "rk4"] and a.nfe == [4, 8, 16]
    assert a.guidance == [0.0, 1.0, 2.0, 4.0] and a.grid == ["uniform", "quadratic"]
    b = build_parser().parse_args(["--solver", "heun", "--steps", "5", "--guidance", "1.5"])
    assert b.solver == ["heun"] and b.steps == [5] and b.guidance == [1.5] and b.grid == ["uniform"]
    for bad in (["--solvers", "euler,leapfrog"], ["--nfe", "4,x"], ["--guidance", "nan"], ["--grid", "cubic"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def _row(solver, w, nfe, acc, fid, grid="uniform"):
    per = {str(d): acc for d in range(10)}
    per["3"] = acc - 0.01
    return {
        "solver": solver,
        "grid": grid,
        "guidance": w,
        "nfe_budget": nfe,
        "steps": nfe,
        "nfe": nfe,
        "accuracy": acc,
        "per_digit": per,
        "fid": fid,
    }


ROWS = [
    _row("euler", 1.0, 4, 0.90, 9.0),
    _row("euler", 1.0, 8, 0.96, 5.0),
    _row("heun", 2.0, 8, 0.995, 1.4),
    _row("heun", 2.0, 16, 0.998, 1.2),
    _row("rk4", 1.0, 16, 0.97, 1.1),
    _row("rk4", 4.0, 32, 0.999, 3.0),
]


def test_summary_answers_the_issue():
    s = summarize(ROWS, floor=1.0)
    assert (s["best_accuracy_nfe_le_10"]["solver"], s["best_accuracy_nfe_le_10"]["nfe"]) == ("heun", 8)
    assert s["best_fid_nfe_le_10"]["fid"] == 1.4
    assert (s["best_accuracy_nfe_le_20"]["solver"], s["best_accuracy_nfe_le_20"]["nfe"]) == ("heun", 16)
    assert s["best_fid_nfe_le_20"]["solver"] == "rk4"
    assert [(r["solver"], r["nfe"]) for r in s["aim_nfe_le_10"]] == [("heun", 8)]  # 99.5% and 1.4 ≤ 1.5 × 1.0
    assert summarize(ROWS, floor=0.9)["aim_nfe_le_10"] == []  # 1.4 > 1.35
    # 95% is first reached at 8 NFE (Euler 96%, Heun 99.5%): the fewest NFE, the higher accuracy among them
    assert (s["fewest_nfe_accuracy_95"]["solver"], s["fewest_nfe_accuracy_95"]["nfe"]) == ("heun", 8)


def _report(rows):
    return {
        "checkpoint": "model", "step": 10, "weights": "ema", "num_samples": 1000,
        "floor": {"fid": 1.0, "num_samples": 1000}, "reference": {"num_images": 10000},
        "results": rows,
        "skipped": [{"solver": "rk4", "grid": "uniform", "guidance": 2.0, "nfe_budget": 4, "reason": "one rk4 step costs 8 NFE at guidance 2 > 4"}],
    }  # fmt: skip


def test_markdown_table():
    t = markdown_table(_report(ROWS))
    lines = t.splitlines()
    assert lines[0].startswith("| solver | grid | w | steps | NFE | accuracy |")
    assert len([ln for ln in lines if ln.startswith("| ")]) == 1 + len(ROWS)
    assert "| heun | uniform | 2 | 8 | 8 | 99.50% | 3: 98.5% | 1.400 | 1.40 |" in lines
    assert "Floor: FID 1.000 for 1000 MNIST training images" in t and "Skipped: rk4/uniform w=2 at 4 NFE" in t
    iv = {**_row("euler", 2.0, 6, 0.99, 1.3), "steps": 4, "guidance_interval": [0.5, 1.0]}
    assert "| euler | uniform | 2 [0.5,1] | 4 | 6 | 99.00% |" in markdown_table(_report([iv]))


def test_plot_script_reads_the_json(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps(_report(ROWS + [_row("euler", 1.0, 8, 0.9, 6.0, grid="quadratic")])))
    out = tmp_path / "sub" / "q.png"
    subprocess.run(
        [sys.executable, str(PLOT), str(tmp_path / "q.json"), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint from ``fastflow.train --preset tiny`` (20 steps on 256 images) and a classifier trained
    for one epoch on 512 images (it judges badly; the point is the plumbing, not the numbers)."""
    if not all((DATA / "MNIST" / "raw" / f).exists() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")):
        pytest.skip(f"MNIST is not in {DATA} (run make setup)")
    from fastflow.classifier import load_or_train_classifier

    d = tmp_path_factory.mktemp("evalgrid")
    cmd = [sys.executable, "-m", "fastflow.train", *"--preset tiny --subset 256 --max-steps 20 --device cpu".split()]
    cmd += ["--model-dir", str(d / "model"), "--result-dir", str(d / "result"), "--data-root", str(DATA)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    load_or_train_classifier(DATA, d / "clf", verbose=False, subset=512, epochs=1)
    return d


ROW_FIELDS = {
    "solver",
    "grid",
    "guidance",
    "nfe_budget",
    "steps",
    "nfe",
    "accuracy",
    "per_digit",
    "fid",
    "fid_over_floor",
    "guidance_interval",
}
SUMMARY_FIELDS = {"best_accuracy_nfe_le_10", "best_fid_nfe_le_10", "best_accuracy_nfe_le_20", "aim_nfe_le_10"}


@pytest.mark.slow
def test_grid_end_to_end(tiny, capsys, monkeypatch):
    import fastflow.evaluate as ev

    out, png = tiny / "q.json", tiny / "plot" / "quality_vs_nfe.png"
    common = ["--checkpoint", str(tiny / "model"), "--classifier", str(tiny / "clf"), "--data-root", str(DATA)]
    common += ["--device", "cpu"]
    grid = "--solvers euler,heun,rk4 --nfe 2,4 --grid uniform,quadratic --num-samples 20".split()
    grid += ["--guidance-interval", "none"]  # guided at every stage: the costs below
    assert ev.main([*common, *grid, "--guidance", "1,2", "--out", str(out), "--plot", str(png)]) == 0
    rep = json.loads(out.read_text())
    assert rep["complete"] is True and rep["weights"] == "ema" and rep["num_samples"] == 20
    assert rep["floor"]["num_samples"] == 20 and rep["floor"]["fid"] > 0
    # a step costs: Euler 1 (w=1) or 2 (w=2), Heun 2 or 4, RK4 4 or 8; skipped where that exceeds the budget
    skipped = {(s["solver"], s["grid"], s["guidance"], s["nfe_budget"]) for s in rep["skipped"]}
    want_skipped = {
        (s, g, w, 2) for g in ("uniform", "quadratic") for s, w in (("rk4", 1.0), ("heun", 2.0), ("rk4", 2.0))
    }
    want_skipped |= {("rk4", g, 2.0, 4) for g in ("uniform", "quadratic")}
    assert skipped == want_skipped
    assert len(rep["results"]) == 3 * 2 * 2 * 2 - len(want_skipped)
    cost = {"euler": 1, "heun": 2, "rk4": 4}
    for r in rep["results"]:
        assert set(r) >= ROW_FIELDS
        assert r["nfe"] == r["steps"] * cost[r["solver"]] * (2 if r["guidance"] == 2.0 else 1) <= r["nfe_budget"]
        assert sorted(r["per_digit"]) == [str(d) for d in range(10)] and 0.0 <= r["accuracy"] <= 1.0
        assert r["fid"] > 0
    assert set(rep["summary"]) >= SUMMARY_FIELDS
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| solver | grid | w |" in printed and "Floor: FID" in printed

    # --resume with one more guidance scale: only the new settings are generated, the old rows are kept.
    ran = []
    real = ev.generate
    monkeypatch.setattr(
        ev, "generate", lambda draw, n, spec, **k: ran.append(spec.guidance) or real(draw, n, spec, **k)
    )
    assert ev.main([*common, *grid, "--guidance", "1,2,0", "--out", str(out), "--resume"]) == 0
    again = json.loads(out.read_text())
    assert ran and set(ran) == {0.0}
    assert [r for r in again["results"] if r["guidance"] != 0.0] == rep["results"]
    monkeypatch.setattr(ev, "generate", real)

    # A guidance interval: its cost is counted stage by stage, in chunks of 7 images.
    iv_out = tiny / "iv.json"
    args = "--solvers euler,heun --steps 4 --guidance 2 --guidance-interval none 0.5,1 --batch-size 7"
    assert ev.main([*common, *args.split(), "--num-samples", "20", "--out", str(iv_out)]) == 0
    iv = json.loads(iv_out.read_text())
    assert iv["batch_size"] == 7
    nfe = {(r["solver"], tuple(r["guidance_interval"] or ())): r["nfe"] for r in iv["results"]}
    # t = 0, .25, .5, .75: Euler 1 + 1 + 2 + 2; Heun's stages at t and t + h: 2 + 3 + 4 + 4
    assert nfe == {("euler", ()): 8, ("euler", (0.5, 1.0)): 6, ("heun", ()): 16, ("heun", (0.5, 1.0)): 13}

    # The same seed gives the same digits: a second run of one setting reproduces its row.
    one = tiny / "one.json"
    assert ev.main([*common, *"--solver rk4 --steps 1 --guidance 1 --num-samples 20 --out".split(), str(one)]) == 0
    single = json.loads(one.read_text())
    key = ("rk4", "uniform", 1.0, 4)
    same = next(r for r in rep["results"] if (r["solver"], r["grid"], r["guidance"], r["nfe_budget"]) == key)
    # one setting: its fields also sit at the top level, as single runs always reported them
    assert single["accuracy"] == same["accuracy"] and single["fid"] == pytest.approx(same["fid"], rel=1e-9)
    assert single["nfe"] == 4 and len(single["results"]) == 1


def test_quality_plot_draws_each_guidance_interval_and_meanflow_as_its_own_line(tmp_path, monkeypatch):
    import importlib.util

    import matplotlib.pyplot as plt

    spec = importlib.util.spec_from_file_location("plot_quality", PLOT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to look at its lines

    def row(solver, nfe, iv=None, w=2.0):
        return dict(solver=solver, grid="uniform", guidance=w, guidance_interval=iv, nfe=nfe, accuracy=0.9, fid=9.0)

    rows = [row("euler", 4), row("euler", 8), row("euler", 5, [0.2, 0.7]), row("euler", 10, [0.2, 0.7])]
    rows += [row("meanflow", 1, w=2.0), row("meanflow", 2, w=2.0)]
    report = dict(results=rows, floor=dict(fid=6.0), weights="ema", num_samples=10)
    quality.draw(report, tmp_path / "q.png")
    labels = sorted(line.get_label() for line in figs[0].axes[0].get_lines() if not line.get_label().startswith("_"))
    assert labels == ["euler", "euler, guided in [0.2, 0.7]", "meanflow"]
    xs = {line.get_label(): list(line.get_xdata()) for line in figs[0].axes[0].get_lines()}
    assert xs["euler"] == [4, 8] and xs["euler, guided in [0.2, 0.7]"] == [5, 10]


def test_quality_plot_merges_reports_of_two_models_and_refuses_what_does_not_compare(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_quality", PLOT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    def report(rows, n=10):
        return dict(results=rows, floor=dict(fid=6.0), weights="ema", num_samples=n, checkpoint="m", step=1)

    def row(solver, nfe, w=1.0):
        return dict(solver=solver, grid="uniform", guidance=w, guidance_interval=None, nfe=nfe, accuracy=0.9, fid=9.0)

    flow, mean = report([row("euler", 4), row("euler", 8)]), report([row("meanflow", 1), row("meanflow", 2)])
    merged = quality.merge([flow, mean])
    got = [(r["solver"], r["nfe"]) for r in merged["results"]]
    assert got == [("euler", 4), ("euler", 8), ("meanflow", 1), ("meanflow", 2)]
    with pytest.raises(SystemExit, match="not comparable"):
        quality.merge([flow, report([row("meanflow", 1)], n=20)])
    with pytest.raises(SystemExit, match="report 1 and report 2"):
        quality.merge([flow, report([row("euler", 8)])])
    assert quality.draw(merged, tmp_path / "q.png").stat().st_size > 0


def test_quality_plot_names_a_missing_report_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, str(PLOT), str(tmp_path / "nothing.json")], capture_output=True, text=True, cwd=tmp_path
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("quality.py: error: no such report:")
    assert "Traceback" not in p.stderr
