"""``--procs``: CPU training in N processes started by ``python -m fastflow.train`` itself (fastflow/launch.py).

The plan (how many processes, how many threads each) is checked in process; the launcher with real processes:
the same weights as one process, one line for an error every rank raises, a killed rank ends the job, and a
Ctrl-C (SIGINT to the launcher) saves and exits 0 like a single-process run.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

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
def test_two_processes_train_the_run_of_one_and_a_common_error_is_one_line(tmp_path, mnist_root, cli_env):
    data = ["--data-root", str(mnist_root)]
    two = _run(_cmd(tmp_path, "two", "--procs", "2", "--max-steps", "3", *data), cli_env)
    one = _run(_cmd(tmp_path, "one", "--procs", "1", "--max-steps", "3", *data), cli_env)
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
    # An error every rank raises (here: resuming with other widths) is printed once, by rank 0, as one line.
    p = _run(
        _cmd(tmp_path, "two", "--procs", "2", "--max-steps", "6", "--resume", "--channels", "8,16,32", *data), cli_env
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    after = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(after[k], a[k]) for k in a), "a refused resume changed the checkpoint"


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_one_line_each(tmp_path, mnist_root, cli_env):
    t0 = time.monotonic()
    p = _run(
        _cmd(tmp_path, "m", "--procs", "2", "--max-steps", "6", "--data-root", str(mnist_root)),
        cli_env,
        FASTFLOW_FAULT="step:3@1",
    )
    assert time.monotonic() - t0 < 120
    assert p.returncode == 128 + signal.SIGKILL, p.stderr[-3000:]
    assert p.stderr.rstrip().endswith("error: rank 1 was killed by SIGKILL"), p.stderr[-3000:]
    assert not re.search(r"Traceback|File \"", p.stderr), p.stderr[-3000:]


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
