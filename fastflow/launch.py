"""CPU training in several processes, started by ``python -m fastflow.train`` itself (``--procs``).

On 2 cores, two processes of one thread each trained more images per second than one process of two threads
(docs/cpu_recipe.md: the batch-48 step is too small for two OpenMP threads to share well). The processes are
torchrun's workers without torchrun: each gets the environment torchrun would give it (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and runs the same command line, so it joins the same gloo group
and the train step averages the gradients as under torchrun. The run is the same run in 1 or N processes (each draws
the whole global batch's randomness and keeps its rows), to fp32 summation order, and resumes across process counts.

This module only starts, watches and stops them:

- each child runs in its own session, so a Ctrl-C at the terminal reaches this launcher alone, which hands it
  to every child once (a second Ctrl-C is handed on again: stop at once), as ``kill`` of the launcher does;
- rank 0 prints the run; the other ranks' stdout is dropped and their stderr kept;
- the first child to fail ends the job: the others get a few seconds to end on their own, then SIGTERM, then
  SIGKILL. The launcher says which rank failed first and how (an error every rank raises is printed once, by
  rank 0) and exits with that rank's code (128 + the signal if it was killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from .data import check_batch_split
from .distributed import _env_int
from .errors import UserError

__all__ = ["Launch", "plan", "run", "LAUNCHED"]

LAUNCHED = "FASTFLOW_LAUNCHED"  # set in every child: it is a worker, and its resume command is plain python
GRACE_S = 5.0  # after a child fails, how long the others may take to end on their own
KILL_S = 30.0  # after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class Launch:
    procs: int
    threads: int
    why: str


def plan(procs: int, device_type: str, batch_size: int, threads: int | None = None) -> Launch | None:
    """How many processes to start, or None to train in this one.

    ``procs``: the ``--procs`` setting, 0 for auto (two processes where two or more threads are available,
    each with half of them). ``threads``: the threads this process may use (``torch.get_num_threads()``, which
    follows ``OMP_NUM_THREADS``). Under torchrun, or in a child of this launcher, nothing is started.
    """
    if os.environ.get(LAUNCHED):  # a child of this launcher: it trains
        return None
    if _env_int("WORLD_SIZE", 1) > 1:
        if procs > 1:
            raise UserError(f"--procs {procs}: this process is already one of {os.environ['WORLD_SIZE']} (torchrun)")
        return None
    if device_type != "cpu":
        if procs > 1:
            raise UserError(
                f"--procs is for CPU training; on GPUs start one process per GPU with torchrun, not {device_type}"
            )
        return None
    threads = threads or torch.get_num_threads()
    if procs == 0:
        if threads < 2:
            return None
        if batch_size % 2:
            return None  # auto: an odd batch does not split; one process then
        procs, why = 2, f"--procs auto: {threads} threads here"
    elif procs == 1:
        return None
    else:
        why = f"--procs {procs}"
    check_batch_split(batch_size, procs)  # here, before any process starts: one line, once
    return Launch(procs, max(1, threads // procs), why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    launch: Launch, argv: list[str], extra_env: dict[str, str] | None = None, program: list[str] | None = None
) -> int:
    """Start ``launch.procs`` copies of ``python -m fastflow.train ARGV`` (``program`` instead of ``python -m
    fastflow.train``: the tests' stand-in children), wait for them, return the exit code."""
    n = launch.procs
    s = "s" if launch.threads > 1 else ""
    print(f"fastflow: {n} processes x {launch.threads} thread{s} ({launch.why}; --procs 1: one process)", flush=True)
    base = dict(os.environ, **(extra_env or {}))
    base.update(
        WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS=str(launch.threads), **{LAUNCHED: "1"},
    )  # fmt: skip
    cmd = [*(program or [sys.executable, "-m", "fastflow.train"]), *argv]
    with contextlib.ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile("w+b")) for _ in range(n)]
        children = [
            subprocess.Popen(
                cmd,
                env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=None if r == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE if r == 0 else errs[r],
                start_new_session=True,  # a terminal's Ctrl-C goes to this launcher only; it hands it on once
            )
            for r in range(n)
        ]
        tee = threading.Thread(target=_tee, args=(children[0].stderr, errs[0]), daemon=True)
        tee.start()  # rank 0's stderr (progress bar, errors) live on ours, and kept

        def forward(signum, frame):
            for c in children:
                if c.poll() is None:
                    c.send_signal(signum)

        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = _wait(children)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            for c in children:  # never leave a worker behind (an exception here, a KeyboardInterrupt)
                if c.poll() is None:
                    c.kill()
                    c.wait()
            tee.join(timeout=5)
        if failed is None:
            return 0
        return _report(failed, children[failed].returncode, errs)


def _tee(src, keep) -> None:
    for chunk in iter(lambda: src.read1(65536), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        keep.write(chunk)


def _last_line(f) -> str:
    f.seek(0)
    lines = f.read().decode(errors="replace").replace("\r", "\n").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _report(failed: int, rc: int, errs) -> int:
    """Say what ended the job, once: the first rank that failed. Rank 0's stderr has been shown as it came; another
    rank's last line is shown unless rank 0 said the same (an error every rank raises)."""
    if rc < 0:  # killed: it could say nothing
        said = f"error: rank {failed} was killed by {signal.Signals(-rc).name}"
    elif failed == 0:
        said = ""  # rank 0 said why on our stderr
    else:
        last = _last_line(errs[failed])
        if last and last == _last_line(errs[0]):
            said = ""
        elif last.startswith("error:"):
            said = last
        elif last:  # a crash: the last line of its traceback
            said = f"error: rank {failed} failed: {last}"
        else:
            said = f"error: rank {failed} exited with code {rc}"
    if said:
        print(said, file=sys.stderr)
    return rc if rc > 0 else 128 - rc


def _wait(children: list[subprocess.Popen]) -> int | None:
    """Wait for every child; the rank of the first that failed (the others then stopped), or None."""
    while True:
        codes = [c.poll() for c in children]
        if all(rc is not None for rc in codes):
            return next((r for r, rc in enumerate(codes) if rc != 0), None)
        failed = next((r for r, rc in enumerate(codes) if rc not in (None, 0)), None)
        if failed is not None:
            _stop(children)
            return failed
        time.sleep(0.1)


def _stop(children: list[subprocess.Popen]) -> None:
    """The others after a failure: a few seconds to end on their own (an error all ranks raise reaches rank 0's
    terminal that way), then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(c.poll() is None for c in children):
        time.sleep(0.1)
    for sig, wait_s in ((signal.SIGTERM, KILL_S), (signal.SIGKILL, None)):
        alive = [c for c in children if c.poll() is None]
        for c in alive:
            c.send_signal(sig)
        for c in alive:
            try:
                c.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
