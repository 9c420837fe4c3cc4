"""The flags fastflow.sample and fastflow.evaluate share (fastflow.sampling_args): defined once, one value in
sample and a list in evaluate's grid, and a one-line error for each malformed value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastflow.errors import UserError
from fastflow.evaluate import build_parser as evaluate_parser
from fastflow.sample import build_parser as sample_parser
from fastflow.sampling_args import DEFAULT_BATCH_SIZE, SampleSettings, resolve_batch_size, resolve_spec
from fastflow.settings import flag_name


def _options(parser) -> dict[str, object]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_shared_flag_is_in_both_programs_with_one_help():
    sample, evaluate = _options(sample_parser()), _options(evaluate_parser())
    for f in dataclasses.fields(SampleSettings):
        name = flag_name(f.name)
        assert name in sample and name in evaluate, name
        assert sample[name].help == evaluate[name].help  # one text
        assert sample[name].help.startswith(f.metadata["help"])
        for alias in f.metadata["aliases"]:
            assert sample[alias] is sample[name] and evaluate[alias] is evaluate[name]
    assert "--solvers" in evaluate and "--solvers" not in sample  # plural aliases only where lists are taken


def test_single_values_in_sample_and_lists_in_evaluate():
    argv = [
        "--solver",
        "heun",
        "--steps",
        "5",
        "--guidance",
        "2",
        "--guidance-interval",
        "0.2,0.8",
        "--grid",
        "quadratic",
    ]
    a = sample_parser().parse_args(argv + ["--batch", "64", "--compile"])
    assert (a.solver, a.steps, a.guidance, a.guidance_interval, a.grid) == ("heun", 5, 2.0, (0.2, 0.8), "quadratic")
    assert a.batch_size == 64 and a.compile and a.nfe is None and a.seed == 0
    b = evaluate_parser().parse_args(argv + ["--batch-size", "64"])
    assert (b.solver, b.steps, b.guidance, b.guidance_interval, b.grid) == (
        ["heun"],
        [5],
        [2.0],
        [(0.2, 0.8)],
        ["quadratic"],
    )
    c = evaluate_parser().parse_args(["--guidance-intervals", "none", "0.3,1", "0,1", "--guidance", "1,2"])
    assert c.guidance_interval == [None, (0.3, 1.0), None]  # none and 0,1 both mean: guide at every stage
    d = sample_parser().parse_args([])
    # guidance only for t in [0.2, 0.7] unless asked otherwise (measured: docs/history.md, "Guidance in an interval")
    assert (d.solver, d.guidance, d.guidance_interval, d.grid, d.batch_size) == (
        "euler",
        1.0,
        (0.2, 0.7),
        "uniform",
        None,
    )
    assert d.amp == "auto"  # sample picks the fastest precision here; evaluate's figures stay fp32 unless asked
    e = evaluate_parser().parse_args([])
    assert e.amp == "none"
    assert (e.solver, e.guidance, e.guidance_interval, e.grid, e.steps, e.nfe) == (
        ["euler"],
        [1.0],
        [(0.2, 0.7)],
        ["uniform"],
        None,
        None,
    )


@pytest.mark.parametrize("parser", [sample_parser, evaluate_parser])
@pytest.mark.parametrize(
    "value,phrase",
    [
        ("0.8,0.2", "need 0 <= LO < HI <= 1"),
        ("0.5,0.5", "need 0 <= LO < HI <= 1"),
        ("-0.1,0.5", "need 0 <= LO < HI <= 1"),
        ("0.2,1.5", "need 0 <= LO < HI <= 1"),
        ("0.2", "is not an interval LO,HI"),
        ("0.1,0.2,0.3", "is not an interval LO,HI"),
        ("a,b", "not a number: 'a'"),
        ("nan,0.5", "not a finite number"),
    ],
)
def test_malformed_interval_is_one_line(parser, value, phrase, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args([f"--guidance-interval={value}"])  # "=": "-0.1,..." is no flag
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "argument --guidance-interval" in err and phrase in err, err


def test_batch_size_default_per_device_and_refused_when_not_positive():
    assert resolve_batch_size(None, torch.device("cpu")) == DEFAULT_BATCH_SIZE["cpu"]
    assert resolve_batch_size(None, torch.device("cuda")) == DEFAULT_BATCH_SIZE["cuda"]
    assert resolve_batch_size(7, torch.device("cpu")) == 7
    for bad in (0, -3):
        with pytest.raises(UserError, match=f"--batch-size must be > 0, got {bad}"):
            resolve_batch_size(bad, torch.device("cpu"))


def test_resolve_spec_spends_an_nfe_budget_exactly_with_an_interval():
    iv = (0.5, 1.0)  # Euler on a uniform grid: the second half of the steps costs 2 at w = 2
    spec = resolve_spec(None, 10, "euler", 2.0, "uniform", iv)
    assert spec.steps == 7 and spec.nfe == 10  # t = 0, 1/7, ..., 6/7: 3 out, 4 in
    assert resolve_spec(None, 10, "euler", 2.0).steps == 5  # guided everywhere
    with pytest.raises(UserError, match="--nfe 1 is less than one rk4 step costs"):
        resolve_spec(None, 1, "rk4", 2.0, "uniform", iv)
    with pytest.raises(UserError, match="give --steps or --nfe, not both"):
        resolve_spec(3, 3, "euler", 1.0)
