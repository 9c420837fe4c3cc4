"""The compiled step's kernels, counted on a CPU: Inductor's code for a CUDA device, generated without a GPU.

How (nothing is compiled to a binary, nothing runs): (1) the train step (loss, ``torch.autograd.grad``, AdamW in
its foreach ``capturable`` form, EMA: what ``TrainStep`` compiles) is traced by ``make_fx`` on fake CPU tensors with
Inductor's decompositions and ``torch.compiler.is_compiling()`` answering True, and a network evaluation (the
sampler's forward) likewise; (2) the graph is moved to CUDA (device arguments replaced, fake CUDA tensors
propagated: the autograd engine cannot run a backward on fake CUDA tensors without a driver, so the trace is made
on the CPU); (3) ``compile_fx_inner`` lowers, fuses and writes the wrapper code for it, with ``torch.cuda``'s
device queries answering for an sm_90 part and Triton's driver replaced by one that names that target; it stops
when loading the code needs libcuda, after the code is written; (4) the wrapper's ``call()`` is read: each Triton
kernel launch, each extern kernel (cuBLAS / cuDNN: ``convolution``, ``mm``, ``addmm``) and each aten fallback
(``convolution_backward``: one kernel per gradient it computes; a foreach op: one multi-tensor launch at least).

Where it differs from ``torch.compile`` of the step: no Dynamo and no AOTAutograd functionalization, so AdamW's
and the EMA's in-place foreach ops stay fallbacks (counted once each, where Inductor would generate a few Triton
kernels for each); under bf16 autocast the trace follows the CPU's autocast policy (CUDA's keeps GroupNorm and
upsampling in fp32: other casts, the same fusions). So the total is an estimate of the compiled step's kernels,
not a measurement. It patches ``torch.cuda``, so :func:`count_inductor_kernels` runs it in a subprocess (:func:`main_counts`, which
prints the counts as JSON).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["count_inductor_kernels", "count_call", "main_counts"]

ROOT = Path(__file__).resolve().parents[2]


def count_call(code: str) -> dict:
    """Kernels in the ``call()`` of Inductor's wrapper ``code``: ``triton`` launches, ``extern`` calls by name,
    aten ``fallback`` calls by name, and ``kernels``, their sum with one kernel per gradient a
    ``convolution_backward`` computes (its output mask) and one per other call."""
    body = code[code.index("def call(") :] if "def call(" in code else code
    triton, extern, fallback, kernels = 0, collections.Counter(), collections.Counter(), 0
    for line in (s.strip() for s in body.splitlines()):
        if line.startswith("#"):
            continue
        if re.search(r"\btriton_\w+\.run\(", line):
            triton += 1
            kernels += 1
        elif m := re.search(r"extern_kernels\.(\w+)\(", line):
            extern[m.group(1)] += 1
            kernels += 1
        elif m := re.search(r"=\s*torch\.ops\.aten\.(\w+)\.\w+\(|^torch\.ops\.aten\.(\w+)\.\w+\(", line):
            name = m.group(1) or m.group(2)
            fallback[name] += 1
            mask = re.search(r"\[((?:True|False)(?:, (?:True|False))*)\]\)$", line)
            kernels += max(1, mask.group(1).count("True")) if name == "convolution_backward" and mask else 1
    return {"triton": triton, "extern": dict(extern), "fallback": dict(fallback), "kernels": kernels}


def _trace(preset: str, batch: int, amp: str):
    """``(train graph, its inputs, forward graph, its inputs)``: make_fx graphs on fake CPU tensors."""
    import torch
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeCopyMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastflow.ema import EMA
    from fastflow.objectives import FlowBatch
    from fastflow.step import TrainStep, make_optimizer
    from fastflow.unet import UNet

    from .counting import autocast, fake, inputs, model_config

    decomp = select_decomp_table()
    with fake("cpu") as mode:
        with FakeCopyMode(mode):
            model = UNet(model_config(preset))
            step = TrainStep(model, make_optimizer(model.parameters(), 1e-4, 0.0), EMA(model), autocast("cpu", amp))
        z, y, t, eps = inputs(batch)
        step._build()
        tensors = [*step.params, *step._state_tensors(), *step._ema_params, *step._ema_buffers, *step._buffers]
        tensors += [step._lr, step._ema_w, z, y, t, eps]
        real = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: True  # what the compiled step runs: foreach, capturable AdamW
        try:
            train = make_fx(lambda *a: (step._step(FlowBatch(z, y, t, eps), step._lr, step._ema_w),), decomp)
            train = train(*tensors)
        finally:
            torch.compiler.is_compiling = real
        with torch.no_grad():
            ctx = autocast("cpu", amp)
            fwd_in = [*model.parameters(), *model.buffers(), z, t, y]

            def forward(*a):
                with ctx:
                    return (model(z, t, y),)

            fwd = make_fx(forward, decomp)(*fwd_in)
    return train, tensors, fwd, fwd_in


def _to_cuda(gm, tensors):
    """The graph with every CPU device argument made CUDA, its node values propagated on fake CUDA tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.kwargs.get("device") == cpu:
                node.kwargs = {**node.kwargs, "device": cuda}
            node.args = tuple(cuda if a == cpu else a for a in node.args)
    gm.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        ins = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda") for x in tensors]
    FakeTensorProp(gm, mode=mode).propagate(*ins)
    return gm, ins, mode


def _pretend_sm90() -> None:
    """torch.cuda's device queries and Triton's driver answer for an sm_90 part (this process only)."""
    import collections as c

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    fields = "name major minor total_memory multi_processor_count gcnArchName warp_size max_threads_per_multi_processor"
    fields += " regs_per_multiprocessor shared_memory_per_block_optin L2_cache_size"
    props = c.namedtuple("Props", fields)("H100 (stand-in)", 9, 0, 80 << 30, 132, "", 32, 2048, 65536, 232448, 50 << 20)
    cu = torch.cuda
    cu.is_available, cu.device_count, cu.current_device = (lambda: True), (lambda: 1), (lambda: 0)
    cu.get_device_properties = cu._get_device_properties = lambda *a, **k: props
    cu.get_device_capability, cu.get_device_name = (lambda *a, **k: (9, 0)), (lambda *a, **k: props.name)
    cu.get_rng_state, cu.set_rng_state = (lambda *a, **k: torch.zeros(16, dtype=torch.uint8)), (lambda *a, **k: None)
    cu.synchronize, cu.set_device, cu._lazy_init = (lambda *a, **k: None), (lambda *a, **k: None), (lambda: None)
    cu._exchange_device = cu._maybe_exchange_device = lambda idx: 0

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, *a):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

    driver.set_active(Driver())


def _codegen(gm, ins, mode) -> str:
    """Inductor's wrapper code for ``gm`` on CUDA (generated; loading it fails without libcuda, after)."""
    import torch._inductor.graph as ig
    from torch._inductor.compile_fx import compile_fx_inner

    seen: list = []
    real = ig.GraphLowering.codegen

    def keep(self, *a, **k):
        out = real(self, *a, **k)
        seen.append(out[0].value if hasattr(out[0], "value") else str(out[0]))
        return out

    ig.GraphLowering.codegen = keep
    try:
        with mode:
            compile_fx_inner(gm, ins)
    except Exception:
        if not seen:  # failed before the code was written: a real failure
            raise
    finally:
        ig.GraphLowering.codegen = real
    return seen[-1]


def main_counts(argv: list[str]) -> int:
    """``[PRESET, BATCH, AMP]``: trace, move, generate, count (this process is changed for good: a subprocess)."""
    preset, batch, amp = argv[0], int(argv[1]), argv[2]
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    t0 = time.perf_counter()
    train, t_in, fwd, f_in = _trace(preset, batch, amp)  # the kernels' reference math, as under compile
    out = {"preset": preset, "batch": batch, "amp": amp, "torch": torch.__version__, "target": "sm_90"}
    graphs = {"train": _to_cuda(train, t_in), "forward": _to_cuda(fwd, f_in)}
    _pretend_sm90()
    for name, (gm, ins, mode) in graphs.items():
        out[name] = count_call(_codegen(gm, ins, mode))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print("COUNTS " + json.dumps(out))
    return 0


_CACHE: dict = {}


def count_inductor_kernels(preset: str, batch: int, amp: str, timeout: float = 1800) -> dict:
    """The counts of :func:`main_counts`, run in a subprocess (this module's docstring), for ``preset`` at ``batch``
    in ``amp``: ``{"train": count_call(...), "forward": ..., "seconds": ...}``; cached per process. Raises
    ``RuntimeError`` with the subprocess's last words when it fails."""
    key = (preset, batch, amp)
    if key not in _CACHE:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
        run = "import sys; from bench.roofline.inductor import main_counts; sys.exit(main_counts(sys.argv[1:]))"
        cmd = [sys.executable, "-c", run, preset, str(batch), amp]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("COUNTS ")), None)
        if p.returncode or line is None:
            tail = " ".join((p.stderr or p.stdout)[-400:].split())
            raise RuntimeError(f"the Inductor count failed (exit {p.returncode}): {tail}")
        _CACHE[key] = json.loads(line[len("COUNTS ") :])
    return _CACHE[key]
