"""The kernel variants: every ``@triton.jit`` function of kernels/ found by inspection, every launch the public ops
make recorded instead of run, and each launch bound by Triton's own binder to the exact (signature, constexprs,
attrs, options) a GPU launch of the same call would compile. Also a variant's identity as a row, and which
functions are entries, which only helpers inlined into them."""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import pkgutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field

from .calls import OPS, SHAPES, calls, dtype_cases, run_call, tensors
from .targets import gpu_target

__all__ = [
    "Variant",
    "find_jit_functions",
    "callees",
    "qualname",
    "bind",
    "enumerate_variants",
    "describe",
    "coverage",
]


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


def callees(fn) -> set[str]:
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


def qualname(fn) -> str:
    return f"{fn.fn.__module__}.{fn.__name__}"


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
    reached_by: set = field(default_factory=set)
    shapes: set = field(default_factory=set)

    @property
    def kernel(self) -> str:
        return qualname(self.fn)


_BINDERS: dict[tuple[int, int], tuple] = {}


def bind(fn, args, kwargs, target):
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


def enumerate_variants(mode: str = "default") -> tuple[list[Variant], int]:
    """Every distinct kernel launch the public ops make over :data:`SHAPES` and the dtype cases of ``mode``.

    Returns the variants (deduplicated by Triton's own specialisation for sm_90: the binder's output does not
    depend on the arch) and how many launches were recorded."""
    launches_all = []
    variants: dict[str, Variant] = {}
    target = gpu_target(90)
    cases = {op: dtype_cases(op, mode) for op in OPS}
    with _recording(launches := []):
        for op in OPS:
            for dts in cases[op]:
                for shape_name, shape in SHAPES.items():
                    for label, how in calls(op):
                        del launches[:]
                        run_call(op, how, tensors(op, dts, shape, "cpu", how["req"]))
                        for fn, args, kwargs in launches:
                            launches_all.append((fn, args, kwargs, label, shape_name))
    for fn, args, kwargs, label, shape_name in launches_all:
        options, signature, constexprs, attrs = bind(fn, args, kwargs, target)
        key = repr((qualname(fn), sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items())))
        key += options.hash()
        v = variants.setdefault(key, Variant(fn, args, kwargs))
        v.reached_by.add(label)
        v.shapes.add(shape_name)
    return list(variants.values()), len(launches_all)


def describe(v: Variant, signature: dict, constexprs: dict, attrs: dict) -> dict:
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


def coverage(variants: list[Variant], found: dict[str, object]) -> dict:
    """Which @triton.jit functions are launched (entries), which are only called from them (helpers, compiled as
    part of their callers), and which neither."""
    entries = sorted({v.kernel for v in variants})
    helpers: dict[str, list[str]] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        for callee in sorted(callees(found[name])):
            if callee not in entries and name not in helpers.get(callee, []):
                helpers.setdefault(callee, []).append(name)
                todo.append(callee)
    return {
        "jit_functions": sorted(found),
        "entries": entries,
        "helpers": {k: sorted(v) for k, v in sorted(helpers.items())},
        "uncovered": sorted(set(found) - set(entries) - set(helpers)),
    }
