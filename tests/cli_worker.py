"""The warm process behind tests/cli_runner.py: it imports fastflow's programs once, then runs each request in a
forked child that begins where ``python -m <module> <args>`` would be after its imports.

Started as ``python -c "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')" <this file> <module>...``
(the modules to import up front; run that way so that
``sys.path`` is the one ``python -m`` gets: the current folder first, then ``PYTHONPATH``) with the environment the
requests share. Protocol: one JSON request per line on stdin; replies, one JSON line each on stdout: ``{"pid": n}``
when the child started, then ``{"rc": code}`` when it ended (a negative code: killed by that signal, as
``subprocess`` reports it); or ``{"fallback": reason}`` when the request cannot run here (the runner then starts a
real process).

Forking after ``import torch`` is safe while this process has never run a parallel op: it holds one thread (checked
before each fork), and CUDA is hidden (``CUDA_VISIBLE_DEVICES=""``) and never initialised.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import json
import os
import random
import runpy
import signal
import sys
import traceback
import types
from pathlib import Path

# Environment variables that fastflow reads when it first imports a module, and the modules that read them: a
# request that sets another value gets those modules re-executed in its child (their functions read the module's
# globals, so references taken elsewhere by `from ... import` see the new value too).
RELOAD = {"FASTFLOW_FAULT": ["fastflow.io"]}


def _reply(msg: dict) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _shadowed(paths: list[str]) -> list[str]:
    """Modules already imported here that a new ``PYTHONPATH`` entry would have provided in a fresh process."""
    hits = []
    for entry in paths:
        p = Path(entry)
        if not p.is_dir():
            continue
        for f in p.iterdir():
            name = f.stem if f.suffix == ".py" else f.name if f.is_dir() else None
            if name and name.isidentifier() and name in sys.modules:
                hits.append(f"{name} (from {entry})")
    return hits


def _exit_code(e: SystemExit) -> int:
    """What the interpreter makes of ``sys.exit(x)``: None is 0, an int itself, anything else printed and 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(req: dict) -> None:
    """Become ``python -m <module> <args>`` (or ``python -c <code> <args>``); never returns."""
    code, kill = 1, 0
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        old_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[1:1] = req.get("path_prepend", [])
        importlib.invalidate_caches()
        for var, modules in RELOAD.items():
            if os.environ.get(var) != old_env.get(var):
                for name in modules:
                    if name in sys.modules:
                        importlib.reload(sys.modules[name])
        # A fresh process draws fresh seeds; a forked one would share this process's.
        random.seed()
        import torch

        torch.seed()
        if os.environ.get("OMP_NUM_THREADS") != old_env.get("OMP_NUM_THREADS"):
            # torch reads it at start-up; this process has never started a thread pool, so setting the count now
            # is what a fresh process would have done (Inductor's C++ kernels and its cache key depend on it).
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        try:
            if req.get("code") is not None:  # python -c CODE ARGS: sys.path[0] is "", CODE runs in a new __main__
                sys.argv, sys.path[0] = ["-c", *req["args"]], ""
                main = types.ModuleType("__main__")
                main.__builtins__ = builtins
                sys.modules["__main__"] = main
                exec(compile(req["code"], "<string>", "exec"), main.__dict__)
            else:  # python -m MODULE ARGS: sys.path[0] is the working folder
                sys.argv, sys.path[0] = [req["module"], *req["args"]], os.getcwd()
                # As in a fresh process the program exists only as __main__ (and runpy warns about a module it finds
                # imported): its own code runs again, everything it imports is warm.
                sys.modules.pop(req["module"], None)
                runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:
            traceback.print_exc()
            kill = signal.SIGINT  # the interpreter ends itself with SIGINT then
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    except BaseException:  # the harness itself failed: say so on the child's stderr
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if kill:
            signal.signal(kill, signal.SIG_DFL)
            os.kill(os.getpid(), kill)
        os._exit(code & 0xFF)


def serve(preload: list[str]) -> None:
    for name in preload:
        importlib.import_module(name)
    _reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        shadowed = _shadowed(req.get("path_prepend", []))
        if shadowed:
            _reply({"fallback": f"PYTHONPATH would shadow modules already imported here: {shadowed}"})
            continue
        threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
        if threads != 1:  # a thread pool does not survive fork(): the child could hang
            _reply({"fallback": f"the warm worker holds {threads} threads"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"rc": os.waitstatus_to_exitcode(status)})
    os._exit(0)  # stdin closed: done (skipping the interpreter's clean-up of torch saves a second or more)


if __name__ == "__main__":
    serve(sys.argv[2:])  # argv: -c, this file, the modules
