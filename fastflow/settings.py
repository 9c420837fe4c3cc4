"""Every command-line flag of every program, defined once: as a dataclass field made by :func:`setting`.

A field carries its type and default, its help, its choices, how a value is parsed, the rule it must obey (checked
by :func:`fastflow.config.validate` for the training settings) and whether a ``--resume`` may change it. Each
program builds its parser from such dataclasses, one argument group per class (:func:`add_settings`):
``fastflow.train`` from :class:`~fastflow.config.TrainConfig` and :class:`~fastflow.config.ModelConfig`,
``fastflow.sample`` and ``fastflow.evaluate`` from :class:`~fastflow.sampling_args.SampleSettings` (one value each
in sample, a list for the grid's flags in evaluate) plus their own, ``python -m bench`` from its suites' classes.
docs/cli.md is generated from those parsers (``python -m bench report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "setting",
    "add_settings",
    "flag_name",
    "parse_int_list",
    "finite_float",
    "comma_list",
    "POSITIVE",
    "NONNEG",
    "FINITE",
    "FINITE_POSITIVE",
    "FINITE_NONNEG",
    "UNIT_CLOSED",
    "UNIT_HALF_OPEN",
]

# Rules a value must obey: (test, how the error states it). ``not v < 0`` also refuses nan.
POSITIVE = (lambda v: v > 0, "> 0")
NONNEG = (lambda v: v >= 0, ">= 0")
FINITE_POSITIVE = (lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
FINITE_NONNEG = (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
UNIT_CLOSED = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
UNIT_HALF_OPEN = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
FINITE = (lambda v: math.isfinite(v), "a finite number")


def setting(
    default,
    help: str,
    *,
    choices: tuple | None = None,
    check: tuple[Callable, str] | None = None,
    resume_free: bool = False,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    shown: str | None = None,
    grid: bool = False,
    plural: bool = False,
    spaced: bool = False,
):
    """A dataclass field that is also a flag (``num_epochs`` -> ``--num-epochs``).

    ``help`` says what it is; the default is appended (``shown``: how to state it, where the value alone would
    mislead). ``parse``: the argparse type (else the field's type). ``resume_free``: the setting does not change the
    trajectory of a run (where files go, how often it logs, how fast the same math runs), so ``--resume`` may change
    it without a note. ``grid``: a list in ``fastflow.evaluate``'s grid (comma-separated; ``spaced``: separate words,
    for values that hold a comma), with a plural alias (``--solvers``) when ``plural``.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not supported")
    meta = dict(
        help=help, choices=choices, check=check, resume_free=resume_free, parse=parse, metavar=metavar,
        aliases=aliases, shown=shown, grid=grid, plural=plural, spaced=spaced,
    )  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> ``(32, 64, 128)``."""
    try:
        out = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def finite_float(text: str) -> float:
    """An argparse type: a finite float."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


def comma_list(parse, choices: tuple | None = None):
    """An argparse type: ``"a,b,c"`` -> ``[parse(a), parse(b), parse(c)]``, each checked against ``choices``."""

    def convert(text: str) -> list:
        out = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            v = parse(part)
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {part!r} (choose from {', '.join(choices)})")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError("expected at least one value")
        return out

    return convert


def _shown(default, meta) -> str:
    if meta.get("shown"):
        return meta["shown"]
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "auto"
    if default == "":
        return "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def add_settings(
    parser,
    cls,
    *,
    preset: bool = False,
    lists: bool = False,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> None:
    """One flag per field of the dataclass ``cls`` (its :func:`setting`), on ``parser`` (an argument group).

    ``preset``: the flags' defaults stay None, so that only the flags given override a preset (the help says
    "unless the preset sets it"), and a switch can be given both ways (``--compile`` / ``--no-compile``).
    Otherwise a field's default is the flag's, and a bool is a switch that turns it on. ``lists``: the ``grid``
    fields take a list (``fastflow.evaluate``), whose value is then a list (a flag left out: its default, as a list
    of one, or None). ``skip``/``only``: fields left out / the only fields taken."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        tp, meta = hints[f.name], f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [flag_name(f.name), *meta.get("aliases", ())]
        what = meta.get("help", "")
        tail = ", unless the preset sets it" if preset else ""
        kw: dict[str, Any] = dict(dest=f.name, default=None if preset else default)
        kw["help"] = f"{what} (default: {_shown(default, meta)}{tail})"
        if tp is bool or tp == (bool | None):
            kw["action"] = argparse.BooleanOptionalAction if preset else "store_true"
            if not preset:
                kw["default"] = False
            parser.add_argument(*names, **kw)
            continue
        parse, choices, metavar = meta.get("parse"), meta.get("choices"), meta.get("metavar")
        if parse is None:
            parse = parse_int_list if typing.get_origin(tp) is tuple else _base_type(tp)
            metavar = metavar or ("N,N,..." if parse is parse_int_list else None)
        if lists and meta.get("grid"):
            if meta.get("plural"):
                names.append(flag_name(f.name) + "s")
            if meta.get("spaced"):
                kw.update(type=parse, nargs="+", metavar=metavar)
            else:
                kw.update(type=comma_list(parse, choices), metavar=f"{metavar}[,{metavar}...]")
            kw["default"] = None if default is None else [default]
        else:  # with choices, argparse checks the value (and shows the choices in the usage line)
            kw.update(type=parse, choices=choices, metavar=None if choices else metavar)
        parser.add_argument(*names, **{k: v for k, v in kw.items() if v is not None or k == "default"})


def _base_type(tp):
    """``int | None`` -> int; ``float`` -> float; ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp
