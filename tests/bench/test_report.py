"""The documents that carry measurements and flags are what `python -m bench report` writes from their sources:
docs/results.md and the README's table from bench/results/*.json, docs/cli.md from the programs' parsers."""

from __future__ import annotations

import json

from bench import report


def test_committed_documents_are_what_the_report_writes():
    stale = [str(path) for path, text in report.documents().items() if path.read_text() != text]
    assert not stale, f"{stale} differ from what `python -m bench report` writes: run it and commit the result"


def test_results_page_tables_come_from_the_files(tmp_path):
    """A recipe file and a quality file become tables with the machine and ISA of their rows; a GPU file's
    absence is said, not hidden."""
    rows = [
        {"label": "x", "seed": s, "isa": "AVX2", "device_name": "AMD EPYC (2 threads)", "steps": 1000 + s,
         "images": 48000, "images_per_s": 500.0, "command_s": 310.0, "accuracy": 0.95 + s / 1000, "fid": 14.0,
         "fid_floor": 7.0, "fid_over_floor": 2.0, "train_args": "", "model": {"channels": [16, 48], "patch": 2}}
        for s in (1, 2)
    ]  # fmt: skip
    (tmp_path / "recipe-x.json").write_text(json.dumps({"rows": rows}))
    text = report.results_md(tmp_path)
    assert "`recipe-x.json`: AMD EPYC (2 threads), AVX2; model 16/48 (patch 2)" in text
    assert "| 1 | 1001 | 500 | 310 | 95.1% | 14.00 (2.00×) |" in text
    assert "| **mean** | 1002 | 500 | 310 | **95.2%** | 14.00 (2.00×) |" in text
    assert "**not run on a GPU**" in text
    glance = report.glance_table(tmp_path)
    assert "`make train`, x" in glance and "95.2% of digits right (mean of 2 seeds)" in glance


def test_cli_reference_lists_every_flag_of_every_program():
    text = report.cli_md()
    for prog, parser in report._programs():
        assert f"## `{prog}`" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in text, (prog, flag)
