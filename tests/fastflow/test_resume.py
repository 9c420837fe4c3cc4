"""Kill-and-resume through the real command line: a run SIGKILLed anywhere and resumed ends bit-identical.

One uninterrupted reference run; then one chain of runs in another folder, each SIGKILLed at a point chosen at
random (between two steps, or inside a checkpoint write: while ``previous/`` is rebuilt, with a part's temporary
file written but not renamed, between parts, before the manifest) and resumed with ``--resume``, then one
SIGKILL at a random moment from outside, then a run to the end. The final weights, EMA, optimizer state, RNG
state, loss history and sample grids must equal the reference's exactly.

The random draws are printed; ``FASTFLOW_TEST_SEED=<n>`` replays a failing chain.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import SAVE_POINTS
from safetensors.torch import load_file

from fastflow.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SUBSET, BATCH = 128, 16
SPE = SUBSET // BATCH  # 8 steps per epoch
TOTAL, EVERY = 28, 3  # 3.5 epochs: the run ends mid-epoch; checkpoints every 3 steps and at epoch ends
FLAGS = [
    "--preset", "tiny", "--subset", str(SUBSET), "--batch-size", str(BATCH), "--num-epochs", "4",
    "--max-steps", str(TOTAL), "--checkpoint-every", str(EVERY), "--log-every", "5", "--sample-steps", "2",
    "--amp", "none", "--device", "cpu",
]  # fmt: skip
# Steps at which a checkpoint is written: every EVERY steps, each epoch's end, the last step.
SAVE_STEPS = sorted({t for t in range(1, TOTAL) if t % EVERY == 0 or t % SPE == 0} | {TOTAL})
EPOCH_END_SAVES = [t for t in SAVE_STEPS if t % SPE == 0 and t < TOTAL]


def _cmd(env, model_dir, result_dir, *extra) -> list[str]:
    dirs = ["--model-dir", str(model_dir), "--result-dir", str(result_dir), "--data-root", env["FASTFLOW_TEST_MNIST"]]
    return [sys.executable, "-m", "fastflow.train", *FLAGS, *dirs, *extra]


def _train(cli, env, model_dir, result_dir, *extra, fault=None, timeout=300):
    env = dict(env, FASTFLOW_FAULT=fault or "")
    return cli.run(_cmd(env, model_dir, result_dir, *extra), env=env, timeout=timeout)


def _tail(p) -> str:
    return f"stdout: {p.stdout[-800:]!r}\nstderr: {p.stderr[-800:]!r}"


@pytest.fixture(scope="module")
def env(cli_env, mnist_root):
    return {**cli_env, "FASTFLOW_TEST_MNIST": str(mnist_root)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli, env):
    """The uninterrupted run."""
    d = tmp_path_factory.mktemp("reference")
    p = _train(cli, env, d / "model", d / "result")
    assert p.returncode == 0, _tail(p)
    return d


def _assert_same_run(ref: Path, got: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(ref / "model" / name)), load_file(str(got / "model" / name))
        assert a.keys() == b.keys(), name
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"{name}: {len(diff)} of {len(a)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"
    sa = torch.load(ref / "model" / "state.pt", weights_only=True)
    sb = torch.load(got / "model" / "state.pt", weights_only=True)
    for k in ("step", "epoch", "batch_in_epoch", "ema_updates"):
        assert sa[k] == sb[k], k
    for k in ("generator", "torch_rng", "loss_window"):
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), f"optimizer state {i}.{k}"
    # The loss history covers the same steps with the same means (images/s is a timing: not compared).
    assert [r[:4] for r in sa["history"]] == [r[:4] for r in sb["history"]]
    csv = lambda d: [line.split(",")[:4] for line in (d / "result" / "loss.csv").read_text().splitlines()]  # noqa: E731
    assert csv(ref) == csv(got)
    pngs = sorted(p.name for p in (ref / "result").glob("*.png"))
    assert pngs == sorted(p.name for p in (got / "result").glob("*.png"))
    for name in pngs:
        if name != "loss.png":  # the loss plot has no timing in it, but matplotlib may stamp metadata
            assert (ref / "result" / name).read_bytes() == (got / "result" / name).read_bytes(), name


def _no_debris(model_dir: Path) -> None:
    left = sorted(
        p.name for p in model_dir.iterdir() if p.name.endswith(".tmp") or p.name in ("previous.tmp", "previous.old")
    )
    assert not left, f"temporary files left in {model_dir}: {left}"


def _draw_kill_points(rng: random.Random) -> list[str]:
    """Six kill points at distinct steps: one inside an epoch-end checkpoint write, three inside other
    checkpoint writes, two between a step and its checkpoint; each at a random step and phase."""
    steps: set[int] = set()

    def pick(choices):
        t = rng.choice([c for c in choices if c not in steps])
        steps.add(t)
        return t

    def phase(t):
        points = SAVE_POINTS[:-1] if t == TOTAL else SAVE_POINTS  # after the last manifest: nothing to resume
        if t == SAVE_STEPS[0]:  # the first save has no complete set to keep in previous/: those points never run
            points = [p for p in points if not p.startswith("ckpt.previous.")]
        return rng.choice(points)

    points = [(t, phase(t)) for t in [pick(EPOCH_END_SAVES)] + [pick(SAVE_STEPS) for _ in range(3)]]
    points += [(pick(range(1, TOTAL)), "step") for _ in range(2)]
    return [f"{point}:{t}" for t, point in sorted(points)]


def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path, cli, env):
    seed = int(os.environ.get("FASTFLOW_TEST_SEED", random.SystemRandom().randrange(2**31)))
    rng = random.Random(seed)
    kills = _draw_kill_points(rng)
    print(f"FASTFLOW_TEST_SEED={seed}: kill points {kills}")
    model, result = tmp_path / "model", tmp_path / "result"
    for spec in kills:
        p = _train(cli, env, model, result, "--resume", fault=spec)
        assert p.returncode == -signal.SIGKILL, f"seed {seed}: {spec} was not reached\n{_tail(p)}"

    # One kill from outside, at a random moment of a resumed run (possibly in start-up, possibly mid-write).
    proc = cli.start(_cmd(env, model, result, "--resume"), env=env)
    try:
        for line in proc.stdout_lines():  # wait for the loop to start, then let it run a random while
            if line.startswith("fastflow:"):
                break
        delay = rng.uniform(0.0, 2.0)
        print(f"external SIGKILL {delay:.2f} s after the loop started")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    print("  it landed after the run had finished" if proc.returncode == 0 else "  it killed the run")

    p = _train(cli, env, model, result, "--resume")
    assert p.returncode == 0, _tail(p)
    # the kill may come after the last checkpoint (or the run may beat it): then there is nothing left to do
    finished = f"nothing to do: {model} is at step {TOTAL} of {TOTAL}" in p.stdout
    assert f"done: {TOTAL} steps" in p.stdout or finished, _tail(p)
    assert finished or proc.returncode != 0
    _assert_same_run(reference, tmp_path)
    _no_debris(model)

    # Resuming a finished run writes nothing.
    before = {q: q.read_bytes() for q in tmp_path.rglob("*") if q.is_file()}
    p = _train(cli, env, model, result, "--resume")
    assert p.returncode == 0, _tail(p)
    assert "nothing to do" in p.stdout, _tail(p)
    assert {q: q.read_bytes() for q in tmp_path.rglob("*") if q.is_file()} == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_0_and_resume_continues(reference, tmp_path, cli, env, sig):
    model, result = tmp_path / "model", tmp_path / "result"

    def run_and_signal(delay: float):
        proc = cli.start(_cmd(env, model, result), env=env)
        for line in proc.stdout_lines():
            if line.startswith("fastflow:"):  # the loop starts right after this line
                break
        time.sleep(delay)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        return (proc.returncode, *proc.output())

    rc, out, err = run_and_signal(random.uniform(0.0, 0.5))
    if f"done: {TOTAL} steps" in out:  # a fast machine finished the 28 steps first: signal at once this time
        shutil.rmtree(model), shutil.rmtree(result)
        rc, out, err = run_and_signal(0.0)
    assert rc == 0, f"exit {rc}\n{out}\n{err[-800:]}"
    assert f"{sig.name}: finishing this step and saving a checkpoint" in err
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped at step "), out
    step = int(last.split()[3])
    assert 1 <= step < TOTAL
    assert f"checkpoint in {model}" in last
    ck = load_checkpoint(model)
    assert ck.step == step and ck.path == model

    # The printed command, run as printed (with this interpreter for "python"), continues from that step.
    printed = shlex.split(last.split("resume with: ", 1)[1])
    assert printed[:3] == ["python", "-m", "fastflow.train"] and printed[-1] == "--resume"
    if sig == signal.SIGINT:
        return  # the resume path is the same for both signals: check it once, for SIGTERM
    p = cli.run([sys.executable, *printed[1:]], env=env, timeout=300)
    assert p.returncode == 0, _tail(p)
    assert f"resumed from {model} at step {step} " in p.stdout, _tail(p)
    _assert_same_run(reference, tmp_path)
