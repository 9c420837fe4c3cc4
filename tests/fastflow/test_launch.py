"""``--procs``: CPU training in N processes started by ``python -m fastflow.train`` itself (fastflow/launch.py).

The plan (how many processes, how many threads each) is checked in process. The launcher's own duties (one line
for an error every rank raises, a killed rank named, a Ctrl-C handed to every child once) are checked with
stand-in children, small Python scripts that start in milliseconds. With real training processes: the same
weights as one process, and a Ctrl-C that saves and exits 0 like a single-process run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fastflow import launch
from fastflow.errors import UserError
from fastflow.launch import LAUNCHED, Launch, plan

TINY = ["--preset", "tiny", "--subset", "256", "--amp", "none", "--sample-steps", "2", "--log-every", "1"]
W_ATOL, W_RTOL = 1e-5, 1e-4  # fp32 summation order across 2 ranks (test_distributed: 4e-7 seen after 3 steps)


@pytest.fixture
def no_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", LAUNCHED):
        monkeypatch.delenv(var, raising=False)


def test_plan_auto_takes_two_processes_where_two_threads_are_available(no_torchrun):
    assert plan(0, "cpu", 48, threads=2) == Launch(2, 1, "--procs auto: 2 threads here")
    assert plan(0, "cpu", 48, threads=8).threads == 4
    assert plan(0, "cpu", 48, threads=1) is None  # OMP_NUM_THREADS=1: one process
    assert plan(0, "cpu", 15, threads=2) is None  # an odd batch does not split: one process
    assert plan(0, "cuda", 48, threads=2) is None  # GPUs: torchrun, one process per GPU
    assert plan(1, "cpu", 48, threads=2) is None
    assert plan(3, "cpu", 48, threads=2) == Launch(3, 1, "--procs 3")


def test_plan_refuses_what_cannot_work(no_torchrun, monkeypatch):
    with pytest.raises(UserError, match="--batch-size 15 does not divide evenly across 2 processes"):
        plan(2, "cpu", 15, threads=2)
    with pytest.raises(UserError, match="--procs is for CPU training"):
        plan(2, "cuda", 48, threads=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan(0, "cpu", 48, threads=2) is None  # under torchrun: its processes, not ours
    with pytest.raises(UserError, match="already one of 2"):
        plan(2, "cpu", 48, threads=2)
    monkeypatch.setenv(LAUNCHED, "1")
    assert plan(2, "cpu", 48, threads=2) is None  # a child of the launcher trains


def _cmd(tmp, name, *flags):
    return [
        sys.executable,
        "-m",
        "fastflow.train",
        *TINY,
        "--model-dir",
        str(tmp / name),
        "--result-dir",
        str(tmp / f"{name}-r"),
        *flags,
    ]


def _run(cmd, env, timeout=300, **extra):
    return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_train_the_run_of_one(tmp_path, mnist_root, cli_env, cli):
    data = ["--data-root", str(mnist_root)]
    two = _run(_cmd(tmp_path, "two", "--procs", "2", "--max-steps", "3", *data), cli_env)
    one = cli.run(_cmd(tmp_path, "one", "--procs", "1", "--max-steps", "3", *data), env=cli_env, timeout=300)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-3000:]
    assert two.stdout.startswith("fastflow: 2 processes x 1 thread (--procs 2;"), two.stdout
    assert "device cpu x 2 processes" in two.stdout and "x 2 processes" not in one.stdout
    a, b = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=W_ATOL, rtol=W_RTOL), f"{k}: max |Δ| {(a[k] - b[k]).abs().max():.3g}"


STANDIN = """
import os, signal, sys, time
rank, out = int(os.environ["RANK"]), sys.argv[1]
what = sys.argv[2]
if what == "common-error":
    print("error: the same mistake on every rank", file=sys.stderr)
    sys.exit(2)
if what == "kill-rank-1":
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # rank 0 waits, as in a collective, until the launcher stops it
if what == "crash-rank-1":
    if rank == 1:
        raise RuntimeError("boom")
    time.sleep(60)
if what == "signals":
    got = []
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    open(os.path.join(out, f"ready{rank}"), "w").close()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # a second forwarded signal would arrive now
    open(os.path.join(out, f"got{rank}"), "w").write(str(len(got)))
    sys.exit(0 if got else 1)
"""


def _standin(tmp_path, what, procs=2, after=None):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    if after is not None:
        threading.Thread(target=after, daemon=True).start()
    return launch.run(Launch(procs, 1, "test"), [str(tmp_path), what], program=[sys.executable, str(script)])


def test_an_error_every_rank_raises_is_said_once(tmp_path, capfd):
    assert _standin(tmp_path, "common-error", procs=3) == 2
    err = capfd.readouterr().err
    assert err.count("error: the same mistake on every rank") == 1, err


def test_a_killed_rank_is_named_and_the_others_are_stopped(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(launch, "GRACE_S", 0.5)
    t0 = time.monotonic()
    assert _standin(tmp_path, "kill-rank-1") == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 15  # rank 0 stopped after the grace time, not left to its 60 s sleep
    assert capfd.readouterr().err.strip().splitlines()[-1] == "error: rank 1 was killed by SIGKILL"


def test_a_crash_on_another_rank_is_named_by_its_last_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(launch, "GRACE_S", 0.5)
    assert _standin(tmp_path, "crash-rank-1") == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == "error: rank 1 failed: RuntimeError: boom"


def test_a_ctrl_c_reaches_every_child_once(tmp_path):
    def ctrl_c():  # the terminal's SIGINT goes to the launcher only (the children have their own sessions)
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    assert _standin(tmp_path, "signals", after=ctrl_c) == 0
    assert [(tmp_path / f"got{r}").read_text() for r in range(2)] == ["1", "1"]


@pytest.mark.slow
def test_ctrl_c_reaches_every_process_once_saves_and_exits_0(tmp_path, mnist_root, cli_env):
    cmd = _cmd(tmp_path, "m", "--procs", "2", "--num-epochs", "100", "--data-root", str(mnist_root))
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("fastflow: preset"):  # the loop starts right after this line
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert re.match(r"stopped at step \d+ of 1600; checkpoint in ", last), out
    # rank 0 says it once; a second signal would have stopped at once without saving
    assert err.count("SIGINT: finishing this step and saving a checkpoint") == 1, err[-3000:]
    assert last.split("resume with: ", 1)[1].startswith("python -m fastflow.train ")
    assert (tmp_path / "m" / "manifest.json").exists()
