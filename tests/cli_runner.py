"""``python -m fastflow.<program> ...`` (or ``python -c ...``) for the tests, without the start-up of a new
interpreter each time.

A command-line test wants the program exactly as a user starts it: argument parsing, the ``__main__`` block, the
exit code, the lines on stdout and stderr, the files written or not. A fresh interpreter gives that but costs
seconds (``import torch``: 1.4 s on an idle AVX-512 core; ``torchvision``, imported to read MNIST and save grids,
as much again; 4-14 s together on the shared 2-core machine), and the suite starts dozens. :class:`CliRunner` keeps
warm workers (tests/cli_worker.py) that have imported torch, torchvision, matplotlib and fastflow's programs once;
each run is a forked child of one, which takes the run's environment, working folder and ``argv``, points its
stdout and stderr at files, draws fresh random seeds and runs the module as ``__main__`` with
:func:`runpy.run_module`, the way ``-m`` does. Its exit code (negative: the signal that killed it) and output come
back as a :class:`subprocess.CompletedProcess`; :meth:`CliRunner.start` gives a handle to signal a running one.

What a forked child cannot reproduce runs as a real process instead (the same result type):

- a command that is not ``[sys.executable, "-m", <module>, ...]`` or ``[sys.executable, "-c", <code>, ...]`` (any
  module: what the workers have not imported, the child imports);
- an environment that differs from the workers' in a variable read at import time (``TRITON_INTERPRET``,
  ``FASTFLOW_KERNELS``, ``CUDA_VISIBLE_DEVICES``, ...). Only the variables in :data:`RUNTIME_ENV` may differ
  (``FASTFLOW_FAULT`` is read by fastflow.io at import: the child re-executes that module, see
  ``cli_worker.RELOAD``; ``OMP_NUM_THREADS``: the child sets torch's thread count), and ``PYTHONPATH`` may gain entries in front (e.g. a stand-in module) unless one holds a
  module the workers have already imported.

``FASTFLOW_TEST_FORK=0`` sends every run to a real process (to compare the two, or to rule the runner out);
tests/fastflow/test_bad_input.py checks that both give the same results.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["CliRunner", "CliProcess"]

WORKER = Path(__file__).with_name("cli_worker.py")
PROGRAMS = ["fastflow.train", "fastflow.sample", "fastflow.evaluate"]
# Imported by the programs when they run (reading MNIST, saving a grid, plotting the loss): seconds each in every
# child unless the workers hold them (torchvision alone pulls in torch._dynamo: 2-5 s on a shared core).
PRELOAD = ["torchvision", "matplotlib.pyplot"]
# Read when called, never at import, or set again by the child (cli_worker.py): a request may set them to anything.
RUNTIME_ENV = {"FASTFLOW_OFFLINE", "FASTFLOW_TEST_MNIST", "FASTFLOW_FAULT", "OMP_NUM_THREADS"}


class _Worker:
    def __init__(self, env: dict, preload: list[str]):
        code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(WORKER), *preload],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # a crash of the worker itself shows in pytest's output
        )
        self._buf = b""
        self.busy_with: CliProcess | None = None
        msg = self.read(timeout=300)
        assert msg == {"ready": True}, msg

    def send(self, msg: dict) -> None:
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float | None) -> dict | None:
        """The next reply, or None if none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the CLI worker died (exit {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Ask the worker to end (it does when its stdin closes); :meth:`CliRunner.close` waits for all at once."""
        if self.proc.poll() is None:
            self.proc.stdin.close()

    def join(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CliProcess:
    """A program started by :meth:`CliRunner.start`: ``pid``, ``poll()``, ``wait()``, ``send_signal()``, and its
    output so far in files (``stdout_path``, ``stderr_path``), read with :meth:`stdout_lines` while it runs."""

    def __init__(self, args, pid, stdout_path, stderr_path, worker=None, popen=None, on_done=None):
        self.args, self.pid = args, pid
        self.stdout_path, self.stderr_path = Path(stdout_path), Path(stderr_path)
        self._worker, self._popen, self._on_done = worker, popen, on_done
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._popen is not None:
            try:
                self.returncode = self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                if _raise:
                    raise
                return None
        else:
            msg = self._worker.read(timeout)
            if msg is None:
                if _raise:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return None
            self.returncode = msg["rc"]
        if self._on_done:
            self._on_done()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stdout_lines(self, poll_s: float = 0.02):
        """Yield stdout's lines as they are written, until the program ends."""
        with open(self.stdout_path, "rb") as f:
            part = b""
            while True:
                chunk = f.readline()
                if chunk:
                    part += chunk
                    if part.endswith(b"\n"):
                        yield part.decode()
                        part = b""
                    continue
                if self.poll() is not None:
                    rest = part + f.read()
                    if rest:
                        yield from rest.decode().splitlines(keepends=True)
                    return
                time.sleep(poll_s)

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")


class CliRunner:
    """Runs ``[sys.executable, "-m", <program>, ...]`` in forked children of warm workers started with ``env``."""

    def __init__(self, env: dict, programs: list[str] = PROGRAMS, preload: list[str] = PRELOAD, fork: bool = True):
        self.env, self.programs, self.preload = dict(env), list(programs), list(preload)
        # Linux only: elsewhere fork() after importing torch is not known to be safe.
        self.enabled = fork and os.environ.get("FASTFLOW_TEST_FORK", "1") != "0" and sys.platform == "linux"
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="fastflow-cli-")
        self._n = 0
        self._live: set[CliProcess] = set()
        self.forked = self.spawned = 0  # how many runs took each way (the tests check the fast one is used)

    def _plan(self, cmd: list[str], env: dict) -> tuple[str, dict] | str:
        """The request for a worker, or the reason to run a real process."""
        if not self.enabled:
            return "forking is off (fork=False or FASTFLOW_TEST_FORK=0)"
        if len(cmd) < 3 or cmd[0] != sys.executable or cmd[1] not in ("-m", "-c"):
            return "not `python -m <module>` or `python -c <code>` under this interpreter"
        base_path = self.env.get("PYTHONPATH", "")
        path = env.get("PYTHONPATH", "")
        if not path.endswith(base_path):
            return "PYTHONPATH does not end with the workers' PYTHONPATH"
        prepend = [p for p in path[: len(path) - len(base_path)].split(os.pathsep) if p]
        differ = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)} - {"PYTHONPATH"}
        if differ - RUNTIME_ENV:
            return f"environment differs in variables read at import: {sorted(differ - RUNTIME_ENV)}"
        threads = env.get("OMP_NUM_THREADS", "")
        if "OMP_NUM_THREADS" in differ and not (threads.isdigit() and int(threads) > 0):
            return "OMP_NUM_THREADS is not a thread count"
        return {"module" if cmd[1] == "-m" else "code": cmd[2], "args": list(cmd[3:]), "path_prepend": prepend}

    def start(self, cmd: list[str], env: dict | None = None, cwd: str | Path | None = None) -> CliProcess:
        env = self.env if env is None else env
        with self._lock:
            self._n += 1
            out, err = (Path(self._tmp.name) / f"{self._n}.{s}" for s in ("out", "err"))
        out.touch(), err.touch()  # readable at once, before the child opens them
        plan = self._plan(cmd, env)
        if not isinstance(plan, str):
            worker = self._take()
            worker.send({**plan, "env": env, "cwd": str(cwd) if cwd else None, "stdout": str(out), "stderr": str(err)})
            msg = worker.read(timeout=60)
            if msg is not None and "pid" in msg:
                self.forked += 1
                proc = CliProcess(cmd, msg["pid"], out, err, worker=worker)
                proc._on_done = lambda: self._give(worker, proc)
                with self._lock:
                    self._live.add(proc)
                return proc
            self._give(worker)
            plan = (msg or {}).get("fallback", f"the worker answered {msg}")
        self.spawned += 1
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        return CliProcess(cmd, popen.pid, out, err, popen=popen)

    def run(
        self, cmd: list[str], env: dict | None = None, cwd: str | Path | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)``."""
        proc = self.start(cmd, env, cwd)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        stdout, stderr = proc.output()
        proc.stdout_path.unlink(), proc.stderr_path.unlink()
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        w = _Worker(self.env, self.programs + self.preload)
        with self._lock:
            self._all.append(w)
        return w

    def _give(self, worker: _Worker, proc: CliProcess | None = None) -> None:
        with self._lock:
            self._live.discard(proc)
            self._idle.append(worker)

    def close(self) -> None:
        for proc in list(self._live):  # started and never waited for (a test failed on the way)
            proc.kill()
            proc.wait(timeout=30, _raise=False)
        for w in self._all:
            w.close()
        for w in self._all:
            w.join()
        self._tmp.cleanup()
