"""``python -m bench aot``: every Triton kernel in kernels/ compiled to a cubin for real GPU targets, no GPU needed.

    python -m bench aot [--targets sm_80,sm_90] [--dtypes default|all] [--out FILE.json] [--markdown] [--doc FILE.md]
                        [--jobs N] [--cache-dir DIR] [--check-gpu]

Triton's interpreter (how CI runs the kernels) accepts programs a real target rejects and says nothing of registers
or spills. Triton's own LLVM and its bundled ``ptxas`` build a cubin on a CPU-only machine, so this compiles each
kernel variant for each target and reads what the hardware would get.

**Which variants.** Not a hand-written list: the public ops (``kernels.flow_path``, ``flow_matching_loss``,
``euler_step_``, ``guided_euler_step_``) are called on CPU tensors, forward and backward through autograd for every
set of inputs that can require grad, with every launch of a ``@triton.jit`` kernel recorded instead of run
(``JITFunction.run`` is replaced in this process only). Each recorded launch goes through Triton's own binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, what ``JITFunction.run`` does before it compiles),
so the signature, the constexprs (``BLOCK``, ``WRITE_U``, ``HAS_GU``/``WRITE_DEPS``, ``GUIDED``, ...), the integer
and pointer specialisations (divisible by 16, equal to 1) and the options (``num_warps``) are exactly those a GPU
launch of the same call would compile. Dtypes come from the public ops' own checks: each input takes each dtype the
op accepts for it (``x`` of the Euler ops is fp32 only; the rest fp32, bf16, fp16), and the outputs take what the
launchers allocate. Shapes (:data:`SHAPES`): MNIST batches of 1, 80 and 128, which between them give every binary
any MNIST batch gets, and an odd (3, 1, 41, 41) with no int divisible by 16. ``--dtypes default`` compiles
uniform dtypes (every input fp32, bf16 or fp16 where accepted), ``amp`` (the network's output v in bf16, the rest
fp32: training and sampling under autocast) and each input alone in bf16 or fp16 with the rest fp32; ``--dtypes
all`` every combination the ops accept (6x the compiles). A kernel that is never launched and never called from a
launched kernel is reported as uncovered (exit status 1).

**Registers and spills.** Without a GPU Triton's ``CompiledKernel`` has no ``n_regs``/``n_spills`` (the driver fills
them when it loads the cubin). Triton itself runs ``ptxas -v`` to make the cubin and throws the log away; this tool
keeps it: ``subprocess.run`` inside ``triton.backends.nvidia.compiler`` is wrapped (here only) so the log of the very
ptxas run that wrote the cubin is parsed (registers, stack frame, spill stores and loads). No second ptxas run with
flags copied by hand (Triton 3.8 adds ``--regAllocOptLevel=2``, 3.6 does not: a copy would drift). The log is stored
next to the kernel in Triton's cache (``aot-ptxas.json``), so a warm run reads it back; a cached kernel without one
is recompiled once. Cross-checks, in every row: the SHA-256 of the cubin in Triton's cache equals that of the file
the logged ptxas run wrote, and ``cuobjdump -res-usage`` (bundled with Triton) reads the same REG and STACK from
it. And a spill probe (:func:`spill_probe`: the widest kernel held to 24 registers) must show spills, so that the
zeros mean something. Shared memory and warps come from the kernel's metadata (``shared`` is the dynamic shared
memory Triton asks for at launch).

Rows go to ``bench/results/kernels-aot.json`` (``--out``), one per kernel variant and target; ``--markdown`` prints
:func:`aot_table`, ``--doc`` writes docs/kernels-aot.md. Triton's cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``; ``--cache-dir``) makes a second run quick. ``--check-gpu`` (CUDA only) launches every variant
once through the same calls and compares the driver's ``n_regs`` and ``n_spills`` with the AOT rows of the local
GPU's arch, matched by Triton's compile hash.

Imports only torch, triton and kernels (not fastflow): it runs on a GPU machine's stock python too. Importing this
module imports neither triton nor kernels; :func:`main` sets ``TRITON_INTERPRET=0`` before it imports them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "TARGETS",
    "LIMITS",
    "SHAPES",
    "Variant",
    "find_jit_functions",
    "enumerate_variants",
    "compile_all",
    "aot_table",
    "label",
    "check_gpu",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_OUT = RESULTS / "kernels-aot.json"
COMMAND = "python -m bench aot --out bench/results/kernels-aot.json --doc docs/kernels-aot.md"

TARGETS = ("sm_80", "sm_90")  # A100; H100 / H200

# Per-target hardware limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"):
# 255 registers per thread on every arch since sm_35; a 64 Ki-register file per SM (a block's warps·32·regs must
# fit); shared memory per block with the opt-in Triton makes for a large request: 163 KiB on sm_80, 227 KiB on
# sm_90 (the 1 KiB the system reserves per block excluded).
LIMITS = {
    80: {"registers": 255, "register_file": 65536, "shared": 163 * 1024, "threads": 1024},
    90: {"registers": 255, "register_file": 65536, "shared": 227 * 1024, "threads": 1024},
}

# The shapes of z / eps / v / x each op is called with (t is (B,)). The shape reaches the kernels only through the ints
# the launchers pass, which Triton specialises (divisible by 16, or equal to 1: a different binary). For MNIST
# (n = 784·B elements, 784 per sample) n and the per-sample count are always divisible by 16, and only the loss's
# count of partial sums m = ceil(n / 4096) varies: 1 for B <= 5, a multiple of 16 for some B (80 is the first), else
# neither. So these three batches give every binary any MNIST batch gets (n < 2^31, past which n is an i64); the
# odd shape stands for everything else (n = 5043, per-sample 1681, m = 2: nothing divisible by 16).
SHAPES: dict[str, tuple[int, ...]] = {
    "mnist-b1": (1, 1, 28, 28),
    "mnist-b80": (80, 1, 28, 28),
    "mnist-b128": (128, 1, 28, 28),
    "odd": (3, 1, 41, 41),
}

# Floating dtypes offered to every input; the public op's checks decide which it accepts (float64: none today).
CANDIDATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Inputs that come out of the network: bf16 under autocast while the data, noise and ODE state stay fp32.
NETWORK_OUTPUTS = ("v", "v_cond", "v_uncond")


def _short(dt: torch.dtype) -> str:
    return SHORT.get(dt, str(dt).removeprefix("torch."))


# -- the kernels --------------------------------------------------------------------------------------------------


def _kernel_modules() -> list:
    """Every module of the kernels package, imported (the Triton op modules register their ops on import)."""
    import kernels

    mods = [kernels]
    for info in pkgutil.iter_modules(kernels.__path__):
        mods.append(importlib.import_module(f"kernels.{info.name}"))
    return mods


def find_jit_functions() -> dict[str, object]:
    """``{"kernels.loss._diff": <JITFunction>, ...}``: every ``@triton.jit`` function defined in kernels/, found by
    inspecting the modules (not by a list). Raises if they were built for the interpreter."""
    from triton.runtime.jit import JITFunction

    found = {}
    for mod in _kernel_modules():
        for name, obj in vars(mod).items():
            kind = type(obj).__name__
            if kind == "InterpretedFunction":
                raise RuntimeError(
                    "the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when triton was imported): "
                    "run bench.aot in a fresh process (python -m bench aot sets TRITON_INTERPRET=0 itself)"
                )
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    return found


def _callees(fn) -> set[str]:
    """Qualified names of the @triton.jit functions that ``fn``'s body calls by name (they are inlined into it, so
    they are compiled as part of it)."""
    from triton.runtime.jit import JITFunction

    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            target = fn.fn.__globals__.get(node.func.id)
            if isinstance(target, JITFunction):
                out.add(f"{target.fn.__module__}.{node.func.id}")
    return out


def _qualname(fn) -> str:
    return f"{fn.fn.__module__}.{fn.__name__}"


# -- the calls that reach the kernels -------------------------------------------------------------------------------

# Each public op, its tensor inputs (the ones whose dtype the caller picks) and the inputs that can require grad.
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flow_path": (("z", "eps", "t"), ("z", "eps", "t")),
    "flow_matching_loss": (("v", "z", "eps"), ("v", "z", "eps")),
    "euler_step_": (("x", "v"), ()),
    "guided_euler_step_": (("x", "v_cond", "v_uncond"), ()),
}


def _subsets(items: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for k in range(len(items) + 1) for c in itertools.combinations(items, k)]


def _calls(op: str) -> list[tuple[str, dict]]:
    """(label, how) for every way to call ``op`` that reaches a different launch: forward alone, and forward +
    backward for each non-empty set of inputs requiring grad (and, for flow_path with its target, each choice of
    which outputs the loss reads: an unread output's gradient is None)."""
    _, grads = OPS[op]
    if op == "flow_path":
        forms = [(True, [("x_t", "u"), ("x_t",), ("u",)]), (False, [("x_t",)])]
    else:
        forms = [(None, [("loss",)])]
    out = []
    for with_target, reads in forms:
        name = op if with_target is None else f"{op}(with_target={with_target})"
        out.append((name, {"with_target": with_target, "req": (), "used": ()}))
        for req in _subsets(grads)[1:]:
            for used in reads:
                label = f"{name}, backward: grad of {'+'.join(req)}"
                label += f" from {'+'.join(used)}" if with_target else ""
                out.append((label, {"with_target": with_target, "req": req, "used": used}))
    return out


def _run_call(op: str, how: dict, t: dict[str, torch.Tensor]) -> None:
    """Call the public op on the tensors ``t`` (and backward, as ``how`` says)."""
    import kernels

    if op == "flow_path":
        x_t, u = kernels.flow_path(t["z"], t["eps"], t["t"], with_target=how["with_target"])
        outs = {"x_t": x_t, "u": u}
    elif op == "flow_matching_loss":
        outs = {"loss": kernels.flow_matching_loss(t["v"], t["z"], t["eps"])}
    elif op == "euler_step_":
        kernels.euler_step_(t["x"], t["v"], 1e-3)
        return
    elif op == "guided_euler_step_":
        kernels.guided_euler_step_(t["x"], t["v_cond"], t["v_uncond"], 1e-3, 1.5)
        return
    else:  # pragma: no cover - OPS and this function are edited together
        raise KeyError(op)
    used = [outs[name] for name in how["used"]]
    if used:
        torch.autograd.backward(used, [torch.ones_like(o) for o in used])


def _tensors(op: str, dtypes: dict[str, torch.dtype], shape, device, req=()) -> dict[str, torch.Tensor]:
    out = {}
    for role in OPS[op][0]:
        s = (shape[0],) if role == "t" else shape
        x = torch.empty(s, device=device, dtype=dtypes[role])  # values never matter: nothing runs on them
        out[role] = x.requires_grad_() if role in req else x
    return out


def accepted_dtypes(op: str) -> dict[str, tuple[torch.dtype, ...]]:
    """Per input of ``op``, the dtypes its public checks accept (one input varied at a time, the rest fp32): a
    ``TypeError`` from ``kernels``' own argument checks means rejected. Runs the reference backend on 2 elements."""
    import kernels

    roles = OPS[op][0]
    out = {}
    for role in roles:
        ok = []
        for dt in CANDIDATE_DTYPES:
            dts = {r: (dt if r == role else torch.float32) for r in roles}
            try:
                with kernels.use_backend("reference"):
                    _run_call(op, {"with_target": True, "req": (), "used": ()}, _tensors(op, dts, (2, 1), "cpu"))
            except TypeError:
                continue
            ok.append(dt)
        out[role] = tuple(ok)
    return out


def dtype_cases(op: str, mode: str) -> list[dict[str, torch.dtype]]:
    """The dtype assignments ``op`` is compiled for. ``default``: uniform fp32 / bf16 / fp16 (an input that does not
    accept it stays fp32), ``amp`` (network outputs bf16, the rest fp32), and each input alone in each dtype it
    accepts with the rest fp32 (mixing is what changes the code: a load and a store of different widths get
    different layouts, converted through shared memory). ``all``: every accepted combination (6x the compiles)."""
    acc = accepted_dtypes(op)
    roles = OPS[op][0]
    if mode == "all":
        return [dict(zip(roles, combo)) for combo in itertools.product(*(acc[r] for r in roles))]
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        cases.append({r: (dt if dt in acc[r] else torch.float32) for r in roles})
    cases.append({r: (torch.bfloat16 if r in NETWORK_OUTPUTS else torch.float32) for r in roles})
    for role in roles:
        for dt in acc[role]:
            cases.append({r: (dt if r == role else torch.float32) for r in roles})
    unique = []
    for c in cases:
        if c not in unique:
            unique.append(c)
    return unique


@contextlib.contextmanager
def _recording(launches: list) -> Iterator[None]:
    """Every ``JITFunction`` launch in this process is appended to ``launches`` as ``(fn, args, kwargs)`` instead of
    run, and the public ops dispatch to the Triton path on CPU tensors (``kernels._use_triton``: only the decision
    is replaced; the op modules are loaded by the real ``_load_triton``)."""
    from triton.runtime.jit import JITFunction

    import kernels

    kernels._load_triton()
    real_run, real_use = JITFunction.run, kernels._use_triton

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    kernels._use_triton = lambda device: True
    try:
        yield
    finally:
        JITFunction.run, kernels._use_triton = real_run, real_use


@dataclass
class Variant:
    """One compilation: a kernel with the exact (signature, constexprs, attrs, options) Triton's binder produced."""

    fn: object
    args: tuple
    kwargs: dict
    key: str = ""
    reached_by: set = field(default_factory=set)
    shapes: set = field(default_factory=set)

    @property
    def kernel(self) -> str:
        return _qualname(self.fn)


_BINDERS: dict[tuple[int, int], tuple] = {}


def _bind(fn, args, kwargs, target):
    """What ``JITFunction.run`` computes before it compiles: (options, signature, constexprs, attrs) for ``target``
    (Triton 3.4+: ``create_function_from_signature`` and ``JITFunction._pack_args``; checked on 3.6 and 3.8)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    key = (id(fn), target.arch)
    if key not in _BINDERS:  # one per kernel and arch, as JITFunction keeps one per device (building it: ~0.3 ms)
        backend = make_backend(target)
        _BINDERS[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[key]
    bound_args, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _gpu_target(cap: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", cap, 32)


def _cap(target: str) -> int:
    m = re.fullmatch(r"sm_?(\d+)", target)
    if not m:
        raise ValueError(f"target must look like sm_80, got {target!r}")
    return int(m.group(1))


def enumerate_variants(mode: str = "default", device: str = "cpu") -> tuple[list[Variant], list[tuple]]:
    """Every distinct kernel launch the public ops make over :data:`SHAPES` and the dtype cases of ``mode``.

    Returns the variants (deduplicated by Triton's own specialisation for sm_90: the binder's output does not
    depend on the arch) and every recorded launch ``(fn, args, kwargs, label, shape)``."""
    launches_all = []
    variants: dict[str, Variant] = {}
    target = _gpu_target(90)
    cases = {op: dtype_cases(op, mode) for op in OPS}
    with _recording(launches := []):
        for op in OPS:
            for dts in cases[op]:
                for shape_name, shape in SHAPES.items():
                    for label, how in _calls(op):
                        del launches[:]
                        _run_call(op, how, _tensors(op, dts, shape, device, how["req"]))
                        for fn, args, kwargs in launches:
                            launches_all.append((fn, args, kwargs, label, shape_name))
    for fn, args, kwargs, label, shape_name in launches_all:
        options, signature, constexprs, attrs = _bind(fn, args, kwargs, target)
        key = repr((_qualname(fn), sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items())))
        key += options.hash()
        v = variants.setdefault(key, Variant(fn, args, kwargs, key))
        v.reached_by.add(label)
        v.shapes.add(shape_name)
    return list(variants.values()), launches_all


# -- compiling ----------------------------------------------------------------------------------------------------

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


def _tool(name: str, cap: int) -> str:
    """The path of a CUDA tool bundled with Triton (``ptxas`` as Triton picks it for ``cap``; ``cuobjdump``)."""
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            return nv.get_ptxas(cap).path
        except (AttributeError, TypeError):  # older spellings
            return nv.get_ptxas().path
    return str(Path(nv.__file__).parent / "bin" / name)


def _version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _res_usage(cubin: str, name: str) -> dict:
    """``cuobjdump -res-usage`` of a cubin: REG, STACK (the stack frame, where spills go), SHARED (static) and LOCAL
    (``.local`` variables) of function ``name``."""
    out = subprocess.run([_tool("cuobjdump", 90), "-res-usage", cubin], capture_output=True, text=True, check=True)
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if not m:
        raise ValueError(f"no resource usage for {name} in cuobjdump's output:\n{out.stdout}")
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def _compile(v: Variant, cap: int) -> dict:
    """Compile one variant for ``cap`` down to a cubin; the row of figures, or of its error."""
    target = _gpu_target(cap)
    options, signature, constexprs, attrs = _bind(v.fn, v.args, v.kwargs, target)
    row = _describe(v, signature, constexprs, attrs)
    row["target"] = f"sm_{cap}"
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


def _describe(v: Variant, signature: dict, constexprs: dict, attrs: dict) -> dict:
    """The row's identity: kernel, constexprs (the ``tl.constexpr`` parameters), dtypes of the pointers, the
    specialisation of the other ints and pointers (``16``: divisible by 16; ``=1``: the constant 1)."""
    names = v.fn.arg_names
    declared = {p.name for p in v.fn.params if p.is_constexpr}
    cexpr, spec, dtypes = {}, {}, {}
    for path, val in constexprs.items():
        name = names[path[0]]
        if name in declared:
            cexpr[name] = val
        else:
            spec[name] = f"={val}"
    for path, a in attrs.items():
        name = names[path[0]]
        if any(k == "tt.divisibility" for k, _ in a) and not signature[name].startswith("*"):
            spec[name] = "16"
    for name, ty in signature.items():
        if isinstance(ty, str) and ty.startswith("*"):
            dtypes[name.removesuffix("_ptr")] = ty[1:]
            if not any(names[p[0]] == name for p in attrs):
                spec[name] = "unaligned"
    return {
        "kernel": v.kernel,
        "constexprs": {k: cexpr[k] for k in names if k in cexpr},
        "dtypes": dtypes,
        "specialization": {k: spec[k] for k in names if k in spec},
        "shapes": sorted(v.shapes, key=list(SHAPES).index),
        "example_call": min(v.reached_by, key=lambda c: (len(c), c)),  # the simplest call that launches it
        "calls": len(v.reached_by),
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
    v = _probe_variant(variants)
    target = _gpu_target(cap)
    options, signature, constexprs, attrs = _bind(v.fn, v.args, {**v.kwargs, "maxnreg": PROBE_MAXNREG}, target)
    row = {**_describe(v, signature, constexprs, attrs), "target": f"sm_{cap}", "maxnreg": PROBE_MAXNREG}
    try:
        row.update(_figures(v.fn, target, options, signature, constexprs, attrs))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _probe_variant(variants: list[Variant]) -> Variant:
    def score(v):
        ce = v.kwargs
        return (v.fn.__name__ == "_flow_path_fwd_kernel", bool(ce.get("WRITE_U")), "odd" in v.shapes) + tuple(
            a.dtype == torch.float32 for a in v.args if isinstance(a, torch.Tensor)
        )

    return max(variants, key=score)


# -- the table ------------------------------------------------------------------------------------------------------


def _fmt_map(d: dict, sep: str = " ") -> str:
    return sep.join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) or "–"


def _fmt_spec(d: dict) -> str:
    return " ".join(f"{k}{v}" if v.startswith("=") else f"{k}:{v}" for k, v in d.items()) or "–"


def label(r: dict) -> str:
    """A row's variant and target in one line: ``kernels.path._flow_path_bwd_kernel HAS_GU=true ... | gx=fp32 ... |
    n:16 | sm_90``."""
    return " | ".join([*_variant_id(r), r["target"]])


def _variant_id(r: dict) -> tuple:
    return (r["kernel"], _fmt_map(r["constexprs"]), _fmt_map(r["dtypes"]), _fmt_spec(r["specialization"]))


def aot_table(rows: list[dict]) -> str:
    """Markdown: one line per kernel × constexprs × dtypes × specialisation, per target its registers and spill
    stores/loads in bytes, then shared memory in bytes and warps (one value, or one per target where they
    differ). A target whose compile failed shows ``error``."""
    targets = sorted({r["target"] for r in rows}, key=_cap)
    head = ["kernel", "constexprs", "dtypes", "specialisation"]
    head += [f"regs {t}" for t in targets] + [f"spill st/ld B {t}" for t in targets] + ["smem B", "warps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "--:" for i in range(len(head))) + "|"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault(_variant_id(r), {})[r["target"]] = r
    for vid in sorted(cells):
        per = cells[vid]
        regs, spills, smem, warps = [], [], [], []
        for t in targets:
            r = per.get(t)
            if r is None or "error" in r:
                regs.append("error" if r else "–")
                spills.append("–")
                continue
            regs.append(str(r["registers"]))
            spills.append(f"{r['spill_stores_bytes']}/{r['spill_loads_bytes']}")
            smem.append(str(r["shared_bytes"]))
            warps.append(str(r["num_warps"]))
        one = [(" / ".join(x) if len(set(x)) > 1 else (x[0] if x else "–")) for x in (smem, warps)]
        name = vid[0].removeprefix("kernels.")
        lines.append("| " + " | ".join([f"`{name}`", *vid[1:], *regs, *spills, *one]) + " |")
    return "\n".join(lines)


def _summary(doc: dict) -> str:
    rows = [r for r in doc["rows"] if "error" not in r]
    lines = []
    for t in doc["targets"]:
        rt = [r for r in rows if r["target"] == t]
        if not rt:
            continue
        worst = max(rt, key=lambda r: r["registers"])
        spills = sum(r["spill_stores_bytes"] + r["spill_loads_bytes"] for r in rt)
        lines.append(
            f"- {t}: {len(rt)} variants, registers {min(r['registers'] for r in rt)}–{worst['registers']} "
            f"(most: `{worst['kernel'].removeprefix('kernels.')}`), spill bytes {spills}, "
            f"shared memory up to {max(r['shared_bytes'] for r in rt)} B"
        )
    for r in rows:
        if r["spill_stores_bytes"] or r["spill_loads_bytes"]:
            lines.append(
                f"- **spills**: {label(r)}: {r['registers']} registers, {r['spill_stores_bytes']} B spill stores, "
                f"{r['spill_loads_bytes']} B spill loads ({r['example_call']}, shapes {', '.join(r['shapes'])})"
            )
    return "\n".join(lines)


def write_doc(doc: dict, path: Path) -> None:
    """The markdown page: how it was made, a summary per target, :func:`aot_table`."""
    text = f"""# Triton kernels compiled for real GPUs, without a GPU

Made by `{COMMAND}`
(how: the docstring of bench/aot.py). `tests/kernels/test_aot.py` compiles everything again and fails on a compile
error, on any register spill, on a resource past the target's limit, or when this table no longer matches what the
tool produces.

Triton {doc["triton"]}, ptxas {doc["ptxas"]}. One line per kernel variant the public ops launch: its constexprs, the
dtypes of its pointers, and Triton's specialisation of its ints (`n:16`: divisible by 16, `m=1`: the constant 1,
`–`: none); per target the registers per thread and the spill stores / loads in bytes; dynamic shared memory in
bytes and warps per program (one value where the targets agree).

{_summary(doc)}

{aot_table(doc["rows"])}
"""
    _atomic_write(path, text)


def _to_json(doc: dict) -> str:
    """Indented, but one line per row: small, and a changed figure is a one-line diff."""
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1)
    rows = ",\n".join("  " + json.dumps(r) for r in doc["rows"])
    return head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- checks -----------------------------------------------------------------------------------------------------------


def problems(doc: dict) -> list[str]:
    """Everything wrong with a run: compile errors, spills, limits exceeded, an inconsistent register count, an
    uncovered kernel. Empty when all is well."""
    out = []
    for r in doc["rows"]:
        where = label(r)
        if "error" in r:
            out.append(f"{where}: compile error: {r['error']}")
            continue
        lim = LIMITS.get(_cap(r["target"]), LIMITS[90])
        if r["spill_stores_bytes"] or r["spill_loads_bytes"] or r["stack_frame_bytes"]:
            out.append(
                f"{where}: spills {r['spill_stores_bytes']} B stored, {r['spill_loads_bytes']} B loaded, "
                f"{r['stack_frame_bytes']} B stack frame"
            )
        if r["registers"] > lim["registers"] or r["registers"] * 32 * r["num_warps"] > lim["register_file"]:
            out.append(f"{where}: {r['registers']} registers x {r['num_warps']} warps exceed the limits {lim}")
        if r["shared_bytes"] > lim["shared"]:
            out.append(f"{where}: {r['shared_bytes']} B of shared memory > {lim['shared']}")
        if r["num_warps"] * 32 > lim["threads"]:
            out.append(f"{where}: {r['num_warps']} warps > {lim['threads']} threads")
        if (r["cubin_registers"], r["cubin_stack_bytes"]) != (r["registers"], r["stack_frame_bytes"]):
            out.append(
                f"{where}: ptxas' log says {r['registers']} registers / {r['stack_frame_bytes']} B stack but the "
                f"cubin has {r['cubin_registers']} / {r['cubin_stack_bytes']} B"
            )
        if r["cubin_sha256"] != r["ptxas_cubin_sha256"]:
            out.append(f"{where}: the cubin in Triton's cache is not the one the logged ptxas run wrote")
    for r in doc.get("spill_probe", []):
        if "error" in r or not (r["spill_stores_bytes"] and r["cubin_stack_bytes"] == r["stack_frame_bytes"]):
            out.append(f"the spill detector missed the spills of a kernel held to {PROBE_MAXNREG} registers: {r}")
    k = doc["kernels"]
    if k["uncovered"]:
        out.append(f"@triton.jit functions neither launched nor called by a launched kernel: {k['uncovered']}")
    return out


def coverage(variants: list[Variant], found: dict[str, object]) -> dict:
    """Which @triton.jit functions are launched (entries), which are only called from them (helpers, compiled as
    part of their callers), and which neither."""
    entries = sorted({v.kernel for v in variants})
    helpers: dict[str, list[str]] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        for callee in sorted(_callees(found[name])):
            if callee not in entries and name not in helpers.get(callee, []):
                helpers.setdefault(callee, []).append(name)
                todo.append(callee)
    return {
        "jit_functions": sorted(found),
        "entries": entries,
        "helpers": {k: sorted(v) for k, v in sorted(helpers.items())},
        "uncovered": sorted(set(found) - set(entries) - set(helpers)),
    }


# -- on a GPU -------------------------------------------------------------------------------------------------------


def check_gpu(rows: list[dict], mode: str = "default") -> list[str]:
    """Launch every variant once on the current CUDA device through the same calls, then compare each kernel Triton
    compiled (its JIT cache) with the AOT row of the same compile hash: the driver's ``n_regs`` with the registers,
    its ``n_spills`` (local memory per thread / 4) with (stack frame + local) / 4. Then the same for the spill
    probe (a kernel held to 24 registers, launched directly), so a driver figure that does not mean what the AOT
    one does shows up even though no real variant spills. Returns the report's lines; one that starts with
    ``MISMATCH``, ``MISSING`` or ``FAILED`` is a failure."""
    import kernels

    major, minor = torch.cuda.get_device_capability()
    cap = 10 * major + minor
    by_hash = {r["hash"]: r for r in rows if r["target"] == f"sm_{cap}" and "error" not in r}
    launched, failed = 0, []
    for op in OPS:
        for dts in dtype_cases(op, mode):
            for shape in SHAPES.values():
                for label, how in _calls(op):
                    try:
                        with kernels.use_backend("triton"):
                            _run_call(op, how, _tensors(op, dts, shape, "cuda", how["req"]))
                        torch.cuda.synchronize()
                        launched += 1
                    except Exception as e:  # keep going: every other variant is still worth its comparison
                        failed.append(f"FAILED {label} {_fmt_map({k: _short(d) for k, d in dts.items()})} {shape}: {e}")
    report, seen = [], set()

    def compare(what: str, ck, row: dict) -> None:
        ck._init_handles()
        aot = (row["registers"], (row["stack_frame_bytes"] + row["cubin_local_bytes"]) // 4)
        ok = (ck.n_regs, ck.n_spills) == aot
        report.append(
            f"{'ok' if ok else 'MISMATCH'} {what} {_fmt_map(row['constexprs'])} {_fmt_map(row['dtypes'])} "
            f"{_fmt_spec(row['specialization'])}: driver n_regs {ck.n_regs} n_spills {ck.n_spills}, "
            f"AOT {aot[0]} / {aot[1]}"
        )

    for name, fn in find_jit_functions().items():
        for caches in fn.device_caches.values():
            for ck in caches[0].values():
                what = f"{name} {ck.hash[:12]}"
                if ck.hash not in by_hash:
                    report.append(f"MISSING {what}: launched on the GPU but no AOT row has its compile hash")
                    continue
                seen.add(ck.hash)
                compare(what, ck, by_hash[ck.hash])
    for h, r in by_hash.items():
        if h not in seen:
            report.append(f"MISSING {r['kernel']} {h[:12]}: an AOT row the GPU run never compiled")
    report += failed
    report.append(f"{launched} calls launched; {len(seen)} of {len(by_hash)} AOT rows for sm_{cap} matched by hash")

    variants, _ = enumerate_variants(mode)
    probe = spill_probe(variants, cap)
    v = _probe_variant(variants)
    args = [torch.empty_like(a, device="cuda") if isinstance(a, torch.Tensor) else a for a in v.args]
    try:
        ck = v.fn[(1,)](*args, **v.kwargs, maxnreg=PROBE_MAXNREG)  # one program: only its registers matter
        torch.cuda.synchronize()
    except Exception as e:
        report.append(f"FAILED spill probe launch: {type(e).__name__}: {e}")
        return report
    if "error" in probe or ck.hash != probe["hash"]:
        report.append(f"MISSING spill probe: the GPU compiled {ck.hash[:12]}, the AOT probe {probe}")
    else:
        compare(f"spill probe (maxnreg {PROBE_MAXNREG}) {v.kernel}", ck, probe)
    return report


# -- the command line -------------------------------------------------------------------------------------------------


def run(targets: list[str], mode: str = "default", jobs: int = 1) -> dict:
    """Enumerate, compile and check; the document written to JSON."""
    import triton

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the enumeration's tensor ops are tiny; no thread pool to carry into the fork
    found = find_jit_functions()
    variants, launches = enumerate_variants(mode)
    t1 = time.perf_counter()
    caps = [_cap(t) for t in targets]
    rows = compile_all(variants, caps, jobs)
    probes = [spill_probe(variants, cap) for cap in caps]
    t2 = time.perf_counter()
    order = {name: i for i, name in enumerate(found)}
    rows.sort(key=lambda r: (order[r["kernel"]], *_variant_id(r), _cap(r["target"])))
    return {
        "suite": "aot",
        "command": "python -m bench aot " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["aot"] else sys.argv[1:]),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": _version(_tool("ptxas", max(caps))),
        "targets": [f"sm_{c}" for c in caps],
        "dtypes": mode,
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "kernels": coverage(variants, found),
        "launches_recorded": len(launches),
        "timing": {
            "enumerate_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2),
            "jobs": jobs,
            "compiled": sum(1 for r in rows if not r.get("cached", True)),
            "from_cache": sum(1 for r in rows if r.get("cached")),
        },
        "spill_probe": probes,
        "rows": rows,
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench aot", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated sm_XX (default sm_80,sm_90)")
    p.add_argument("--dtypes", default="default", choices=["default", "all"], help="dtype cases (see the module doc)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="rows as JSON (default bench/results/kernels-aot.json)")
    p.add_argument("--markdown", action="store_true", help="print the markdown table")
    p.add_argument("--doc", default=None, help="also write the markdown document (docs/kernels-aot.md)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p.add_argument("--jobs", type=int, default=min(cores, 8), help="compile processes (default: cores, at most 8)")
    p.add_argument("--cache-dir", default=None, help="Triton's cache (default: $TRITON_CACHE_DIR or ~/.triton/cache)")
    p.add_argument("--check-gpu", action="store_true", help="also launch every variant on this machine's CUDA GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if "triton" not in sys.modules:
        # Real JITFunctions, not the interpreter's: @triton.jit decides when triton is imported (and a process that
        # already imported it with TRITON_INTERPRET=1 gets a clear error from find_jit_functions).
        os.environ["TRITON_INTERPRET"] = "0"
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    targets = [t for t in args.targets.split(",") if t]
    try:
        caps = [_cap(t) for t in targets]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_gpu:
        if not torch.cuda.is_available():
            print("error: --check-gpu needs a CUDA GPU", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        if 10 * major + minor not in caps:
            targets.append(f"sm_{10 * major + minor}")
    t0 = time.perf_counter()
    doc = run(targets, args.dtypes, args.jobs)
    doc["timing"]["total_s"] = round(time.perf_counter() - t0, 2)
    _atomic_write(Path(args.out), _to_json(doc))
    if args.doc:
        write_doc(doc, Path(args.doc))
    bad = problems(doc)
    tm = doc["timing"]
    print(
        f"aot: {len(doc['rows'])} compilations ({len(doc['rows']) // max(1, len(doc['targets']))} variants x "
        f"{', '.join(doc['targets'])}), {tm['compiled']} compiled and {tm['from_cache']} from Triton's cache, "
        f"{tm['jobs']} jobs: enumerate {tm['enumerate_s']} s, compile {tm['compile_s']} s, total {tm['total_s']} s; "
        f"triton {doc['triton']}, ptxas {doc['ptxas']} -> {args.out}",
        file=sys.stderr,
    )
    if args.markdown:
        print(_summary(doc) + "\n\n" + aot_table(doc["rows"]))
    if args.check_gpu:
        report = check_gpu(doc["rows"], args.dtypes)
        print("\n".join(report))
        bad += [line for line in report if line.startswith(("MISMATCH", "MISSING", "FAILED"))]
    for line in bad:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
