"""docs/cli.md: every flag of every program, from the programs' own parsers (``python -m bench report`` writes
it; each flag is a field of a settings dataclass, fastflow/settings.py)."""

from __future__ import annotations

import argparse

from .report import _table

__all__ = ["cli_md"]


def _programs() -> list[tuple[str, argparse.ArgumentParser]]:
    from fastflow import evaluate, export, sample, train

    from . import aot, grid, kernels, recipe, report, roofline, web

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
        ("python -m bench report", report.build_parser()),
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
