"""``python -m bench train``'s rows: one training-loop iteration (fetch a batch, ``Trainer.train_step``) per call,
per step mode and batch size, on MNIST or on synthetic data of its shape."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastflow.errors import UserError

__all__ = [
    "MODES",
    "Mode",
    "TABLE_ORDER",
    "DATA",
    "BASELINE_BATCH",
    "skip_reason",
    "training_api",
    "resolve_data",
    "synthetic_mnist",
    "train_runner",
]


@dataclass(frozen=True)
class Mode:
    compile: bool = False
    amp: str = "none"  # none | bf16
    cuda_graphs: bool = False
    baseline: bool = False  # the original loop: torchvision dataset + DataLoader, fixed batch 32
    channels_last: bool = False


MODES: dict[str, Mode] = {
    "eager-fp32": Mode(),
    "eager-bf16": Mode(amp="bf16"),
    "eager-bf16-channels-last": Mode(amp="bf16", channels_last=True),
    "eager-fp32-channels-last": Mode(channels_last=True),
    "compile": Mode(compile=True),
    "compile-bf16": Mode(compile=True, amp="bf16"),
    "compile-bf16-cudagraphs": Mode(compile=True, amp="bf16", cuda_graphs=True),
    "seed-baseline": Mode(baseline=True),
}
BASELINE_BATCH = 32  # the original project's batch size
# Row order of the compact tables: the baseline, then eager, then compiled.
TABLE_ORDER = (
    "seed-baseline",
    "eager-fp32",
    "eager-bf16",
    "eager-bf16-channels-last",
    "eager-fp32-channels-last",
    "compile",
    "compile-bf16",
    "compile-bf16-cudagraphs",
)


def skip_reason(suite: str, mode: str, batch: int, device_type: str) -> str | None:
    """Why a (suite, mode, batch) row is not measured on this device, or None."""
    m = MODES[mode]
    if m.cuda_graphs and device_type != "cuda":
        return "CUDA graphs need a CUDA device"
    if m.baseline and suite == "sample":
        return "the original sampler is the eager-fp32 loop: see eager-fp32"
    if m.baseline and batch != BASELINE_BATCH:
        return f"the original loop runs batch {BASELINE_BATCH} only"
    return None


def training_api() -> tuple[Callable, Callable]:
    """``(fastflow.trainer.Trainer, fastflow.config.resolve_configs)``: bench's only way into training (the
    Trainer's ``train_step`` draws, schedules, steps and advances ``trainer.step`` itself). Importing them is also
    the GPU check's import test of the train side."""
    from fastflow.config import resolve_configs
    from fastflow.trainer import Trainer

    return Trainer, resolve_configs


# -- data ---------------------------------------------------------------------------------------------------------

DATA = ("auto", "synthetic", "mnist")
SYNTHETIC_IMAGES = 60000  # as many as MNIST's training set: the same epoch length and loader work


def resolve_data(kind: str, root: str) -> tuple[str, str | None]:
    """``(kind, line)``: ``auto`` becomes ``mnist`` when MNIST's files are in ``root`` and ``synthetic`` otherwise
    (``line`` then says so); nothing is downloaded or rebuilt. ``mnist`` loads as training does (which may)."""
    if kind not in DATA:
        raise UserError(f"--data {kind!r}: choose one of {', '.join(DATA)}")
    if kind != "auto":
        return kind, None
    from fastflow.data import raw_dir, verify

    if not verify(root):  # [] = all four files there with the right checksums
        return "mnist", None
    return "synthetic", (
        f"data: no MNIST in {raw_dir(root)}: training on synthetic uint8 noise of MNIST's shape "
        f"({SYNTHETIC_IMAGES} x 28 x 28, labels 0-9); images/s does not depend on the pixel values"
    )


def synthetic_mnist(n: int = SYNTHETIC_IMAGES, seed: int = 0):
    """``fastflow.data.MNISTArrays`` of uniform uint8 noise: images [n, 28, 28] uint8, labels [n] int64 in 0..9."""
    import torch

    from fastflow.data import MNISTArrays

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
    return MNISTArrays(images, labels)


def train_runner(
    mode: str,
    batch: int,
    *,
    preset: str = "auto",
    device: str = "auto",
    data: str = "auto",
    data_root: str = "data",
    workdir: str | None = None,
    model: dict | None = None,
) -> tuple[Callable[[], object], dict]:
    """One training-loop iteration per call (fetch a batch, ``Trainer.train_step``); returns ``(run, info)``.
    ``run()`` returns the step's loss (a 0-d tensor, not synchronised). ``data``: auto, synthetic or mnist
    (:func:`resolve_data`); ``info["data"]`` is the one used."""
    import torch

    from fastflow.device import resolve_device

    Trainer, resolve_configs = training_api()
    m = MODES[mode]
    dev = resolve_device(device)
    data, _ = resolve_data(data, data_root)
    workdir = workdir or tempfile.mkdtemp(prefix="fastflow-bench-")
    mcfg, cfg = resolve_configs(
        preset,
        dev.type,
        model=model,
        train={
            "batch_size": batch,
            "amp": m.amp,
            "compile": m.compile,
            "cuda_graphs": m.cuda_graphs,
            "device": dev.type,
            "data_root": data_root,
            "model_dir": str(Path(workdir) / "model"),
            "result_dir": str(Path(workdir) / "result"),
            "num_epochs": 1000,  # the lr schedule never reaches its end inside a benchmark
            "time_budget": 0.0,  # a fixed schedule, not one planned from the measured rate
        },
    )
    arrays = synthetic_mnist(seed=cfg.seed) if data == "synthetic" else None  # None: the Trainer loads MNIST
    trainer = Trainer(mcfg, cfg, dev, data=arrays)
    if m.channels_last:
        trainer.model.to(memory_format=torch.channels_last)

    if m.baseline:
        from .baseline import baseline_batches

        batches = baseline_batches(data_root, batch, cfg.seed, cfg.num_workers, arrays)
    else:
        batches = _device_batches(trainer)

    def run():
        z, y = next(batches)
        if m.baseline:
            z, y = z.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return trainer.train_step(z, y)

    loader = "device-resident, a seeded permutation per epoch"
    if m.baseline:
        pixels = "torchvision's MNIST" if arrays is None else "synthetic pixels"
        loader = f"DataLoader, {cfg.num_workers} worker(s), per image PIL + ToTensor + Normalize ({pixels})"
    info = {"preset": cfg.preset, "model": mcfg, "device": dev, "trainer": trainer, "data": data, "loader": loader}
    return run, info


def _device_batches(trainer):
    trainer.prepare()
    epoch = 0
    while True:
        yield from trainer.loader.epoch(epoch)
        epoch += 1
