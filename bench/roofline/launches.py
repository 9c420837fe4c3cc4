"""Counting kernel launches of one eager step: from a CPU profile by a rule (:func:`count_launches`), or on a CUDA
device from the profiler's CUDA activity (:func:`count_cuda_launches`); :func:`step_launches` for a preset."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .counting import autocast, inputs, model_config, train_step

__all__ = [
    "NO_KERNEL",
    "MULTI_TENSOR",
    "LIBRARY",
    "LaunchCount",
    "count_launches",
    "count_cuda_launches",
    "device_launches",
    "real_step",
    "step_launches",
]


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


def real_step(preset: str, amp: str, device, batch: int, mode: str = "eager"):
    """A real U-Net of ``preset`` on ``device``, its train step in ``mode`` and inputs at ``batch``."""
    import torch

    from fastflow.unet import UNet

    torch.manual_seed(0)
    model = UNet(model_config(preset)).to(device)
    run = train_step(model, autocast(device.type, amp), mode)
    return model, run, inputs(batch, device)


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
        model, run, (z, y, t, eps) = real_step(preset, amp, device, batch, "compile" if compiled else "eager")
        run(z, y, t, eps)  # compiles, in mode compile
        train = counter(lambda: run(z, y, t, eps))
        model.eval().requires_grad_(False)
        with torch.no_grad(), autocast(device.type, amp):
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
