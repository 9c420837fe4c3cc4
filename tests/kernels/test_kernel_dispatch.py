"""The dispatch point, argument errors on both backends, and torch.compile(fullgraph=True) through the ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_asserts import assert_close, data, normal, requires_cuda

import kernels
from kernels import _euler, _loss, _path, _philox, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ["triton", "reference"]

# --- dispatch -------------------------------------------------------------------------------------------------

z3 = torch.zeros(3, 1, 4, 4)
t3 = torch.full((3,), 0.5)
CALLS = {  # public op, its Triton-module twin, a call
    "flow_path": (_path, "flow_path", lambda: kernels.flow_path(z3, z3, t3)),
    "flow_path_seeded": (_path, "flow_path_seeded", lambda: kernels.flow_path_seeded(z3, t3, 1, 2)),
    "flow_matching_loss": (_loss, "flow_matching_loss", lambda: kernels.flow_matching_loss(z3, z3, z3)),
    "flow_matching_loss_seeded": (
        _loss,
        "flow_matching_loss_seeded",
        lambda: kernels.flow_matching_loss_seeded(z3, z3, 1, 2),
    ),
    "euler_step_": (_euler, "euler_step_", lambda: kernels.euler_step_(z3.clone(), z3, 0.1)),
    "guided_euler_step_": (
        _euler,
        "guided_euler_step_",
        lambda: kernels.guided_euler_step_(z3.clone(), z3, z3, 0.1, 2.0),
    ),
    "philox_normal": (_philox, "philox_normal", lambda: kernels.philox_normal((3,), 1, 2, "cpu")),
}


class _Called(Exception):
    pass


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("mode", ["auto", "reference", "triton"])
def test_dispatch(op, mode, monkeypatch):
    """CPU tensors go to the reference unless Triton is forced; forcing Triton on CPU reaches the Triton op."""
    mod, name, call = CALLS[op]

    def triton_twin(*args, **kwargs):
        raise _Called

    monkeypatch.setattr(mod, name, triton_twin)
    with kernels.use_backend(mode):
        if mode == "triton":
            with pytest.raises(_Called):
                call()
        else:
            call()


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


def test_backend_environment_variable():
    """FASTFLOW_KERNELS is read at import (a fresh interpreter: ~8 s of imports on 2 busy cores, so only one)."""
    env = {**os.environ, "FASTFLOW_KERNELS": "reference"}
    code = "import kernels; print(kernels.backend())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("reference"), r.stderr[-2000:]


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
    "seeded negative seed": (
        ValueError,
        r"seed must be in \[0, 2\*\*63\)",
        lambda: kernels.flow_path_seeded(z, t, -1, 0),
    ),
    "seeded float offset": (TypeError, "offset must be an int", lambda: kernels.flow_path_seeded(z, t, 1, 0.5)),
    "seeded float tensor": (
        TypeError,
        "seed must be an integer tensor",
        lambda: kernels.flow_path_seeded(z, t, torch.tensor(1.0), 0),
    ),
    "seeded 1-d seed": (
        ValueError,
        "seed must be a 0-d tensor",
        lambda: kernels.flow_path_seeded(z, t, torch.tensor([1, 2]), 0),
    ),
    "loss shape": (ValueError, "shapes must match", lambda: kernels.flow_matching_loss(z, z, z[:1])),
    "loss dtype": (TypeError, "v must be float32", lambda: kernels.flow_matching_loss(z.long(), z, z)),
    "loss device": (ValueError, "one device", lambda: kernels.flow_matching_loss(z, meta, z)),
    "loss empty": (ValueError, "empty", lambda: kernels.flow_matching_loss(z[:0], z[:0], z[:0])),
    "seeded loss offset": (ValueError, "offset must be in", lambda: kernels.flow_matching_loss_seeded(z, z, 1, 2**63)),
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
    "philox dtype": (TypeError, "dtype must be", lambda: kernels.philox_normal((3,), 1, 2, "cpu", torch.int32)),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(case, backend):
    exc, match, call = ERRORS[case]
    with kernels.use_backend(backend), pytest.raises(exc, match=match):
        call()


# --- torch.compile --------------------------------------------------------------------------------------------


def _step(z, eps, t, v, x, h, w, seed, offset):
    """A train step's and a sampler step's worth of ops, with every per-call value passed as a tensor."""
    x_t, u = kernels.flow_path(z, eps, t)
    loss = kernels.flow_matching_loss(v * x_t, z, eps)
    kernels.euler_step_(x, u, h)
    kernels.guided_euler_step_(x, u, x_t, h, w)
    return loss, x_t, x


def _step_seeded(z, eps, t, v, x, h, w, seed, offset):
    """The same with the noise drawn from (seed, offset) instead of read."""
    x_t, u = kernels.flow_path_seeded(z, t, seed, offset)
    loss = kernels.flow_matching_loss_seeded(v * x_t, z, seed, offset)
    kernels.euler_step_(x, u, h)
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
        seed=torch.tensor(7, device=device),
        offset=torch.tensor(12345, device=device),
    )


def _copy(inp):
    return {k: (v.detach().clone().requires_grad_() if v.requires_grad else v.clone()) for k, v in inp.items()}


def _compare_compiled(fn, gen, device, backend):
    """fn compiled with fullgraph=True equals eager, forward and dloss/dv, over two calls that change h, w and the
    offset, and it compiles once: per-call values are data, not constants."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    inp = _inputs(gen, device)
    for call in range(2):
        if call:
            inp.update(h=inp["h"] * 0.5, w=inp["w"] + 1, offset=inp["offset"] + inp["z"].numel())
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
    assert kernels.backend() == "auto"
    _compare_compiled(_step, gen, "cpu", "inductor")


def test_compile_fullgraph_cpu_seeded(gen):
    """The seeded ops trace without a graph break too. Checked through AOT autograd without code generation:
    Inductor's C++ build of the unrolled reference Philox doubled the cold compile time (34 s -> 78 s)."""
    _compare_compiled(_step_seeded, gen, "cpu", "aot_eager")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fn", [_step, _step_seeded], ids=["plain", "seeded"])
def test_compile_fullgraph_cuda(fn, gen):
    """On CUDA the trace goes through the fastflow::* triton_ops without a graph break; the compiled Triton step
    equals the reference."""
    _compare_compiled(fn, gen, "cuda", "inductor")
    inp = _inputs(gen, "cuda")
    with kernels.use_backend("reference"):
        want = fn(**_copy(inp))
    got = torch.compile(fn, fullgraph=True)(**_copy(inp))
    for name, g, e in zip(("loss", "x_t", "x"), got, want):
        assert_close(f"triton-compiled vs reference {name}", g.detach(), e.detach())


def test_reference_is_the_cpu_path(gen):
    """auto on CPU tensors gives exactly the reference's numbers (nothing else runs there)."""
    inp = _inputs(gen, "cpu")
    got = kernels.flow_path(inp["z"], inp["eps"], inp["t"])
    want = reference.flow_path(inp["z"], inp["eps"], inp["t"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
