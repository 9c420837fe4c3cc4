"""Compiling: each variant through ``triton.compile`` for a target down to a cubin, with the log of the very ptxas
run that wrote it kept (registers, stack frame, spill stores and loads), cross-checked against the cubin
(``cuobjdump -res-usage``, its SHA-256); the kernel's metadata gives shared memory and warps. And the spill probe:
the widest variant held to :data:`PROBE_MAXNREG` registers, which must show spills."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from .targets import gpu_target
from .variants import Variant, bind, describe

__all__ = ["PROBE_MAXNREG", "compile_all", "spill_probe", "probe_variant", "tool", "tool_version"]

_PTXAS_RECORD = "aot-ptxas.json"
_RECORD_FORMAT = 2


class _PtxasCapture:
    """Stands in for the ``subprocess`` module inside ``triton.backends.nvidia.compiler``: ``run`` runs ptxas as
    Triton asked and keeps the command and its log (Triton sends ptxas' stderr to a temporary file it deletes)."""

    def __init__(self, real):
        self._real = real
        self.calls: list[tuple[list[str], str, str]] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        result = self._real.run(cmd, *args, **kwargs)
        if not os.path.basename(str(cmd[0])).startswith("ptxas"):
            return result
        err = kwargs.get("stderr")
        log = ""
        if hasattr(err, "name") and os.path.exists(err.name):
            with open(err.name) as f:
                log = f.read()
        cmd = [str(c) for c in cmd]
        out = cmd[cmd.index("-o") + 1] if "-o" in cmd else ""
        digest = _sha(Path(out).read_bytes()) if os.path.exists(out) else ""
        self.calls.append((cmd, log, digest))
        return result


def _sha(data: bytes) -> str:
    """The first 64 bits of a SHA-256, in hex: enough to tell two cubins apart, short in the JSON."""
    return hashlib.sha256(data).hexdigest()[:16]


def _parse_ptxas(log: str, name: str) -> dict:
    """Registers, stack frame and spill bytes of entry ``name`` from a ``ptxas -v`` log."""
    start = log.find(f"Compiling entry function '{name}'")
    part = log[start:] if start >= 0 else log
    regs = re.search(r"Used (\d+) registers", part)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", part)
    if not regs or not frame:
        raise ValueError(f"no register / spill line for {name} in the ptxas log:\n{log}")
    return {
        "registers": int(regs.group(1)),
        "stack_frame_bytes": int(frame.group(1)),
        "spill_stores_bytes": int(frame.group(2)),
        "spill_loads_bytes": int(frame.group(3)),
    }


def tool(name: str, cap: int) -> str:
    """The path of a CUDA tool bundled with Triton (``ptxas`` as Triton picks it for ``cap``; ``cuobjdump``)."""
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            return nv.get_ptxas(cap).path
        except (AttributeError, TypeError):  # older spellings
            return nv.get_ptxas().path
    return str(Path(nv.__file__).parent / "bin" / name)


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _res_usage(cubin: str, name: str) -> dict:
    """``cuobjdump -res-usage`` of a cubin: REG, STACK (the stack frame, where spills go), SHARED (static) and LOCAL
    (``.local`` variables) of function ``name``."""
    out = subprocess.run([tool("cuobjdump", 90), "-res-usage", cubin], capture_output=True, text=True, check=True)
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if not m:
        raise ValueError(f"no resource usage for {name} in cuobjdump's output:\n{out.stdout}")
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def _compile(v: Variant, cap: int, **extra) -> dict:
    """Compile one variant for ``cap`` down to a cubin; the row of figures, or of its error. ``extra``: launch
    options on top of the variant's own (the spill probe's ``maxnreg``), also recorded in the row."""
    target = gpu_target(cap)
    options, signature, constexprs, attrs = bind(v.fn, v.args, {**v.kwargs, **extra}, target)
    row = {**describe(v, signature, constexprs, attrs), "target": f"sm_{cap}", **extra}
    try:
        row.update(_figures(v.fn, target, options, signature, constexprs, attrs))
    except Exception as e:  # a compile error is a result: reported in the row, and the run fails
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _triton_compile(fn, target, options, signature, constexprs, attrs, force: bool = False):
    """``triton.compile`` as ``JITFunction.run`` calls it, with ptxas' log kept; ``force`` bypasses the cache."""
    import triton
    from triton.backends.nvidia import compiler as nv
    from triton.compiler import ASTSource

    capture = _PtxasCapture(nv.subprocess)
    nv.subprocess = capture
    if force:
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        t0 = time.perf_counter()
        ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        return ck, time.perf_counter() - t0, capture.calls
    finally:
        nv.subprocess = capture._real
        if force:
            del os.environ["TRITON_ALWAYS_COMPILE"]


def _figures(fn, target, options, signature, constexprs, attrs) -> dict:
    from triton.runtime.cache import get_cache_manager

    ck, seconds, calls = _triton_compile(fn, target, options, signature, constexprs, attrs)
    cache = get_cache_manager(ck.hash)
    record = None
    if not calls:  # from Triton's cache: ptxas' log is beside it, unless something else compiled it (a JIT launch)
        path = cache.get_file(_PTXAS_RECORD)
        record = json.loads(Path(path).read_text()) if path else None
        if record is None or record.get("format") != _RECORD_FORMAT:
            ck, seconds, calls = _triton_compile(fn, target, options, signature, constexprs, attrs, force=True)
            record = None
    if record is None:
        if len(calls) != 1:
            raise RuntimeError(f"expected one ptxas run in the compile, saw {len(calls)}")
        cmd, log, digest = calls[0]
        record = {
            "format": _RECORD_FORMAT,
            "ptxas_log": log,
            "ptxas_flags": [c for c in cmd[1:] if c.startswith("-") and c != "-o"],
            "ptxas_cubin_sha256": digest,
            "compile_s": seconds,
        }
        cache.put(json.dumps(record), _PTXAS_RECORD, binary=False)
    md = ck.metadata
    cubin = next(p for name, p in ck.metadata_group.items() if name.endswith(".cubin"))
    usage = _res_usage(cubin, md.name)
    return {
        **_parse_ptxas(record["ptxas_log"], md.name),
        "shared_bytes": int(md.shared),
        "num_warps": int(md.num_warps),
        "cubin_registers": usage["registers"],
        "cubin_stack_bytes": usage["stack"],
        "cubin_local_bytes": usage["local"],
        "compile_s": round(record["compile_s"], 3),  # when it was compiled (a cached row: in an earlier run)
        "cached": not calls,
        "hash": ck.hash,
        "ptxas_flags": record["ptxas_flags"],
        # The cubin in Triton's cache and the one the logged ptxas run wrote: equal, or the log is not its log.
        "cubin_sha256": _sha(Path(cubin).read_bytes()),
        "ptxas_cubin_sha256": record["ptxas_cubin_sha256"],
    }


_JOBS: list[tuple[Variant, int]] = []


def _job(i: int) -> dict:
    v, cap = _JOBS[i]
    return _compile(v, cap)


def compile_all(variants: list[Variant], caps: list[int], jobs: int = 1) -> list[dict]:
    """Every variant for every target, ``jobs`` processes at a time (forked: the variants hold kernels)."""
    global _JOBS
    _JOBS = [(v, cap) for v in variants for cap in caps]
    if jobs <= 1 or len(_JOBS) < 2:
        return [_job(i) for i in range(len(_JOBS))]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_job, range(len(_JOBS)), chunksize=1)


# -- the spill detector, tested ----------------------------------------------------------------------------------


PROBE_MAXNREG = 24


def spill_probe(variants: list[Variant], cap: int) -> dict:
    """The widest variant of ``_flow_path_fwd_kernel`` (u stored, fp32, no int divisible by 16: 54 registers on
    sm_80 and sm_90 with Triton 3.8) compiled through the same path with ``maxnreg`` = 24, which makes ptxas spill:
    the figures must show it, or every zero in the table means nothing."""
    return _compile(probe_variant(variants), cap, maxnreg=PROBE_MAXNREG)


def probe_variant(variants: list[Variant]) -> Variant:
    def score(v):
        ce = v.kwargs
        return (v.fn.__name__ == "_flow_path_fwd_kernel", bool(ce.get("WRITE_U")), "odd" in v.shapes) + tuple(
            a.dtype == torch.float32 for a in v.args if isinstance(a, torch.Tensor)
        )

    return max(variants, key=score)
