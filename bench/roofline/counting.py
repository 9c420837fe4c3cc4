"""Counting what a step costs, on fake tensors (shapes only): FLOPs of the convolutions and matrix products, the
tensors autograd saves for the backward, and from them the least bytes a train step and a sampler evaluation move
and the memory a train step holds. Also the one coupling to fastflow's train step (:func:`train_step`)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "IMAGE",
    "Counts",
    "count_flops",
    "saved_tensor_bytes",
    "autocast",
    "train_step",
    "model_config",
    "inputs",
    "fake",
    "fake_model",
    "flops",
    "counts",
]

IMAGE = (1, 28, 28)


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


def autocast(device_type: str, amp: str):
    """A fresh autocast context for ``amp`` (``bf16`` or ``none``) on ``device_type``, as the trainer builds it."""
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    if device_type == "cuda" and not torch.cuda.is_available():
        return _ForcedAutocast("cuda", torch.bfloat16)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


# -- the one coupling to fastflow's train step ----------------------------------------------------------------------


def train_step(model, ctx, mode: str = "eager") -> Callable:
    """``run(z, y, t, eps)``: one step of fastflow's train step (flow-matching loss, ``autograd.grad``, AdamW,
    EMA) in ``mode`` (eager: fused AdamW) on ``model`` under the autocast context ``ctx`` (None: fp32), with a
    fresh AdamW and EMA.
    Also ``run.loss(z, y, t, eps)``: the forward of the loss the step differentiates (no backward), for the saved
    tensors on a device whose backward cannot run here. The only place this package knows the step's API."""
    from fastflow.ema import EMA
    from fastflow.objectives import FlowBatch
    from fastflow.path import flow_matching_loss
    from fastflow.step import TrainStep, make_optimizer

    step = TrainStep(model, make_optimizer(model.parameters(), 1e-4, 0.0), EMA(model), ctx, mode=mode)

    def run(z, y, t, eps):
        return step(FlowBatch(z, y, t, eps), 1e-4)

    run.loss = lambda z, y, t, eps: flow_matching_loss(model, z, y, t, eps, ctx)  # what TrainStep._step takes
    return run


def model_config(preset: str):
    from fastflow.config import resolve_configs

    return resolve_configs(preset, "cpu")[0]


def inputs(batch: int, device=None):
    """z, eps [B, 1, 28, 28] fp32, t [B] fp32, y [B] int64 (labels, 10 = no label), on ``device`` (None: the
    default device)."""
    import torch

    z = torch.rand(batch, *IMAGE, device=device) * 2 - 1
    eps = torch.randn(batch, *IMAGE, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 11, (batch,), device=device)
    return z, y, t, eps


@contextlib.contextmanager
def fake(device_type: str = "cpu"):
    """Fake tensors of ``device_type`` (shapes, dtypes and devices without data), the kernels' reference math."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        with kernels.use_backend("reference"), FakeTensorMode() as mode, torch.device(device_type):
            yield mode


def fake_model(mode, mcfg, amp: str, device_type: str):
    """A fake U-Net and its train step, built inside ``mode``: ``FakeCopyMode`` keeps the EMA's deepcopy in the
    same fake mode."""
    from torch._subclasses.fake_tensor import FakeCopyMode

    from fastflow.unet import UNet

    with FakeCopyMode(mode):
        model = UNet(mcfg)
        run = train_step(model, autocast(device_type, amp))
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


def flops(preset: str, batch: int, amp: str) -> tuple[int, dict, int]:
    """``(train step FLOPs, per op, forward FLOPs)`` on fake CPU tensors: a count of shapes, the same on any
    device and in any precision (``amp`` is applied all the same); cached."""
    import torch

    key = (preset, batch, amp)
    if key not in _FLOPS:
        with fake("cpu") as mode:
            model, run = fake_model(mode, model_config(preset), amp, "cpu")
            z, y, t, eps = inputs(batch)
            train, by_op = count_flops(lambda: run(z, y, t, eps))
            with torch.no_grad(), autocast("cpu", amp):
                fwd, _ = count_flops(lambda: model(z, t, y))
        _FLOPS[key] = (train, by_op, fwd)
    return _FLOPS[key]


def counts(preset: str, batch: int, amp: str, device_type: str) -> Counts:
    """What a step and an evaluation of ``preset`` at ``batch`` cost: FLOPs (:func:`flops`) and the saved tensors
    of the step's loss on fake tensors of ``device_type`` under its autocast policy; cached."""
    key = (preset, batch, amp, device_type)
    if key in _SAVED:
        return _SAVED[key]
    train_flops, by_op, sample_flops = flops(preset, batch, amp)
    with fake(device_type) as mode:
        model, run = fake_model(mode, model_config(preset), amp, device_type)
        ins = inputs(batch)
        params = list(model.parameters())
        saved, by_dtype = saved_tensor_bytes(lambda: run.loss(*ins), exclude=[*params, *ins])
    n = sum(p.numel() for p in params)
    pb = sum(p.numel() * p.element_size() for p in params)
    in_bytes = sum(x.numel() * x.element_size() for x in ins)
    parts = {
        "weights": pb,  # read once in the forward
        "gradients": pb,  # written once in the backward
        "adamw": 7 * pb,  # params, exp_avg, exp_avg_sq read + written; gradients read
        "ema": 3 * pb,  # shadow read + written; params read
        "activations": 2 * saved,  # written once in the forward, read once in the backward
        "inputs": in_bytes,
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
        input_bytes=in_bytes,
        train_bytes=sum(parts.values()),
        train_bytes_parts=parts,
        sample_bytes=pb + image_bytes + batch * (4 + 8) + image_bytes,  # weights; x, t, y in; v out
        memory_estimate=5 * pb + saved + in_bytes,  # weights, gradients, exp_avg, exp_avg_sq, EMA; activations; inputs
    )
    _SAVED[key] = c
    return c
