"""``python -m bench roofline``: an upper bound on train-step and sampler images/s per preset and batch size, from
counted FLOPs, the least bytes moved and the kernel launches of one eager step, against a table of device peaks
(or, for ``--device cpu``, this machine's peaks measured by a probe). Every GPU figure it prints is a prediction,
labelled as such, unless ``--measured`` joins rows measured on a GPU.

What is counted, and how:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around one eager train step (the step's own code: loss,
  ``torch.autograd.grad``, AdamW, EMA) and around one network evaluation (a forward at batch B; a guided sampler
  evaluation is one forward at 2B), run on fake tensors (``FakeTensorMode``: shapes only, no data, so 2048 x the
  original U-Net costs a second). flop_counter counts convolutions and matrix products (forward and backward); it
  does not count elementwise ops, GroupNorm, the embedding lookup, AdamW or the EMA. Those are left out, not
  estimated: they are memory traffic, which the bytes term bounds (AdamW and EMA are in it by formula).
- Least bytes of a train step: weights read once (P x 4 bytes, fp32 parameters), gradients written once, AdamW
  (parameters, exp_avg and exp_avg_sq read and written, gradients read: 7 x 4P), the EMA (shadow read and written,
  parameters read: 3 x 4P), the saved activations written once in the forward and read once in the backward, and
  the inputs z, eps [B, 1, 28, 28] fp32, t [B] fp32, y [B] int64 read once. Saved activations are measured, not
  assumed: ``torch.autograd.graph.saved_tensors_hooks`` records every tensor the forward of the step's loss saves
  for the backward, deduplicated by storage, parameters and inputs left out (counted above), in the precision the
  step runs under the target device's autocast policy (bf16 autocast on CUDA keeps GroupNorm and upsampling
  outputs fp32, on a CPU bf16: measured per device type, on fake tensors of that type). A sampler evaluation: the
  weights, x, t, y in and v out (its activations need not leave the chip: no lower bound is known for them).
- Launches: one eager train step (and one forward) profiled with ``torch.profiler`` on real tensors. On a CPU,
  :func:`count_launches`'s rule (its docstring) counts the aten ops that would launch a device kernel; on a CUDA
  device the profiler's CUDA activity is counted directly (kernels, memcpy and memset on the device). Which count
  a row used is in its ``launch_source``.

The bound: images/s = B / max(FLOPs / peak FLOP/s, bytes / peak bandwidth, launches x seconds per launch), per
step mode, and the term that is largest names the limit that binds. ``eager``: the launches of one eager step.
``cudagraphs``: the step replays as one graph, so the host's launch term is one launch. ``compile``: Inductor's
launches are not counted on a CPU (its CUDA kernels are not generated there): the term uses the eager step's
convolution and matmul calls (cuDNN/cuBLAS library calls that Inductor does not fuse), a lower bound of the
compiled step's launches; ``--count-compiled`` on a CUDA machine counts the compiled step's kernels instead. Each
term is meant as a lower bound of the time it stands for (datasheet peaks, least bytes, a lower bound of the
launches), so the bound is an upper bound on images/s, with one soft spot: the seconds per eager launch, an
assumption where no GPU is present (:data:`GPU_LAUNCH_S`), measured on a CUDA machine (a one-element add: a lower
bound). On a CPU, which runs the three one after another rather than overlapped, the max is all the more a bound.

Memory that fits (GPUs): weights, gradients, AdamW's two moments and the EMA (5 x 4P) plus the saved activations
and the inputs: an estimate (no allocator slack, cuDNN workspace or the transient gradients of the backward), used
with 10% of the device's memory held back; the largest power-of-two batch under it gets its own rows.

``--device cpu``: a probe measures this machine's peaks (conv and GEMM FLOP/s through the libraries the step uses,
copy bandwidth, per-op dispatch time) next to the theoretical peak from ISA x FMA units x clock, then times the
default CPU train step (the ``cpu`` preset at batch 24, one thread: one of the default run's two single-thread
processes at global batch 48) and prints its achieved FLOP/s as a share of the probed peak, and from one profiled
step the share of its time spent in convolutions and matmuls. CPU timings on a shared machine are noisy: medians,
with the process CPU time and the load average next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Peak",
    "GPU_PEAKS",
    "LaunchCount",
    "count_flops",
    "saved_tensor_bytes",
    "count_launches",
    "count_cuda_launches",
    "bound",
    "probe_cpu",
    "roofline_table",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EPOCH_IMAGES = 60000  # MNIST's training set
IMAGE = (1, 28, 28)
MEMORY_HELD_BACK = 0.10  # share of device memory not planned for: allocator slack, workspaces, transients
DEFAULT_BATCHES = (32, 128, 512, 2048)
CPU_STEP_BATCH = 24  # the default CPU run: global batch 48 over 2 single-thread processes (the cpu preset)


# -- device peaks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A device's peaks. ``flops``: dense FLOP/s per precision (``bf16``, ``tf32``, ``fp32``); ``bandwidth``:
    memory bytes/s; ``memory``: bytes; ``launch_s``: host seconds per eager kernel launch; ``source``: where the
    figures come from."""

    name: str
    flops: dict
    bandwidth: float
    memory: float
    launch_s: float
    source: str
    launch_source: str = ""


# Host seconds per kernel launch of eager PyTorch on CUDA: dispatch through the op's Python and C++ layers plus
# cudaLaunchKernel. 5 us is an assumption (PyTorch's eager overhead is commonly put at a few to 10 us per op;
# cudaLaunchKernel alone is 2-4 us); `--device` on a CUDA machine measures this host's figure and prints it.
GPU_LAUNCH_S = 5e-6
_LAUNCH_NOTE = "an assumption: eager PyTorch dispatch + cudaLaunchKernel; on a CUDA machine the tool measures its own"
GPU_PEAKS: dict[str, Peak] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16 312 TFLOP/s dense (624 with sparsity), TF32 156, FP32 19.5;
    # 40 GB HBM2 at 1,555 GB/s.
    "a100": Peak(
        "A100 40GB SXM", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 1555e9, 40e9, GPU_LAUNCH_S,
        "NVIDIA A100 datasheet (SXM4 40GB)", _LAUNCH_NOTE,
    ),
    # Same datasheet, A100 80GB SXM: the same compute, 80 GB HBM2e at 2,039 GB/s.
    "a100-80gb": Peak(
        "A100 80GB SXM", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2039e9, 80e9, GPU_LAUNCH_S,
        "NVIDIA A100 datasheet (SXM4 80GB)", _LAUNCH_NOTE,
    ),
    # NVIDIA H100 datasheet (SXM5): BF16 989 TFLOP/s dense (1,979 with sparsity), TF32 495 (989 sparse), FP32 67;
    # 80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": Peak(
        "H100 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3350e9, 80e9, GPU_LAUNCH_S,
        "NVIDIA H100 datasheet (SXM5)", _LAUNCH_NOTE,
    ),
    # NVIDIA H200 datasheet (SXM): compute as H100 SXM; 141 GB HBM3e at 4.8 TB/s.
    "h200": Peak(
        "H200 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 4800e9, 141e9, GPU_LAUNCH_S,
        "NVIDIA H200 datasheet (SXM)", _LAUNCH_NOTE,
    ),
}  # fmt: skip
DEVICES = (*GPU_PEAKS, "cpu", "cuda")


def _cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def gpu_key(name: str) -> str | None:
    """The :data:`GPU_PEAKS` key of a CUDA device name (``torch.cuda.get_device_name``), or None."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n and "pcie" not in n:
        return "h100-sxm"
    if "a100" in n and "pcie" not in n:
        return "a100-80gb" if "80" in n else "a100"
    return None


# -- counting: FLOPs and saved tensors -------------------------------------------------------------------------------


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """``(total, per aten op)``: the FLOPs ``torch.utils.flop_counter`` counts while ``fn()`` runs (convolutions and
    matrix products, forward and backward; nothing else)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    per_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), per_op


def _storage_key(t) -> int:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage()).cdata  # the StorageImpl's address: one per storage, fake ones too


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable = ()) -> tuple[int, dict[str, int]]:
    """``(bytes, bytes per dtype)`` of the tensors autograd saves for the backward while ``fn()`` runs: each storage
    once (a storage saved by several ops, or several views of one storage, counts once, at its full size), storages
    of the tensors in ``exclude`` (parameters, inputs) left out. Works on real and fake tensors; runs no backward."""
    import torch

    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        k = _storage_key(t)
        if k not in skip and k not in seen:
            seen[k] = (t.untyped_storage().nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    by_dtype: Counter = Counter()
    for nbytes, dtype in seen.values():
        by_dtype[dtype] += nbytes
    return sum(by_dtype.values()), dict(by_dtype)


class _ForcedAutocast:
    """Autocast on ``device_type`` through the low-level switches: ``torch.autocast("cuda")`` turns itself off
    where no GPU is present, but fake CUDA tensors still go through CUDA's autocast policy this way. Reusable, as
    ``torch.autocast`` is (the step enters its context once per call)."""

    def __init__(self, device_type: str, dtype):
        self.device_type, self.dtype = device_type, dtype

    def __enter__(self):
        import torch

        self._was = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        torch.set_autocast_enabled(self.device_type, True)
        torch.set_autocast_dtype(self.device_type, self.dtype)
        torch.autocast_increment_nesting()
        return self

    def __exit__(self, *exc):
        import torch

        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(self.device_type, self._was[0])
        torch.set_autocast_dtype(self.device_type, self._was[1])
        return False


def _autocast(device_type: str, amp: str):
    """A fresh autocast context for ``amp`` (``bf16`` or ``none``) on ``device_type``, as the trainer builds it."""
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    if device_type == "cuda" and not torch.cuda.is_available():
        return _ForcedAutocast("cuda", torch.bfloat16)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


# -- the one coupling to fastflow's train step ----------------------------------------------------------------------


def _train_step(model, ctx, mode: str = "eager") -> Callable:
    """``run(z, y, t, eps)``: one step of fastflow's train step (flow-matching loss, ``autograd.grad``, AdamW,
    EMA) in ``mode`` (eager: fused AdamW) on ``model`` under the autocast context ``ctx`` (None: fp32), with a
    fresh AdamW and EMA.
    Also ``run.loss(z, y, t, eps)``: the forward of the loss the step differentiates (no backward), for the saved
    tensors on a device whose backward cannot run here. The only place this module knows the step's API."""
    from fastflow.ema import EMA
    from fastflow.objectives import FlowBatch
    from fastflow.path import flow_matching_loss
    from fastflow.step import TrainStep, make_optimizer

    step = TrainStep(model, make_optimizer(model.parameters(), 1e-4, 0.0), EMA(model), ctx, mode=mode)

    def run(z, y, t, eps):
        return step(FlowBatch(z, y, t, eps), 1e-4)

    run.loss = lambda z, y, t, eps: flow_matching_loss(model, z, y, t, eps, ctx)  # what TrainStep._step takes
    return run


def _model_config(preset: str):
    from fastflow.config import resolve_configs

    return resolve_configs(preset, "cpu")[0]


def _inputs(batch: int, device=None):
    """z, eps [B, 1, 28, 28] fp32, t [B] fp32, y [B] int64 (labels, 10 = no label), on ``device`` (None: the
    default device)."""
    import torch

    z = torch.rand(batch, *IMAGE, device=device) * 2 - 1
    eps = torch.randn(batch, *IMAGE, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 11, (batch,), device=device)
    return z, y, t, eps


@contextlib.contextmanager
def _fake(device_type: str = "cpu"):
    """Fake tensors of ``device_type`` (shapes, dtypes and devices without data), the kernels' reference math."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        with kernels.use_backend("reference"), FakeTensorMode() as mode, torch.device(device_type):
            yield mode


def _fake_model(mode, mcfg, amp: str, device_type: str):
    """A fake U-Net and its train step, built inside ``mode``: ``FakeCopyMode`` keeps the EMA's deepcopy in the
    same fake mode."""
    from torch._subclasses.fake_tensor import FakeCopyMode

    from fastflow.unet import UNet

    with FakeCopyMode(mode):
        model = UNet(mcfg)
        run = _train_step(model, _autocast(device_type, amp))
    return model, run


@dataclass
class Counts:
    """What one (preset, batch, precision) costs. FLOPs and bytes per step / per evaluation, not per image."""

    params: int
    param_bytes: int
    train_flops: int
    train_flops_by_op: dict
    sample_flops: int
    saved_bytes: int
    saved_by_dtype: dict
    input_bytes: int
    train_bytes: int
    train_bytes_parts: dict
    sample_bytes: int
    memory_estimate: int


_FLOPS: dict = {}
_SAVED: dict = {}


def _flops(preset: str, batch: int, amp: str) -> tuple[int, dict, int]:
    """``(train step FLOPs, per op, forward FLOPs)`` on fake CPU tensors: a count of shapes, the same on any
    device and in any precision (``amp`` is applied all the same); cached."""
    import torch

    key = (preset, batch, amp)
    if key not in _FLOPS:
        with _fake("cpu") as mode:
            model, run = _fake_model(mode, _model_config(preset), amp, "cpu")
            z, y, t, eps = _inputs(batch)
            train, by_op = count_flops(lambda: run(z, y, t, eps))
            with torch.no_grad(), _autocast("cpu", amp):
                fwd, _ = count_flops(lambda: model(z, t, y))
        _FLOPS[key] = (train, by_op, fwd)
    return _FLOPS[key]


def counts(preset: str, batch: int, amp: str, device_type: str) -> Counts:
    """What a step and an evaluation of ``preset`` at ``batch`` cost: FLOPs (:func:`_flops`) and the saved tensors
    of the step's loss on fake tensors of ``device_type`` under its autocast policy; cached."""
    key = (preset, batch, amp, device_type)
    if key in _SAVED:
        return _SAVED[key]
    train_flops, by_op, sample_flops = _flops(preset, batch, amp)
    with _fake(device_type) as mode:
        model, run = _fake_model(mode, _model_config(preset), amp, device_type)
        ins = _inputs(batch)
        params = list(model.parameters())
        saved, by_dtype = saved_tensor_bytes(lambda: run.loss(*ins), exclude=[*params, *ins])
    n = sum(p.numel() for p in params)
    pb = sum(p.numel() * p.element_size() for p in params)
    inputs = sum(x.numel() * x.element_size() for x in ins)
    parts = {
        "weights": pb,  # read once in the forward
        "gradients": pb,  # written once in the backward
        "adamw": 7 * pb,  # params, exp_avg, exp_avg_sq read + written; gradients read
        "ema": 3 * pb,  # shadow read + written; params read
        "activations": 2 * saved,  # written once in the forward, read once in the backward
        "inputs": inputs,
    }
    image_bytes = batch * math.prod(IMAGE) * 4
    c = Counts(
        params=n,
        param_bytes=pb,
        train_flops=train_flops,
        train_flops_by_op=by_op,
        sample_flops=sample_flops,
        saved_bytes=saved,
        saved_by_dtype=by_dtype,
        input_bytes=inputs,
        train_bytes=sum(parts.values()),
        train_bytes_parts=parts,
        sample_bytes=pb + image_bytes + batch * (4 + 8) + image_bytes,  # weights; x, t, y in; v out
        memory_estimate=5 * pb + saved + inputs,  # weights, gradients, exp_avg, exp_avg_sq, EMA; activations; inputs
    )
    _SAVED[key] = c
    return c


# -- counting: launches ---------------------------------------------------------------------------------------------

# aten ops that launch no device kernel although they do not alias their input: allocation, resizing, metadata
# queries and host reads. (Views and other aliasing ops are found from their schemas: :func:`_is_view`.)
NO_KERNEL = frozenset(
    "aten::" + n
    for n in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "resize_as_", "set_",
        "result_type", "is_nonzero", "item", "_local_scalar_dense", "size", "stride", "numel", "dim", "is_same_size",
        "_nnpack_available", "_has_compatible_shallow_copy_type", "lift_fresh", "record_stream", "_assert_async",
    )
)  # fmt: skip
# Ops that are one multi-tensor kernel launch on CUDA however many tensors they take (CPU runs them as a loop of
# per-tensor ops underneath): counted once, what they call underneath not at all.
MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_")
# The library calls (cuDNN / cuBLAS on CUDA) that Inductor leaves as calls of their own: the compile-mode count.
# Counted by these ops' events whatever runs beneath them (every convolution passes through aten::convolution).
LIBRARY = frozenset(
    "aten::" + n
    for n in ("convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm")
)

_VIEWS: dict[str, bool] = {}


def _is_view(name: str) -> bool:
    """Whether the aten op ``name`` (``aten::reshape``) only makes or changes a view: its schema marks an input as
    aliased by the output and not written (``Tensor(a)``: view, reshape, t, slice, expand, to, contiguous, ...;
    ``OpOverload.is_view``), or it carries the ``inplace_view`` tag (``as_strided_``, ``squeeze_``, ...: metadata
    changed in place). Such an op launches no kernel of its own; a copy it makes shows up as a ``copy_`` beneath
    it. The overload read is ``default`` (else the first one): the CPU profile names ops without overloads."""
    if name not in _VIEWS:
        import torch

        packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
        view = False
        if packet is not None and packet.overloads():
            names = packet.overloads()
            op = getattr(packet, "default" if "default" in names else names[0])
            view = bool(op.is_view) or torch.Tag.inplace_view in op.tags
        _VIEWS[name] = view
    return _VIEWS[name]


@dataclass
class LaunchCount:
    """``launches``: device kernel launches (a multi-tensor op once); ``ops``: the same with multi-tensor ops
    counted per op they run underneath (what a CPU dispatches one by one); ``library``: convolution and matmul
    calls; ``by_name``: launches per op name (or kernel name); ``source``: how it was counted."""

    launches: int
    ops: int
    library: int
    by_name: dict
    source: str
    host_calls: int | None = None


def count_launches(fn: Callable[[], object]) -> LaunchCount:
    """Kernel launches of ``fn()`` from a CPU profile (``torch.profiler``, CPU activity), by this rule:

    an event counts if it is an ``aten::`` op that runs a kernel, and no op beneath it (among its descendants)
    counts. An op runs no kernel if it is a view or other aliasing op (:func:`_is_view`: ``view``, ``reshape``,
    ``t``, ``expand``, ``to``, ``contiguous``, ...) or in :data:`NO_KERNEL` (allocation, metadata, host reads).
    So ``conv2d → convolution → _convolution → mkldnn_convolution`` counts once (the lowest op that runs a kernel)
    and ``x.contiguous()`` of a transposed x counts its ``copy_``. A ``_foreach_*`` / ``_fused_*`` op counts once
    (one multi-tensor launch on CUDA) and nothing beneath it; ``ops`` counts what it runs beneath it instead.

    On CUDA this is a lower bound of the kernels: cuDNN's convolution backward runs two or more kernels (data and
    weight gradients), a multi-tensor op one per chunk of tensors, and CUDA's autocast casts more than the CPU's.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()

    def kernel(e) -> bool:
        n = e.name
        return n.startswith("aten::") and n not in NO_KERNEL and not _is_view(n)

    def multi(e) -> bool:
        return e.name.startswith(MULTI_TENSOR)

    memo: dict = {}

    def below(e, rule: str) -> bool:  # whether a descendant of e counts under ``rule``
        k = (id(e), rule)
        if k not in memo:
            memo[k] = any(counts(c, rule) or below(c, rule) for c in e.cpu_children)
        return memo[k]

    def counts(e, rule: str) -> bool:
        if not kernel(e):
            return False
        if rule == "ops":  # the lowest kernel op of each chain, multi-tensor ops like any other
            return not below(e, "ops")
        p = e.cpu_parent
        while p is not None:  # inside a multi-tensor op: its one launch covers this
            if multi(p):
                return False
            p = p.cpu_parent
        return multi(e) or not below(e, "launches")

    def label(e) -> str:  # the outermost kernel op above e (``aten::mul`` for the copy_ of its wrapped scalar)
        top, p = e, e.cpu_parent
        while p is not None:
            if kernel(p) and not multi(p):
                top = p
            p = p.cpu_parent
        return top.name

    launches: Counter = Counter()
    ops = 0
    for e in events:
        if counts(e, "launches"):
            launches[label(e)] += 1
        ops += counts(e, "ops")
    library = sum(1 for e in events if e.name in LIBRARY)
    return LaunchCount(sum(launches.values()), ops, library, dict(launches.most_common()), "cpu-profile")


# Host-side CUDA runtime calls that start work on the device.
_HOST_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch")


def count_cuda_launches(fn: Callable[[], object]) -> LaunchCount:
    """Kernels of ``fn()`` counted from the profiler's CUDA activity (:func:`device_launches`). The device is
    synchronised before and after."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_launches(prof.events())


def device_launches(events) -> LaunchCount:
    """A :class:`LaunchCount` from profiler events: every device-side (CUDA) event that is not a user annotation
    (kernels, memcpy, memset); ``host_calls``: the host's CUDA runtime launch calls (``cudaLaunchKernel``, ...);
    ``library``: kernels named like cuDNN / cuBLAS / CUTLASS ones."""
    names: Counter = Counter()
    host = 0
    for e in events:
        kind = str(getattr(e, "device_type", "")).rsplit(".", 1)[-1]
        if kind == "CUDA" and not getattr(e, "is_user_annotation", False):
            names[e.name] += 1
        elif e.name.startswith(_HOST_LAUNCH):
            host += 1
    lib = sum(v for k, v in names.items() if re.search(r"cudnn|gemm|cutlass|xmma|conv|wgrad|dgrad", k, re.I))
    n = sum(names.values())
    return LaunchCount(n, n, lib, {k[:80]: v for k, v in names.most_common(40)}, "cuda-activity", host)


def _real_step(preset: str, amp: str, device, batch: int, mode: str = "eager"):
    """A real U-Net of ``preset`` on ``device``, its train step in ``mode`` and inputs at ``batch``."""
    import torch

    from fastflow.unet import UNet

    torch.manual_seed(0)
    model = UNet(_model_config(preset)).to(device)
    run = _train_step(model, _autocast(device.type, amp), mode)
    return model, run, _inputs(batch, device)


_LAUNCHES: dict = {}


def step_launches(preset: str, amp: str, device, batch: int, compiled: bool = False) -> tuple[LaunchCount, LaunchCount]:
    """``(train step, one forward)`` launch counts on ``device`` (real tensors): after one untimed call each, one
    profiled call. On a CPU the count (:func:`count_launches`) does not depend on the batch, so ``batch`` should
    be small; on CUDA (:func:`count_cuda_launches`) it is counted at the row's batch (cuDNN picks kernels per
    shape). ``compiled``: the train step under ``torch.compile`` (mode ``compile``), CUDA only."""
    import torch

    key = (preset, amp, str(device), batch if device.type == "cuda" else None, compiled)
    if key in _LAUNCHES:
        return _LAUNCHES[key]
    counter = count_cuda_launches if device.type == "cuda" else count_launches
    try:
        model, run, (z, y, t, eps) = _real_step(preset, amp, device, batch, "compile" if compiled else "eager")
        run(z, y, t, eps)  # compiles, in mode compile
        train = counter(lambda: run(z, y, t, eps))
        model.eval().requires_grad_(False)
        with torch.no_grad(), _autocast(device.type, amp):
            model(z, t, y)
            fwd = counter(lambda: model(z, t, y))
    except Exception as e:  # a GPU that fails here (memory, a compile error) must not cost the other rows
        if device.type != "cuda":
            raise
        why = " ".join(str(e).split())[:160] or type(e).__name__
        instead = "the compile rows keep the assumed count" if compiled else "the CPU profile's count instead"
        print(f"warning: counting on CUDA failed ({type(e).__name__}: {why}); {instead}", file=sys.stderr)
        if compiled:
            raise
        train, fwd = step_launches(preset, amp, torch.device("cpu"), 2)
        return train, fwd
    if device.type == "cuda":
        train.source += f" at batch {batch}"
        fwd.source += f" at batch {batch}"
    _LAUNCHES[key] = (train, fwd)
    return train, fwd


# -- probes: dispatch cost, CPU peaks -------------------------------------------------------------------------------


def _best(fn: Callable[[], object], reps: int, warmup: int = 1, sync: Callable[[], object] = lambda: None) -> float:
    """The fastest of ``reps`` timed calls (after ``warmup``): a peak, on a CPU others share."""
    for _ in range(warmup):
        fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def dispatch_seconds(device, n: int = 2000, rounds: int = 5) -> float:
    """Host seconds per eager op: ``torch.add(a, b, out=c)`` on one-element tensors, ``n`` back to back (no
    synchronisation inside a round), the median round. On CUDA: dispatch + launch as the host sees it, the least an
    eager kernel launch costs (a convolution's dispatch costs more)."""
    import torch

    a = torch.ones(1, device=device)
    b, c = a.clone(), a.clone()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    per = []
    for _ in range(rounds + 1):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(a, b, out=c)
        per.append((time.perf_counter() - t0) / n)
        sync()
    return statistics.median(per[1:])


def _cpuinfo() -> dict:
    info = {"model": "", "mhz": None, "flags": set(), "vendor": "", "family": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "model name" and not info["model"]:
            info["model"] = v
        elif k == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(v)
        elif k == "flags" and not info["flags"]:
            info["flags"] = set(v.split())
        elif k == "vendor_id" and not info["vendor"]:
            info["vendor"] = v
        elif k == "cpu family" and info["family"] is None:
            info["family"] = int(v)
    return info


def _memtotal() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def theoretical_cpu_peak(isa: str, vendor: str, family: int | None, flags: set, mhz: float) -> dict:
    """FLOP/s per core from ISA x FMA units x clock: 2 FLOP per FMA lane, 2 FMA pipes per core (Zen 2-5; Intel
    server cores with two AVX-512 FMA ports), lanes = the narrower of the ISA's vector width and the core's FMA
    datapath (AMD Zen 3 and Zen 4, families 25: 256 bits, so AVX-512 runs as two halves and peaks no higher
    than AVX2; Zen 5, family 26: 512) / 32 bits. bf16 (AVX-512 BF16's vdpbf16ps: two bf16 products summed into
    each fp32 lane): twice fp32, only where the ISA in use is AVX-512 and the CPU has avx512_bf16; elsewhere
    torch emulates bf16 (no peak). ``mhz``: /proc/cpuinfo's clock (a VM reports the host's nominal clock; boost
    may run higher)."""
    isa_bits = {"AVX512": 512, "AVX2": 256}.get(isa.upper(), 128)
    datapath = isa_bits
    if vendor == "AuthenticAMD" and family is not None:
        datapath = 512 if family >= 26 else 256 if family >= 23 else 128
    lanes = min(isa_bits, datapath) // 32
    fp32 = 2 * 2 * lanes  # FLOP per cycle
    bf16 = 2 * fp32 if isa_bits == 512 and "avx512_bf16" in flags else None
    hz = mhz * 1e6
    return {
        "fp32_flop_per_cycle": fp32,
        "bf16_flop_per_cycle": bf16,
        "fp32": fp32 * hz,
        "bf16": bf16 * hz if bf16 else None,
        "rule": f"2 FMA pipes x {lanes} fp32 lanes ({min(isa_bits, datapath)}-bit FMA of {isa}) x 2 FLOP x "
        f"{mhz:.0f} MHz" + (", bf16 2x (vdpbf16ps)" if bf16 else ", bf16 emulated"),
    }


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no libc
        pass


def onednn_impl(fn: Callable[[], object]) -> str:
    """The oneDNN implementation that runs ``fn()``'s convolution / matmul (``jit:avx2``,
    ``brg_conv_fwd:avx512_core_bf16``, ...), from oneDNN's verbose output, or ``not oneDNN`` when oneDNN ran
    none (MKL's GEMM, or torch's own fallback: bf16 where oneDNN has no bf16 ISA)."""
    import torch

    sys.stdout.flush()
    _flush_c_stdout()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
            _flush_c_stdout()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    impls = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[0] == "onednn_verbose" and "exec" in parts and parts[-1]:
            i = parts.index("exec")
            if i + 3 < len(parts) and parts[i + 2] in ("convolution", "matmul", "inner_product"):
                impls.append(parts[i + 3])
    return ", ".join(dict.fromkeys(impls)) or "not oneDNN"


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def probe_cpu(threads: int = 1, quick: bool = False) -> dict:
    """This CPU's peaks with ``threads`` threads, measured: a convolution (64 -> 64 channels, 3x3, 28x28: the
    original U-Net's widest level at full size) through oneDNN, as the step's convolutions run, in fp32 and in
    bf16; a square GEMM through ``torch.mm`` (fp32: MKL here, bf16: oneDNN); copy bandwidth (bytes read + written
    per second of ``dst.copy_(src)``); the eager per-op dispatch time. Each FLOP/s and GB/s is the fastest of a
    few calls (a shared CPU slows some). The peak of a precision is the best of its convolution and GEMM. Also the
    ISA torch's kernels use, oneDNN's implementation of each call, cores, clock and the theoretical peak."""
    import torch
    import torch.nn.functional as F

    info = _cpuinfo()
    isa = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    isa_used = "AVX2" if cap.upper().startswith("AVX2") or isa.upper() == "AVX2" else isa
    theo = theoretical_cpu_peak(isa_used, info["vendor"], info["family"], info["flags"], info["mhz"] or 0.0)
    reps = 2 if quick else 5
    n, side, c, mm = (2, 14, 32, 256) if quick else (16, 28, 64, 1024)
    out = {
        "cpu": info["model"], "isa": isa, "onednn_max_cpu_isa": cap or None, "threads": threads,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mhz": info["mhz"], "avx512_bf16": "avx512_bf16" in info["flags"],
        "theoretical_per_thread": {k: theo[k] for k in ("fp32", "bf16")}, "theoretical_rule": theo["rule"],
        "quick": quick, "measured": {},
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with _threads(threads), torch.no_grad():
        x = torch.randn(n, c, side, side, generator=g)
        w = torch.randn(c, c, 3, 3, generator=g) * 0.05
        a = torch.randn(mm, mm, generator=g)
        conv_flops = 2 * n * c * c * 9 * side * side
        for dtype in ("fp32", "bf16"):
            xd, wd, ad = (x, w, a) if dtype == "fp32" else (x.bfloat16(), w.bfloat16(), a.bfloat16())
            conv = lambda xd=xd, wd=wd: F.conv2d(xd, wd, padding=1)  # noqa: E731
            gemm = lambda ad=ad: ad @ ad  # noqa: E731
            impl_conv, impl_gemm = onednn_impl(conv), onednn_impl(gemm)
            native = dtype == "fp32" or "bf16" in impl_conv
            r = 2 if native else 1  # emulated bf16 is tens of times slower: one call says so
            tc, tg = _best(conv, r if not native else reps), _best(gemm, r if not native else reps)
            out["measured"][f"conv_{dtype}"] = {"flops": conv_flops / tc, "impl": impl_conv, "native": native}
            out["measured"][f"gemm_{dtype}"] = {
                "flops": 2 * mm**3 / tg, "impl": impl_gemm if impl_gemm != "not oneDNN" else "not oneDNN (MKL)"
                if dtype == "fp32" else "not oneDNN (torch fallback)", "native": native,
            }  # fmt: skip
        nbytes = (8 if quick else 64) * 2**20
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        tcopy = _best(lambda: dst.copy_(src), reps)
        out["measured"]["copy_bytes_per_s"] = 2 * nbytes / tcopy
        out["measured"]["dispatch_s"] = dispatch_seconds(torch.device("cpu"), n=500 if quick else 2000)
    m = out["measured"]
    peak = {"fp32": max(m["conv_fp32"]["flops"], m["gemm_fp32"]["flops"])}
    peak["bf16"] = max(m["conv_bf16"]["flops"], m["gemm_bf16"]["flops"]) if m["conv_bf16"]["native"] else None
    out["peak"] = peak
    # The clock the probes imply under the FMA model: no core does more FLOP a cycle than the model allows.
    per_cycle = [(peak["fp32"], theo["fp32_flop_per_cycle"]), (peak["bf16"], theo["bf16_flop_per_cycle"])]
    out["implied_mhz"] = max(f / (c * threads) / 1e6 for f, c in per_cycle if f and c)
    return out


def cpu_peak(probe: dict, memory: float | None) -> Peak:
    """The :class:`Peak` of this CPU from :func:`probe_cpu` (emulated bf16: its measured rate, marked)."""
    m = probe["measured"]
    flops = {"fp32": probe["peak"]["fp32"], "tf32": probe["peak"]["fp32"]}
    flops["bf16"] = probe["peak"]["bf16"] or max(m["conv_bf16"]["flops"], m["gemm_bf16"]["flops"])
    return Peak(
        f"{probe['cpu']} ({probe['isa']}, {probe['threads']} thread{'s' if probe['threads'] > 1 else ''})",
        flops, m["copy_bytes_per_s"], memory or 0.0, m["dispatch_s"],
        "measured by this probe", "measured: eager dispatch of a one-element add on this CPU",
    )  # fmt: skip


def time_default_cpu_step(batch: int = CPU_STEP_BATCH, threads: int = 1, warmup: int = 3, iters: int = 30) -> dict:
    """The default CPU train step as training runs it: the ``cpu`` preset, eager, ``--amp auto`` (bf16 where this
    CPU runs it natively, fp32 held to AVX2), ``batch`` images in ``threads`` threads: one of the default run's two
    single-thread processes at global batch 48 (without the gradient all-reduce between them). Seconds per step:
    median and 20/80% quantiles of ``iters`` calls after ``warmup``, and the median process CPU seconds. Then one
    profiled step: ``library_s``, its seconds inside convolutions and matmuls (:data:`LIBRARY`, with all they run
    beneath them), of ``profiled_s`` (the profiler's own cost per op inflates the rest a little)."""
    import torch

    from fastflow.device import resolve_amp

    cpu = torch.device("cpu")
    amp = "bf16" if resolve_amp("auto", cpu) == torch.bfloat16 else "none"
    with _threads(threads):
        _, run, (z, y, t, eps) = _real_step("cpu", amp, cpu, batch)
        for _ in range(warmup):
            run(z, y, t, eps)
        times, cpu_times = [], []
        for _ in range(iters):
            t0, c0 = time.perf_counter(), time.process_time()
            run(z, y, t, eps)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:  # where the time goes: one more step
            t0 = time.perf_counter()
            run(z, y, t, eps)
            profiled_s = time.perf_counter() - t0
    library_s = sum(e.cpu_time_total for e in prof.events() if e.name in LIBRARY) / 1e6  # they do not nest
    times.sort()
    q = lambda p: times[min(len(times) - 1, round(p * (len(times) - 1)))]  # noqa: E731
    return {"preset": "cpu", "batch": batch, "threads": threads, "amp": amp, "iters": iters,
            "median_s": statistics.median(times), "q20_s": q(0.2), "q80_s": q(0.8),
            "cpu_s": statistics.median(cpu_times), "loadavg_1m": os.getloadavg()[0],
            "profiled_s": profiled_s, "library_s": library_s}  # fmt: skip


# -- the bound ------------------------------------------------------------------------------------------------------

TERMS = ("compute", "memory", "launches")


def bound(
    batch: int, flops: float, nbytes: float, launches: float, peak_flops: float, bandwidth: float, launch_s: float
) -> dict:
    """Images/s at most: ``batch / max(flops / peak_flops, nbytes / bandwidth, launches x launch_s)`` (seconds),
    and which term binds (``compute``, ``memory`` or ``launches``)."""
    t = {"compute": flops / peak_flops, "memory": nbytes / bandwidth, "launches": launches * launch_s}
    binds = max(TERMS, key=lambda k: t[k])
    return {
        "t_compute_s": t["compute"],
        "t_memory_s": t["memory"],
        "t_launch_s": t["launches"],
        "bound_s": t[binds],
        "bound_images_per_s": batch / t[binds] if t[binds] > 0 else math.inf,
        "binds": binds,
    }


def _peak_flops(peak: Peak, amp: str, device_type: str) -> tuple[float, str]:
    """The FLOP/s a step's convolutions and matmuls can reach: bf16 under bf16 autocast; fp32 otherwise, which on a
    GPU runs on TF32 tensor cores (the trainer's default ``--tf32``)."""
    if amp == "bf16":
        return peak.flops["bf16"], "bf16"
    if device_type == "cuda":
        return peak.flops["tf32"], "tf32"
    return peak.flops["fp32"], "fp32"


def mode_launches(mode: str, eager: LaunchCount, compiled: LaunchCount | None, cpu: bool = False) -> tuple[float, str]:
    """The host launches (on a CPU, ``cpu``: the ops dispatched one by one) a step costs in ``mode`` and where the
    figure comes from."""
    if mode == "eager":
        return (eager.ops, f"{eager.source}, ops") if cpu else (eager.launches, eager.source)
    if mode == "cudagraphs":
        return 1, "one graph launch"
    if compiled is not None:
        return compiled.launches, f"compiled step, {compiled.source}"
    return eager.library, "assumed: the eager step's conv/matmul library calls (a lower bound)"


def largest_batch(
    preset: str, amp: str, device_type: str, memory: float, known: Iterable[int] = ()
) -> tuple[int, Counts] | None:
    """The largest power-of-two batch whose memory estimate (:class:`Counts` ``memory_estimate``) stays within
    (1 − :data:`MEMORY_HELD_BACK`) of ``memory``: a linear fit of the estimate between two batches (the smallest
    and largest of ``known``, else 64 and 128), then counted at the batch itself and halved while it does not fit."""
    room = (1 - MEMORY_HELD_BACK) * memory
    known = sorted(set(known))
    b0, b1 = (known[0], known[-1]) if len(known) > 1 else (64, 128)
    lo, hi = counts(preset, b0, amp, device_type), counts(preset, b1, amp, device_type)
    per_image = (hi.memory_estimate - lo.memory_estimate) / (b1 - b0)
    fixed = lo.memory_estimate - b0 * per_image
    if per_image <= 0 or room <= fixed:
        return None
    b = 2 ** int(math.log2(max(1.0, (room - fixed) / per_image)))
    while b >= 1:
        c = counts(preset, b, amp, device_type)
        if c.memory_estimate <= room:
            return b, c
        b //= 2
    return None


# -- rows -------------------------------------------------------------------------------------------------------------


def _bench_mode(name: str) -> tuple[str, str] | None:
    """``(step mode, amp)`` of a bench row's mode (``compile-bf16-cudagraphs`` -> ``(cudagraphs, bf16)``), or None
    for the seed baseline (a different loop)."""
    if name.startswith("seed"):
        return None
    amp = "bf16" if "bf16" in name.split("-") else "none"
    mode = "cudagraphs" if "cudagraphs" in name else "compile" if name.startswith("compile") else "eager"
    return mode, amp


def load_measured(paths: Iterable[str]) -> list[dict]:
    """The ok rows of bench result files (``bench/results/train-*.json``, ``sample-*.json``)."""
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data.get("rows", []):
            if r.get("status") == "ok" and r.get("suite") in ("train", "sample") and _bench_mode(r.get("mode", "")):
                rows.append({**r, "file": str(p)})
    return rows


def _matches(pred: dict, m: dict) -> bool:
    mode, amp = _bench_mode(m["mode"])
    channels = list(_model_config(pred["preset"]).channels)
    return (
        m.get("preset") == pred["preset"]
        and (m.get("channels") is None or list(m["channels"]) == channels)
        and m["batch"] == pred["batch"]
        and (mode, amp) == (pred["mode"], pred["amp"])
        and m["suite"] == pred["kind"]
    )


def build_rows(
    device: str,
    peak: Peak,
    presets: list[str],
    batches: list[int],
    amps: list[str],
    modes: list[str],
    *,
    count_device,
    launch_batch: int = 2,
    count_compiled: bool = False,
    measured: list[dict] = (),
    max_batch: bool = True,
) -> list[dict]:
    """Train and sampler rows for every (preset, batch, amp, mode); ``count_device``: where launches are counted
    (a CUDA device counts its own kernels). With ``max_batch`` each (preset, amp) gets rows at the largest batch
    whose memory estimate fits ``peak.memory``."""
    device_type = "cpu" if device == "cpu" else "cuda"
    rows = []
    for preset in presets:
        for amp in amps:
            sizes = [(b, False) for b in batches]
            fit = largest_batch(preset, amp, device_type, peak.memory, batches) if max_batch and peak.memory else None
            if fit and fit[0] not in batches:
                sizes.append((fit[0], True))
            comp_l = None
            if count_compiled and "compile" in modes and count_device.type == "cuda":  # one compile, 1st batch
                try:
                    comp_l = step_launches(preset, amp, count_device, min(batches), compiled=True)[0]
                except Exception:  # said on stderr; the compile rows keep the assumed count
                    comp_l = None
            for b, is_max in sizes:
                c = counts(preset, b, amp, device_type)
                # CUDA: counted at the row's batch (the largest-fit row: at the largest batch asked for, which
                # surely fits); a CPU's count does not depend on the batch.
                lb = (max(batches) if is_max else b) if count_device.type == "cuda" else launch_batch
                train_l, fwd_l = step_launches(preset, amp, count_device, lb)
                pf, precision = _peak_flops(peak, amp, device_type)
                common = {
                    "device": device, "device_name": peak.name, "preset": preset,
                    "channels": list(_model_config(preset).channels), "batch": b, "amp": amp, "precision": precision,
                    "largest_fit": is_max or (fit is not None and fit[0] == b), "params": c.params,
                    "memory_estimate_bytes": c.memory_estimate, "device_memory_bytes": peak.memory,
                    "saved_bytes": c.saved_bytes, "saved_by_dtype": c.saved_by_dtype, "peak_flops": pf,
                    "bandwidth": peak.bandwidth, "launch_s": peak.launch_s, "prediction": device != "cpu",
                    "counted_on": str(count_device) if count_device.type == "cpu" else _cuda_name(),
                }  # fmt: skip
                for mode in modes:
                    n, src = mode_launches(mode, train_l, comp_l, cpu=device == "cpu")
                    r = {**common, "kind": "train", "mode": mode, "flops": c.train_flops, "bytes": c.train_bytes,
                         "bytes_parts": c.train_bytes_parts, "launches": n, "launch_source": src,
                         "eager_launches": train_l.launches, "eager_ops": train_l.ops,
                         "library_calls": train_l.library, "flops_by_op": c.train_flops_by_op}  # fmt: skip
                    r.update(bound(b, c.train_flops, c.train_bytes, n, pf, peak.bandwidth, peak.launch_s))
                    r["epoch_s"] = EPOCH_IMAGES / r["bound_images_per_s"]
                    rows.append(r)
                    n, src = mode_launches(mode, fwd_l, None, cpu=device == "cpu")
                    s = {**common, "kind": "sample", "mode": mode, "flops": c.sample_flops, "bytes": c.sample_bytes,
                         "launches": n, "launch_source": src, "eager_launches": fwd_l.launches,
                         "library_calls": fwd_l.library}  # fmt: skip
                    s.update(bound(b, c.sample_flops, c.sample_bytes, n, pf, peak.bandwidth, peak.launch_s))
                    rows.append(s)
    for r in rows:
        mine = [m for m in measured if _matches(r, m)]
        if mine:
            r["measured"] = []
            for m in mine:
                ips = m["images_per_s"] * (m.get("nfe") or 1) if r["kind"] == "sample" else m["images_per_s"]
                peak_mb = m.get("torch_peak_mb")  # torch's allocator peak (CUDA): what the estimate estimates
                r["measured"].append({
                    "mode": m["mode"], "nfe": m.get("nfe"), "images_per_s": ips, "ratio": ips / r["bound_images_per_s"],
                    "device_name": m.get("device_name"), "torch_peak_mb": peak_mb,
                    "peak_over_estimate": peak_mb * 2**20 / r["memory_estimate_bytes"] if peak_mb else None,
                    "file": m["file"],
                })  # fmt: skip
    return rows


# -- output -----------------------------------------------------------------------------------------------------------


def _si(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _md(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _measured_cell(r: dict) -> tuple[str, str]:
    ms = r.get("measured") or []
    if not ms:
        return "", ""
    if r["kind"] == "sample":
        vals = "; ".join(f"{m['images_per_s']:,.0f} @{m['nfe']}NFE" for m in ms)
    else:
        vals = "; ".join(
            f"{m['images_per_s']:,.0f}"
            + (f" ({m['mode']})" if len(ms) > 1 else "")
            + (f", peak {m['peak_over_estimate']:.2f}x the memory estimate" if m.get("peak_over_estimate") else "")
            for m in ms
        )
    return vals, "; ".join(f"{m['ratio']:.2f}" for m in ms)


def roofline_table(rows: list[dict]) -> str:
    """The rows as markdown: a train table (per step) and a sampler table (per network evaluation), each row its
    FLOPs, least bytes, launches, the three times, the bound and the limit that binds; measured images/s and
    measured ÷ bound where rows were joined. Predicted figures are labelled as predictions."""
    out = []
    measured = any(r.get("measured") for r in rows)
    for kind in ("train", "sample"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        pred, where = mine[0].get("prediction"), str(mine[0].get("counted_on", "cpu"))
        what = "train step" if kind == "train" else "sampler evaluation (one forward at batch B; guided: 2B)"
        label = ""
        if pred:
            label = (
                " (a prediction: not run on a GPU)"
                if where == "cpu"
                else f" (a bound, its launches counted on {where}; a prediction unless measured)"
            )
        out.append(f"**{what}** on {mine[0]['device_name']}{label}")
        out.append("")
        head = ["preset", "batch", "amp", "mode", "GFLOP", "least MB", "launches", "compute ms", "memory ms",
                "launch ms", "bound img/s" if kind == "train" else "bound img·NFE/s", "binds"]  # fmt: skip
        head += ["epoch s"] if kind == "train" else []
        head += ["measured", "measured ÷ bound"] if measured else []
        out += [_md(head), "|" + "---|" * 4 + "--:|" * (len(head) - 4)]
        for r in mine:
            cells = [
                r["preset"], f"{r['batch']}{'*' if r.get('largest_fit') else ''}", r["amp"], r["mode"],
                _num(r["flops"] / 1e9), _num(r["bytes"] / 1e6), f"{r['launches']:.0f}", _num(1e3 * r["t_compute_s"]),
                _num(1e3 * r["t_memory_s"]), _num(1e3 * r["t_launch_s"]), f"{r['bound_images_per_s']:,.0f}", r["binds"],
            ]  # fmt: skip
            cells += [_num(r["epoch_s"])] if kind == "train" else []
            cells += list(_measured_cell(r)) if measured else []
            out.append(_md(cells))
        out.append("")
    notes = []
    if any(r.get("largest_fit") for r in rows):
        fits = {(r["preset"], r["amp"], r["batch"], r["memory_estimate_bytes"], r["device_memory_bytes"])
                for r in rows if r.get("largest_fit")}  # fmt: skip
        for p, a, b, est, mem in sorted(fits):
            notes.append(
                f"- \\* {p}, {a}: batch {b} is the largest power of two whose memory estimate fits (an estimate: "
                f"{est / 1e9:.1f} GB of weights, gradients, AdamW, EMA, saved activations and inputs, within "
                f"{100 * (1 - MEMORY_HELD_BACK):.0f}% of {mem / 1e9:.0f} GB)"
            )
    srcs = sorted({f"{r['mode']}: {r['launch_source']}" for r in rows if r["kind"] == "train"})
    notes.append("- launches, " + "; ".join(srcs))
    return "\n".join(out + notes)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def _probe_lines(probe: dict) -> list[str]:
    m, th = probe["measured"], probe["theoretical_per_thread"]
    n = probe["threads"]
    lines = [
        f"CPU: {probe['cpu']}, {probe['cores']} cores, {probe['mhz']} MHz (/proc/cpuinfo), torch ISA {probe['isa']}"
        + (f", ONEDNN_MAX_CPU_ISA={probe['onednn_max_cpu_isa']}" if probe["onednn_max_cpu_isa"] else "")
        + f", avx512_bf16 {'listed' if probe['avx512_bf16'] else 'absent'}; probe with {n} thread{'s' * (n > 1)}"
        + (" (--quick-probe: small shapes, few calls)" if probe["quick"] else ""),
        f"theoretical per thread: {_si(th['fp32'], 'FLOP/s')} fp32, "
        + (f"{_si(th['bf16'], 'FLOP/s')} bf16" if th["bf16"] else "bf16 emulated")
        + f" ({probe['theoretical_rule']}); x{n} threads: {_si(n * th['fp32'], 'FLOP/s')} fp32",
        f"the fastest probe implies a clock of at least {probe['implied_mhz']:.0f} MHz under that FMA model"
        + (
            " (above /proc/cpuinfo's: a VM sees the host's nominal clock, boost runs higher; shares of the "
            "theoretical peak over 100% mean that)"
            if probe["implied_mhz"] > (probe["mhz"] or 0)
            else ""
        ),
        "",
        "| probe | measured | library / implementation | share of theoretical |",
        "|---|--:|---|--:|",
    ]
    for k in ("conv_fp32", "gemm_fp32", "conv_bf16", "gemm_bf16"):
        prec = k.split("_")[1]
        theo = th[prec] * n if th[prec] else None
        share = f"{m[k]['flops'] / theo:.0%}" if theo else "– (emulated)"
        label = k.replace("_", " ") + ("" if m[k]["native"] else " (emulated)")
        lines.append(f"| {label} | {_si(m[k]['flops'], 'FLOP/s')} | {m[k]['impl']} | {share} |")
    lines += [
        f"| copy bandwidth | {_si(m['copy_bytes_per_s'], 'B/s')} | dst.copy_(src), read + write | |",
        f"| eager dispatch | {1e6 * m['dispatch_s']:.2f} us/op | one-element add | |",
        "",
        f"probed peak: {_si(probe['peak']['fp32'], 'FLOP/s')} fp32, "
        + (f"{_si(probe['peak']['bf16'], 'FLOP/s')} bf16" if probe["peak"]["bf16"] else "bf16 emulated (no peak)")
        + " (the best of the conv and GEMM probes)",
    ]
    return lines


def _step_lines(step: dict) -> list[str]:
    return [
        f"default CPU train step (the cpu preset, eager, amp auto = {step['amp']}, batch {step['batch']}, "
        f"{step['threads']} thread: one of the default run's two single-thread processes at global batch 48, "
        "timed without the all-reduce between them):",
        f"  {1e3 * step['median_s']:.1f} ms a step (median of {step['iters']}; 20-80%: {1e3 * step['q20_s']:.1f}-"
        f"{1e3 * step['q80_s']:.1f} ms; process CPU time {1e3 * step['cpu_s']:.1f} ms; load average "
        f"{step['loadavg_1m']:.1f}: a shared CPU, noisy), {step['batch'] / step['median_s']:.0f} images/s, "
        f"{step['flops'] / 1e9:.3g} GFLOP counted (convolutions and matmuls)",
        f"  achieved {_si(step['achieved_flops'], 'FLOP/s')} = {step['share_of_probed']:.1%} of the probed "
        f"{step['precision']} peak ({_si(step['probed_peak'], 'FLOP/s')}), {step['share_of_conv_probe']:.1%} of the "
        f"{step['precision']} conv probe ({_si(step['conv_probe'], 'FLOP/s')}), "
        + (
            f"{step['share_of_theoretical']:.1%} of the theoretical ({_si(step['theoretical_peak'], 'FLOP/s')})"
            if step.get("theoretical_peak")
            else "no theoretical peak (emulated)"
        )
        + f"; on process CPU time {_si(step['flops'] / step['cpu_s'], 'FLOP/s')} = "
        f"{step['flops'] / step['cpu_s'] / step['probed_peak']:.1%} of the probed peak",
        f"  one profiled step: {step['library_s'] / step['profiled_s']:.0%} of its {1e3 * step['profiled_s']:.1f} ms in "
        f"convolutions and matmuls, at {_si(step['flops'] / step['library_s'], 'FLOP/s')} while there "
        f"({step['flops'] / step['library_s'] / step['probed_peak']:.0%} of the probed peak); the rest: "
        f"{step['eager_ops'] - step['library_calls']} other ops (GroupNorm, SiLU, elementwise, casts, AdamW, EMA)",
        f"  the roofline's bound for this step: {step['bound_images_per_s']:.0f} images/s ({step['binds']}-bound): "
        f"measured ÷ bound {step['batch'] / step['median_s'] / step['bound_images_per_s']:.2f}",
    ]


def build_parser() -> argparse.ArgumentParser:
    from fastflow.config import PRESETS
    from fastflow.errors import ArgumentParser
    from fastflow.settings import parse_int_list

    p = ArgumentParser(prog="python -m bench roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"comma-separated, from {', '.join(PRESETS)} (default: "
                   "original on a GPU, cpu for --device cpu)")  # fmt: skip
    p.add_argument("--batch-sizes", type=parse_int_list, default=DEFAULT_BATCHES)
    p.add_argument(
        "--device",
        default="a100",
        choices=DEVICES,
        help="the peaks to bound against: a GPU of the datasheet table, cpu (this machine, probed), or cuda (the "
        "GPU here, by name)",
    )
    p.add_argument(
        "--amp", default="auto", help="bf16, none, or both comma-separated; auto: bf16 on a GPU, the CPU's "
        "--amp auto choice (bf16 where native) on cpu"
    )  # fmt: skip
    p.add_argument("--modes", default=None, help="from eager, compile, cudagraphs (default: all three on a GPU, "
                   "eager on cpu)")  # fmt: skip
    p.add_argument("--measured", nargs="+", default=[], metavar="RESULT.json",
                   help="bench result files (train-*.json, sample-*.json) to join: measured images/s ÷ the bound")  # fmt: skip
    p.add_argument("--out", default=None, help="rows as JSON (default: bench/results/roofline-<device>.json)")
    p.add_argument("--threads", type=int, default=1, help="cpu: threads of the probe and the bound (default 1: the "
                   "default CPU run's processes have one each)")  # fmt: skip
    p.add_argument("--quick-probe", action="store_true", help="cpu: a short probe and step timing (tests)")
    p.add_argument("--no-max-batch", action="store_true", help="no rows at the largest batch that fits")
    p.add_argument("--count-compiled", action="store_true",
                   help="on a CUDA machine: count the compiled step's kernels (compiles it: a minute or more)")  # fmt: skip
    p.add_argument("--launch-batch", type=int, default=2, help="batch of the CPU launch count (it does not depend on "
                   "the batch)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "roofline":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    import torch

    from fastflow.config import PRESETS
    from fastflow.device import resolve_amp

    on_cuda = torch.cuda.is_available()
    device = args.device
    if device == "cuda":
        if not on_cuda:
            print("error: --device cuda: no CUDA device here (name a GPU: a100, h200, ...)", file=sys.stderr)
            return 2
        device = gpu_key(torch.cuda.get_device_name())
        if device is None:
            print(f"error: no peaks for {torch.cuda.get_device_name()!r}; name one of {', '.join(GPU_PEAKS)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    gpu = device != "cpu"
    measured = load_measured(args.measured)
    presets = (args.preset or ("original" if gpu else "cpu")).split(",")
    presets += sorted({m["preset"] for m in measured if m.get("preset") in PRESETS} - set(presets))
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        print(f"error: unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    batches = sorted(set(args.batch_sizes) | {m["batch"] for m in measured})
    if args.amp == "auto":
        native = resolve_amp("auto", torch.device("cpu")) == torch.bfloat16
        amps = ["bf16"] if gpu or native else ["none"]
    else:
        amps = args.amp.split(",")
    amps += sorted({_bench_mode(m["mode"])[1] for m in measured} - set(amps))
    modes = (args.modes or ("eager,compile,cudagraphs" if gpu else "eager")).split(",")
    if any(a not in ("bf16", "none") for a in amps) or any(m not in ("eager", "compile", "cudagraphs") for m in modes):
        print("error: --amp takes bf16, none; --modes eager, compile, cudagraphs", file=sys.stderr)
        return 2
    if not gpu and "cudagraphs" in modes:
        print("error: --device cpu: no CUDA graphs on a CPU (--modes eager,compile)", file=sys.stderr)
        return 2

    payload: dict = {"format": "fastflow-roofline-1", "device": device, "argv": argv, "torch": torch.__version__,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    lines: list[str] = []
    count_device = torch.device("cuda" if gpu and on_cuda else "cpu")
    if gpu:
        peak = GPU_PEAKS[device]
        if on_cuda:
            host = dispatch_seconds(count_device)
            peak = Peak(**{**asdict(peak), "launch_s": host,
                           "launch_source": f"measured on this host ({torch.cuda.get_device_name()}): eager "
                           f"dispatch + launch of a one-element add, {1e6 * host:.2f} us"})  # fmt: skip
        lines.append(f"device: {peak.name} ({peak.source}): {_si(peak.flops['bf16'], 'FLOP/s')} bf16, "
                     f"{_si(peak.flops['tf32'], 'FLOP/s')} tf32 (fp32 runs: --tf32 is the default), "
                     f"{_si(peak.bandwidth, 'B/s')}, {peak.memory / 1e9:.0f} GB")  # fmt: skip
        lines.append(f"per eager launch: {1e6 * peak.launch_s:.2f} us ({peak.launch_source})")
        here = dispatch_seconds(torch.device("cpu"), n=1000)
        lines.append(f"(this host's CPU dispatch of an eager op: {1e6 * here:.2f} us, a lower bound for a CUDA launch)")
        if not on_cuda:
            lines.append("every figure below is a prediction: not run on a GPU (counted on this CPU, fake tensors)")
    else:
        probe = probe_cpu(args.threads, args.quick_probe)
        peak = cpu_peak(probe, _memtotal())
        payload["probe"] = probe
        lines += _probe_lines(probe)
        lines.append(f"per op: {1e6 * peak.launch_s:.2f} us (eager dispatch, measured); memory "
                     f"{peak.memory / 1e9:.0f} GB (MemTotal); the rows are per process at {args.threads} "
                     "thread(s)")  # fmt: skip
    lines.append(f"launches counted on {count_device.type}: "
                 + ("the profiler's CUDA activity (kernels, memcpy, memset)" if count_device.type == "cuda"
                    else f"a CPU profile of one eager step at batch {args.launch_batch} "
                         "(count_launches' rule: a lower bound of CUDA's kernels)"))  # fmt: skip

    rows = build_rows(
        device, peak, presets, batches, amps, modes, count_device=count_device, launch_batch=args.launch_batch,
        count_compiled=args.count_compiled, measured=measured, max_batch=gpu and not args.no_max_batch,
    )  # fmt: skip
    payload["peak"] = asdict(peak)
    payload["rows"] = rows
    print("\n".join(lines))
    print()
    print(roofline_table(rows))

    if not gpu and args.threads != 1:
        print("\n(the default CPU train step is timed with --threads 1 only: its processes run one thread each)")
    elif not gpu:
        step = time_default_cpu_step(threads=args.threads, warmup=1 if args.quick_probe else 3,
                                     iters=3 if args.quick_probe else 30)  # fmt: skip
        c = counts("cpu", step["batch"], step["amp"], "cpu")
        pf, precision = _peak_flops(peak, step["amp"], "cpu")
        theo = probe["theoretical_per_thread"][precision if precision == "bf16" else "fp32"]
        train_l, _ = step_launches("cpu", step["amp"], torch.device("cpu"), args.launch_batch)
        b = bound(step["batch"], c.train_flops, c.train_bytes, train_l.ops, pf, peak.bandwidth, peak.launch_s)
        step.update(
            flops=c.train_flops, achieved_flops=c.train_flops / step["median_s"], precision=precision,
            probed_peak=pf, share_of_probed=c.train_flops / step["median_s"] / pf,
            theoretical_peak=theo * args.threads if theo else None,
            share_of_theoretical=c.train_flops / step["median_s"] / (theo * args.threads) if theo else None,
            eager_ops=train_l.ops, library_calls=train_l.library, conv_probe=probe["measured"][f"conv_{precision}"]["flops"], **b,
        )  # fmt: skip
        step["share_of_conv_probe"] = step["achieved_flops"] / step["conv_probe"]
        payload["default_step"] = step
        print()
        print("\n".join(_step_lines(step)))
        m = probe["measured"]
        if step["amp"] == "none" and m["conv_bf16"]["native"] and m["conv_bf16"]["flops"] > m["conv_fp32"]["flops"]:
            from fastflow.device import cpu_bf16_probe

            fp32_s, bf16_s = cpu_bf16_probe()
            print(f"  note: --amp auto chose fp32 in this process (its matmul probe: bf16 {bf16_s / fp32_s:.2g}x fp32's "
                  "time), though bf16 runs natively here and faster than fp32 (the conv probes above): a loaded CPU "
                  "can tip that probe; training started now would run fp32 too")  # fmt: skip
    slug = device if gpu else f"cpu-{probe['isa'].lower()}"
    out = Path(args.out) if args.out else RESULTS / f"roofline-{slug}.json"
    payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(out, payload)
    print(f"\nrows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
