"""The dispatch point, argument errors on both backends, the launch device guard, the lazy import of the Triton
modules, and torch.compile(fullgraph=True) through the ops."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from kernel_asserts import assert_close, data, normal

import kernels
from kernels import _checks, _launch, reference
from kernels import euler as triton_euler
from kernels import loss as triton_loss
from kernels import path as triton_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ["triton", "reference"]

# --- dispatch -------------------------------------------------------------------------------------------------

z3 = torch.zeros(3, 1, 4, 4)
t3 = torch.full((3,), 0.5)
CALLS = {  # public op, its Triton-module twin, a call
    "flow_path": (triton_path, "flow_path", lambda: kernels.flow_path(z3, z3, t3)),
    "flow_path no target": (triton_path, "flow_path", lambda: kernels.flow_path(z3, z3, t3, with_target=False)),
    "flow_matching_loss": (triton_loss, "flow_matching_loss", lambda: kernels.flow_matching_loss(z3, z3, z3)),
    "euler_step_": (triton_euler, "euler_step_", lambda: kernels.euler_step_(z3.clone(), z3, 0.1)),
    "guided_euler_step_": (
        triton_euler,
        "guided_euler_step_",
        lambda: kernels.guided_euler_step_(z3.clone(), z3, z3, 0.1, 2.0),
    ),
}


class _Called(Exception):
    pass


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("mode", ["auto", "reference", "triton"])
def test_dispatch(op, mode, monkeypatch):
    """CPU tensors go to the reference unless Triton is forced; forcing Triton on CPU reaches the Triton op under
    the interpreter, and is refused in one line without it (a GPU machine running the kernel tests natively)."""
    mod, name, call = CALLS[op]

    def triton_twin(*args, **kwargs):
        raise _Called

    monkeypatch.setattr(mod, name, triton_twin)
    with kernels.use_backend(mode):
        if mode == "triton" and kernels._INTERPRET:
            with pytest.raises(_Called):
                call()
        elif mode == "triton":
            with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
                call()
        else:
            call()


# What _use_triton decides for each (backend, device, interpreter, inside a trace). A CPU has no CUDA tensors, but
# the decision reads only the device object, so the real function is called with torch.device("cuda").
DECISIONS = [
    # backend, device, interpreter, compiling, Triton?
    ("auto", "cpu", False, False, False),
    ("auto", "cpu", True, False, False),
    ("auto", "cuda", False, False, True),  # eager CUDA: the Triton kernels
    ("auto", "cuda", False, True, False),  # CUDA inside torch.compile: the reference, for Inductor to fuse
    ("auto", "cuda", True, False, False),  # interpreter kernels never get CUDA tensors
    ("auto", "cuda", True, True, False),
    ("reference", "cuda", False, False, False),
    ("reference", "cpu", True, False, False),
    ("triton", "cuda", False, False, True),
    ("triton", "cuda", False, True, True),  # forced: the triton_ops under compile too (the GPU check's comparison)
    ("triton", "cuda", True, True, True),  # forced under the interpreter stays allowed
    ("triton", "cpu", True, False, True),  # how the CPU tests run the kernels
]


@pytest.mark.parametrize("backend,device,interpret,compiling,want", DECISIONS)
def test_dispatch_decision(backend, device, interpret, compiling, want, monkeypatch):
    kernels._load_triton()  # loaded already under the interpreter: the patched flag below is what the decision reads
    monkeypatch.setattr(kernels, "_INTERPRET", interpret)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with kernels.use_backend(backend):
        assert kernels._use_triton(torch.device(device)) is want


def test_dispatch_decision_inside_a_real_trace(monkeypatch):
    """The same function traced by Dynamo (no monkeypatched is_compiling): with native kernels, auto sends CUDA
    tensors to Triton eagerly and to the reference inside torch.compile; forced triton keeps Triton in the trace."""
    kernels._load_triton()
    monkeypatch.setattr(kernels, "_INTERPRET", False)  # as on a GPU machine
    cuda = torch.device("cuda")

    def decide(x):
        return x + 1 if kernels._use_triton(cuda) else x - 1

    x = torch.zeros(3)
    for backend, eager_want, traced_want in (("auto", 1, -1), ("triton", 1, 1)):
        torch._dynamo.reset()
        with kernels.use_backend(backend):
            assert decide(x)[0].item() == eager_want, backend
            got = torch.compile(decide, backend="eager", fullgraph=True)(x)
        assert got[0].item() == traced_want, backend
    torch._dynamo.reset()


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kernels.flow_path(z3, z3, t3)


def test_use_backend_restores_and_rejects():
    before = kernels.backend()
    with kernels.use_backend("reference"):
        assert kernels.backend() == "reference"
    assert kernels.backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use_backend("cuda"):
            pass


# One fresh interpreter (~3-8 s of imports on 2 busy cores, so only one) for what only a fresh import shows:
# FASTFLOW_KERNELS is read at import; `import kernels` and CPU calls do not import the Triton op modules (nor,
# through triton_op, torch._inductor); and the op modules refuse a TRITON_INTERPRET changed after the import.
FRESH = """
import os, sys, torch
inductor_with_torch = "torch._inductor" in sys.modules
import kernels
print("backend", kernels.backend())
z = torch.zeros(2, 3)
with kernels.use_backend("auto"):
    kernels.flow_path(z, z, torch.zeros(2)); kernels.flow_matching_loss(z, z, z); kernels.euler_step_(z, z, 0.1)
print("lazy", not any(m in sys.modules for m in ("kernels.path", "kernels.loss", "kernels.euler")))
print("inductor", ("torch._inductor" in sys.modules) == inductor_with_torch)
os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1"
try:
    kernels.use_backend("triton").__enter__()
except RuntimeError as e:
    print("mismatch", "TRITON_INTERPRET changed" in str(e))
"""


def test_fresh_import():
    env = {**os.environ, "FASTFLOW_KERNELS": "reference", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", FRESH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    want = {"backend": "reference", "lazy": "True", "inductor": "True", "mismatch": "True"}
    assert got == want, r.stdout + r.stderr[-2000:]


def test_backend_environment_variable_rejects_unknown():
    with pytest.raises(ValueError, match="FASTFLOW_KERNELS must be one of"):
        kernels._parse_backend("bogus", "FASTFLOW_KERNELS")


# --- errors: the same clear message on both backends ---------------------------------------------------------

B = 2
z = torch.zeros(B, 1, 4, 4)
t = torch.rand(B)
meta = torch.zeros(B, 1, 4, 4, device="meta")
ERRORS = {
    "path z int": (TypeError, "z must be float32, bfloat16 or float16", lambda: kernels.flow_path(z.int(), z, t)),
    "path eps fp64": (TypeError, "eps must be float32", lambda: kernels.flow_path(z, z.double(), t)),
    "path eps list": (TypeError, "eps must be a torch.Tensor", lambda: kernels.flow_path(z, [0.0], t)),
    "path shape": (ValueError, "shapes must match", lambda: kernels.flow_path(z, z[:, :, :3], t)),
    "path broadcast": (ValueError, "shapes must match", lambda: kernels.flow_path(z, z[:1], t)),
    "path t shape": (ValueError, r"t must have shape \(B,\)", lambda: kernels.flow_path(z, z, torch.rand(B + 1))),
    "path t 2-d": (ValueError, r"t must have shape \(B,\)", lambda: kernels.flow_path(z, z, torch.rand(B, 1))),
    "path 0-d": (ValueError, "batch dimension", lambda: kernels.flow_path(z[0, 0, 0, 0], z[0, 0, 0, 0], t[:0])),
    "path device": (ValueError, "one device", lambda: kernels.flow_path(z, meta, t)),
    "path t device": (ValueError, "one device", lambda: kernels.flow_path(z, z, t.to("meta"))),
    "loss shape": (ValueError, "shapes must match", lambda: kernels.flow_matching_loss(z, z, z[:1])),
    "loss dtype": (TypeError, "v must be float32", lambda: kernels.flow_matching_loss(z.long(), z, z)),
    "loss device": (ValueError, "one device", lambda: kernels.flow_matching_loss(z, meta, z)),
    "loss empty": (ValueError, "empty", lambda: kernels.flow_matching_loss(z[:0], z[:0], z[:0])),
    "euler x bf16": (
        TypeError,
        "x must be float32, got torch.bfloat16",
        lambda: kernels.euler_step_(z.bfloat16(), z, 0.1),
    ),
    "euler v int": (
        TypeError,
        "v must be float32, bfloat16 or float16",
        lambda: kernels.euler_step_(z.clone(), z.int(), 0.1),
    ),
    "euler shape": (ValueError, "shapes must match", lambda: kernels.euler_step_(z.clone(), z[:1], 0.1)),
    "euler device": (ValueError, "one device", lambda: kernels.euler_step_(z.clone(), meta, 0.1)),
    "euler h vector": (ValueError, "h must be a 0-d tensor", lambda: kernels.euler_step_(z.clone(), z, torch.ones(2))),
    "euler h int tensor": (
        TypeError,
        "h must be a floating tensor",
        lambda: kernels.euler_step_(z.clone(), z, torch.tensor(1)),
    ),
    "euler h str": (TypeError, "h must be a float or a 0-d tensor", lambda: kernels.euler_step_(z.clone(), z, "0.1")),
    "euler h device": (
        ValueError,
        "h is on meta",
        lambda: kernels.euler_step_(z.clone(), z, torch.tensor(0.1, device="meta")),
    ),
    "guided w": (
        ValueError,
        "w must be a 0-d tensor",
        lambda: kernels.guided_euler_step_(z.clone(), z, z, 0.1, torch.ones(B)),
    ),
    "guided v_uncond": (
        ValueError,
        "shapes must match",
        lambda: kernels.guided_euler_step_(z.clone(), z, z[:1], 0.1, 2.0),
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(case, backend):
    exc, match, call = ERRORS[case]
    with kernels.use_backend(backend), pytest.raises(exc, match=match):
        call()


def test_scalar_on_cpu_rejected_for_cuda_tensors():
    """A CPU 0-d h or w with CUDA tensors is a ValueError (its copy to the GPU syncs with the host and breaks a CUDA
    graph capture); a Python float, a tensor on the op's device, or a CPU tensor with CPU tensors are fine. The check
    reads only devices, so a CPU machine can call it with a CUDA device object."""
    cuda1 = torch.device("cuda", 1)
    with pytest.raises(ValueError, match="h is a CPU tensor but the tensors are on cuda:1: pass a float"):
        _checks.scalar("euler_step_", "h", torch.tensor(0.1), cuda1)
    with pytest.raises(ValueError, match="w is a CPU tensor"):
        _checks.scalar("guided_euler_step_", "w", torch.tensor([2.0]), cuda1)
    for ok in (0.1, 2, torch.tensor(0.1, dtype=torch.float64)):
        _checks.scalar("euler_step_", "h", ok, torch.device("cpu"))
    for ok in (0.1, 2):
        _checks.scalar("euler_step_", "h", ok, cuda1)
    _checks.scalar("euler_step_", "h", torch.tensor(0.1, device="meta"), torch.device("meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_scalar_on_cpu_rejected_cuda(backend):
    x = torch.zeros(2, 1, 4, 4, device="cuda")
    with kernels.use_backend(backend):
        with pytest.raises(ValueError, match="h is a CPU tensor"):
            kernels.euler_step_(x, x, torch.tensor(0.1))
        with pytest.raises(ValueError, match="w is a CPU tensor"):
            kernels.guided_euler_step_(x, x, x, torch.tensor(0.1, device="cuda"), torch.tensor(2.0))
        kernels.euler_step_(x, x + 1, 0.5)  # a Python float is fine
    assert (x == 0.5).all()


# --- the device guard around every launch ----------------------------------------------------------------------


def test_device_guard():
    guard = _launch.device_guard(torch.device("cuda", 1))  # not entered: no CUDA needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_is_guarded(monkeypatch, triton_backend, device):
    """Each kernel launch (forward and backward, every op) happens inside device_guard(<its tensors' device>):
    Triton launches on the current device, not on the tensors'. (The CPU under the interpreter, CUDA natively: on
    the first GPU run this test, written for the CPU only, forced Triton on CPU tensors and failed.)"""
    active: list[torch.device] = []
    launches: list[tuple[str, list[torch.device]]] = []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for mod in (triton_path, triton_loss, triton_euler):
        real = mod.wrap_triton

        def spy(kernel, real=real):
            launches.append((kernel.fn.__name__, list(active)))
            return real(kernel)

        monkeypatch.setattr(mod, "device_guard", guard)
        monkeypatch.setattr(mod, "wrap_triton", spy)
    z, t = z3.to(device), t3.to(device)
    zz, ee, tt = (x.clone().requires_grad_() for x in (z + 0.5, z - 0.5, t))
    x_t, u = kernels.flow_path(zz, ee, tt)
    (x_t.sum() + u.sum()).backward()
    (kernels.flow_path(zz, ee, tt, with_target=False)[0].sum()).backward()
    kernels.flow_matching_loss(zz, z, z).backward()
    kernels.euler_step_(z.clone(), z, 0.1)
    kernels.guided_euler_step_(z.clone(), z, z, 0.1, 2.0)
    names = {name for name, _ in launches}
    want = {"_flow_path_fwd_kernel", "_flow_path_bwd_kernel", "_loss_partial_kernel", "_loss_finish_kernel"}
    assert want | {"_loss_bwd_kernel", "_euler_kernel"} <= names, names
    unguarded = [name for name, devices in launches if devices != [z.device]]
    assert not unguarded, f"launched outside device_guard({z.device}): {unguarded}"


@pytest.mark.cuda
def test_launch_on_a_second_gpu(gen):
    """cuda:1 tensors while cuda:0 is current: every op runs on cuda:1 and matches the reference."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    inp = _inputs(gen, "cuda:1")
    with torch.cuda.device(0):
        got = _step(**_copy(inp))
        got[0].backward()
    with kernels.use_backend("reference"):
        want = _step(**_copy(inp))
    for name, g, e in zip(("loss", "x_t", "x"), got, want):
        assert g.device == torch.device("cuda", 1), name
        assert_close(f"cuda:1 {name}", g.detach(), e.detach())


# --- torch.compile --------------------------------------------------------------------------------------------


def _step(z, eps, t, v, x, h, w):
    """A train step's and a sampler step's worth of ops, with every per-call value passed as a tensor."""
    x_t, u = kernels.flow_path(z, eps, t)
    x_t0, none = kernels.flow_path(z, eps, t, with_target=False)  # training's call
    assert none is None
    loss = kernels.flow_matching_loss(v * x_t0, z, eps)
    kernels.euler_step_(x, u, h)
    kernels.guided_euler_step_(x, u, x_t, h, w)
    return loss, x_t, x


def _inputs(gen, device, b=3):
    shape = (b, 1, 28, 28)
    return dict(
        z=data(shape, torch.float32, gen, device),
        eps=normal(shape, torch.float32, gen, device),
        t=torch.rand(b, generator=gen).to(device),
        v=normal(shape, torch.float32, gen, device).requires_grad_(),
        x=normal(shape, torch.float32, gen, device),
        h=torch.tensor(0.05, device=device),
        w=torch.tensor(2.0, device=device),
    )


def _copy(inp):
    return {k: (v.detach().clone().requires_grad_() if v.requires_grad else v.clone()) for k, v in inp.items()}


def _compare_compiled(fn, gen, device, backend):
    """fn compiled with fullgraph=True equals eager, forward and dloss/dv, over two calls that change h and w, and it
    compiles once: per-call values are data, not constants."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    inp = _inputs(gen, device)
    for call in range(2):
        if call:
            inp.update(h=inp["h"] * 0.5, w=inp["w"] + 1)
        a, b = _copy(inp), _copy(inp)
        got, want = compiled(**a), fn(**b)
        got[0].backward()
        want[0].backward()
        for name, g, e in zip(("loss", "x_t", "x"), got, want):
            assert_close(f"compiled {name}", g.detach(), e.detach())
        assert_close("compiled dloss/dv", a["v"].grad, b["v"].grad)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def test_compile_fullgraph_cpu(gen):
    """On CPU the dispatch picks the reference inside the trace and Inductor's C++ back end compiles it (34 s cold
    on 2 busy cores, most of the kernel suite's time)."""
    with kernels.use_backend("auto"):
        _compare_compiled(_step, gen, "cpu", "inductor")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_cuda(backend, gen):
    """On CUDA, auto compiles the reference (Inductor fuses it) and runs the triton_ops eagerly; forced triton traces
    through the fastflow::* triton_ops without a graph break. Either way compiled equals eager, and equals the
    reference."""
    torch._dynamo.reset()
    with kernels.use_backend(backend):
        _compare_compiled(_step, gen, "cuda", "inductor")
        inp = _inputs(gen, "cuda")
        got = torch.compile(_step, fullgraph=True)(**_copy(inp))
    with kernels.use_backend("reference"):
        want = _step(**_copy(inp))
    for name, g, e in zip(("loss", "x_t", "x"), got, want):
        assert_close(f"{backend}-compiled vs reference {name}", g.detach(), e.detach())


def test_reference_is_the_cpu_path(gen):
    """auto on CPU tensors gives exactly the reference's numbers (nothing else runs there)."""
    inp = _inputs(gen, "cpu")
    with kernels.use_backend("auto"):
        got = kernels.flow_path(inp["z"], inp["eps"], inp["t"])
    want = reference.flow_path(inp["z"], inp["eps"], inp["t"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
