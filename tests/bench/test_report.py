"""The documents that carry measurements and flags are what `python -m bench report` writes from their sources:
docs/results.md and the README's table from bench/results/*.json, docs/cli.md from the programs' parsers."""

from __future__ import annotations

import json

from bench import cli_doc, glance, report


def test_committed_documents_are_what_the_report_writes():
    stale = [str(path) for path, text in report.documents().items() if path.read_text() != text]
    assert not stale, f"{stale} differ from what `python -m bench report` writes: run it and commit the result"


def test_results_page_tables_come_from_the_files(tmp_path):
    """A recipe file and a quality file become tables with the machine and ISA of their rows; a GPU file's
    absence is said, not hidden."""
    rows = [
        {"label": "x", "seed": s, "isa": "AVX2", "device_name": "AMD EPYC (2 threads)", "steps": 1000 + s,
         "images": 48000, "images_per_s": 500.0, "command_s": 310.0, "accuracy": 0.95 + s / 1000, "fid": 14.0,
         "fid_floor": 7.0, "fid_over_floor": 2.0, "train_args": "", "model": {"channels": [16, 48], "patch": 2,
         "emb_dim": 64}}
        for s in (1, 2)
    ]  # fmt: skip
    (tmp_path / "recipe-default-avx2.json").write_text(json.dumps({"rows": rows}))
    text = report.results_md(tmp_path)
    assert "`recipe-default-avx2.json`: AMD EPYC (2 threads), AVX2; model 16/48 (patch 2)" in text
    assert "| 1 | 1001 | 500 | 310 | 95.1% | 14.00 (2.00×) |" in text
    assert "| **mean** | 1002 | 500 | 310 | **95.2%** | 14.00 (2.00×) |" in text
    assert "**not run on a GPU**" in text
    table = glance.glance_table(tmp_path)
    assert "`recipe-default-avx2.json`" in table and "95.2% of digits right (mean of 2 seeds" in table
    assert "GPU | **not run on a GPU**" in table
    # a screened variant: in results.md and the screening table, against the default's speed; not in the glance
    fast = [{**r, "images_per_s": 750.0, "accuracy": 0.94, "train_args": "--channels 8,16"} for r in rows]
    (tmp_path / "recipe-screen-Z-avx2.json").write_text(json.dumps({"rows": fast}))
    assert "`recipe-screen-Z-avx2.json`" not in glance.glance_table(tmp_path)
    screen = glance.screen_table(tmp_path)
    assert (
        "| `recipe-default-avx2.json` | 16/48, emb 64 | (default) | 1: 95.1%, 2: 95.2% | **95.2%** | 500 | 1.00× |"
        in screen
    )
    assert (
        "| `recipe-screen-Z-avx2.json` | 16/48, emb 64 | `--channels 8,16` | 1: 94.0%, 2: 94.0% | **94.0%** | 750 | 1.50× |"
        in screen
    )


def test_glance_rows_for_quality_meanflow_and_speed(tmp_path):
    """The quality file's best setting at <= 10 NFE and its one-jump rows; a CPU bench file's default batch."""
    res = [
        {"solver": "euler", "grid": "uniform", "guidance": 1.0, "nfe": 2, "accuracy": 0.9, "fid": 40.0},
        {"solver": "ab2", "grid": "uniform", "guidance": 2.0, "guidance_interval": [0.2, 0.7], "nfe": 6,
         "accuracy": 0.99, "fid": 10.0},
        {"solver": "euler", "grid": "uniform", "guidance": 1.0, "nfe": 20, "accuracy": 0.98, "fid": 5.0},
        {"solver": "meanflow", "grid": "uniform", "guidance": 1.0, "nfe": 1, "accuracy": 0.995, "fid": 12.0},
    ]  # fmt: skip
    d = {"results": res, "floor": {"fid": 5.0}, "device_name": "AMD EPYC (2 threads)", "isa": "AVX512"}
    (tmp_path / "quality-x.json").write_text(json.dumps(d))
    bench = {"suite": "train", "rows": [
        {"mode": m, "batch": b, "status": "ok", "images_per_s": ips, "device_name": "AMD EPYC (2 threads)",
         "isa": "AVX2"} for m, b, ips in (("eager-fp32", 48, 500.0), ("compile", 48, 520.0), ("eager-fp32", 128, 9.0))
    ]}  # fmt: skip
    (tmp_path / "train-cpu-avx2.json").write_text(json.dumps(bench))
    table = glance.glance_table(tmp_path)
    assert "best FID at ≤ 10 NFE: 99.0%, 2.00× the floor (ab2, uniform, w 2 in [0.2, 0.7], 6 NFE)" in table
    assert (
        "| distilled MeanFlow, `quality-x.json` | 1 NFE 99.5%, 2.40× the floor | AMD EPYC (2 threads), AVX512 |"
        in table
    )
    assert (
        "| train step, batch 48, `train-cpu-avx2.json` | eager-fp32 500, compile 520 img/s | AMD EPYC (2 threads), AVX2 |"
        in table
    )


def test_cli_reference_lists_every_flag_of_every_program():
    text = cli_doc.cli_md()
    for prog, parser in cli_doc._programs():
        assert f"## `{prog}`" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in text, (prog, flag)
