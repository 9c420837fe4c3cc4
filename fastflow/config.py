"""Settings as dataclasses, named presets, and argparse built from the fields.

Precedence, lowest first: the dataclass defaults, the preset, the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, fields

from .errors import UserError

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "add_dataclass_args",
    "resolve_preset",
    "parse_int_list",
    "validate",
    "model_config_from_dict",
]


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's shape. Everything a checkpoint needs to rebuild the network."""

    channels: tuple[int, ...] = (64, 128, 256)  # width per resolution: 28×28, 14×14, 7×7
    blocks_per_level: int = 1  # residual blocks per level on the way down (one more on the way up)
    emb_dim: int = 256  # time + label embedding width
    num_classes: int = 10  # digits; index num_classes is "no label" (classifier-free guidance)
    groups: int = 8  # GroupNorm groups (capped by the channel count)
    in_channels: int = 1


@dataclass
class TrainConfig:
    """Training settings. The first five fields are the original Rust/Burn project's config."""

    num_epochs: int = 10
    batch_size: int = 32
    num_workers: int = 1  # kept from the original; the device-resident loader needs no worker processes
    seed: int = 42
    lr: float = 1e-4
    device: str = "auto"  # auto | cpu | cuda
    preset: str = "auto"  # auto picks "original" on CUDA and "cpu" on CPU
    model_dir: str = "model"
    result_dir: str = "result"
    data_root: str = "data"
    label_drop: float = 0.1  # share of labels replaced by "no label" (index 10) for guidance
    resume: bool = False
    warmup_steps: int = 0  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # constant | cosine (decays to lr_min_ratio·lr at the last step)
    lr_min_ratio: float = 0.05
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # 0 turns EMA off
    ema_warmup: int = 100  # EMA decay ramps as min(decay, (1 + k) / (ema_warmup + k))
    time_sampling: str = "uniform"  # uniform | logit-normal (uniform measured better: README, "CPU recipe")
    amp: str = "auto"  # auto | none | bf16 (auto: bf16 where the device runs it fast)
    compile: bool = False  # torch.compile the train step
    cuda_graphs: bool = False  # capture the compiled train step as a CUDA graph (CUDA only)
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only)
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    subset: int = 0  # train on the first N training images (0: all 60000)
    sample_steps: int = 10  # Euler steps for the epoch-end sample grid
    log_every: int = 25  # steps between reads of the loss (the only host synchronisation)


# name -> (model overrides, training overrides)
PRESETS: dict[str, tuple[dict, dict]] = {
    # The original recipe: the Rust project's widths and its config.
    "original": (
        dict(channels=(64, 128, 256)),
        dict(num_epochs=10, batch_size=32, lr=1e-4),
    ),
    # Sized for a 2-core laptop CPU: under 5 minutes, legible digits. Measured on 2 EPYC cores (README, "CPU
    # recipe"; 10 Euler steps, 2000 digits): batch 64 with logit-normal t 93.9-94.3%, with uniform t 95.2-95.4%;
    # batch 48 with uniform t 95.6-96.2% at the same images per second.
    "cpu": (
        dict(channels=(16, 32, 64), emb_dim=64),
        dict(
            num_epochs=2,
            batch_size=48,
            lr=2e-3,
            warmup_steps=100,
            lr_schedule="cosine",
            time_sampling="uniform",
        ),
    ),
    # For tests: seconds, not minutes.
    "tiny": (
        dict(channels=(8, 16, 16), emb_dim=32, groups=4),
        dict(num_epochs=1, batch_size=16, lr=1e-3, ema_warmup=10, log_every=5),
    ),
}

HELP = {
    "num_epochs": "passes over the training set",
    "batch_size": "images per optimizer step (the global batch under torchrun)",
    "num_workers": "kept from the original config; the on-device loader needs no worker processes",
    "seed": "seed for weights, data order, noise and sample grids",
    "lr": "peak AdamW learning rate",
    "device": "where to train: auto picks CUDA when available",
    "preset": "named settings: original (the Rust project's), cpu (a 2-core laptop), tiny (tests); auto: original on CUDA, cpu elsewhere",
    "model_dir": "checkpoint folder",
    "result_dir": "sample grids, loss.csv and loss.png",
    "data_root": "MNIST in torchvision's layout (<root>/MNIST/raw), fetched or rebuilt when missing",
    "label_drop": "share of labels replaced by 'no label' (index 10) for classifier-free guidance",
    "resume": "continue from the checkpoint in --model-dir",
    "warmup_steps": "linear learning-rate warm-up steps",
    "lr_schedule": "after warm-up: constant, or cosine down to lr x lr-min-ratio at the last step",
    "lr_min_ratio": "final learning rate as a share of --lr (cosine)",
    "weight_decay": "AdamW weight decay",
    "ema_decay": "EMA of the weights, used for sampling (0: off)",
    "ema_warmup": "EMA decay ramps as min(decay, (1 + k) / (ema_warmup + k)) over update k",
    "time_sampling": "distribution of t during training",
    "amp": "network precision: auto = bf16 where the device runs it fast, none = fp32",
    "compile": "torch.compile the train step",
    "cuda_graphs": "capture the compiled train step as a CUDA graph (CUDA only)",
    "checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "max_steps": "stop after N optimizer steps (0: all epochs)",
    "subset": "train on the first N images (0: all 60000)",
    "sample_steps": "Euler steps for the epoch-end sample grids",
    "log_every": "steps between loss reads (the only host synchronisation)",
    "channels": "U-Net widths at 28, 14 and 7 pixels",
    "blocks_per_level": "residual blocks per level on the way down (one more on the way up)",
    "emb_dim": "time and label embedding width",
    "groups": "GroupNorm groups",
}

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "preset": ("auto", *PRESETS),
    "lr_schedule": ("constant", "cosine"),
    "time_sampling": ("uniform", "logit-normal"),
    "amp": ("auto", "none", "bf16"),
}


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> ``(32, 64, 128)``."""
    try:
        out = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (``num_epochs`` -> ``--num-epochs``); defaults stay None so that
    only the flags actually given override the preset."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict = dict(default=None, dest=f.name)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw["type"] = parse_int_list
            kw["metavar"] = "N,N,..."
            default = ",".join(map(str, default))
        else:
            kw["type"] = tp
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        what = HELP.get(f.name, "")
        kw["help"] = f"{what} (default: {default}, unless the preset sets it)" if what else f"(default: {default})"
        parser.add_argument(_flag(f.name), **kw)


def resolve_preset(args: argparse.Namespace, device_type: str) -> tuple[ModelConfig, TrainConfig]:
    """Merge dataclass defaults, the preset and the flags that were given."""
    preset = args.preset or "auto"
    if preset == "auto":
        preset = "original" if device_type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model_over, train_over = PRESETS[preset]
    given = {k: v for k, v in vars(args).items() if v is not None}
    model_kw = {**model_over, **{f.name: given[f.name] for f in fields(ModelConfig) if f.name in given}}
    train_kw = {**train_over, **{f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}}
    train_kw["preset"] = preset
    try:
        mcfg = ModelConfig(**model_kw)
    except TypeError as e:  # pragma: no cover - argparse already typed the values
        raise UserError(str(e)) from None
    tcfg = TrainConfig(**train_kw)
    validate(mcfg, tcfg)
    return mcfg, tcfg


def validate(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse values that cannot work, each with one line naming the flag."""
    positive = {
        "num_epochs": tcfg.num_epochs,
        "batch_size": tcfg.batch_size,
        "sample_steps": tcfg.sample_steps,
        "log_every": tcfg.log_every,
        "emb_dim": mcfg.emb_dim,
        "blocks_per_level": mcfg.blocks_per_level,
        "groups": mcfg.groups,
    }
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"{_flag(name)} must be > 0, got {value}")
    nonneg = {
        "num_workers": tcfg.num_workers,
        "warmup_steps": tcfg.warmup_steps,
        "checkpoint_every": tcfg.checkpoint_every,
        "max_steps": tcfg.max_steps,
        "subset": tcfg.subset,
        "ema_warmup": tcfg.ema_warmup,
        "weight_decay": tcfg.weight_decay,
    }
    for name, value in nonneg.items():
        if not value >= 0:  # also refuses nan
            raise UserError(f"{_flag(name)} must be >= 0, got {value}")
    if not (tcfg.lr > 0 and math.isfinite(tcfg.lr)):
        raise UserError(f"--lr must be a finite number > 0, got {tcfg.lr}")
    if not 0.0 <= tcfg.lr_min_ratio <= 1.0:
        raise UserError(f"--lr-min-ratio must be in [0, 1], got {tcfg.lr_min_ratio}")
    if not math.isfinite(tcfg.weight_decay):
        raise UserError(f"--weight-decay must be finite, got {tcfg.weight_decay}")
    if not 0.0 <= tcfg.label_drop < 1.0:
        raise UserError(f"--label-drop must be in [0, 1), got {tcfg.label_drop}")
    if not 0.0 <= tcfg.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {tcfg.ema_decay}")
    if any(c <= 0 for c in mcfg.channels):
        raise UserError(f"--channels must be positive, got {mcfg.channels}")
    if len(mcfg.channels) > 3:  # 28 -> 14 -> 7 pixels; a 4th level (7 -> 4 -> 8) cannot be joined back
        raise UserError(f"--channels takes 1 to 3 levels (28, 14, 7 pixels), got {len(mcfg.channels)}")
    if mcfg.num_classes != 10:
        raise UserError(f"--num-classes must be 10 (the MNIST digits), got {mcfg.num_classes}")
    if mcfg.in_channels != 1:
        raise UserError(f"--in-channels must be 1 (MNIST is grayscale), got {mcfg.in_channels}")


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of ``dataclasses.asdict`` for a checkpoint's config.json; unknown keys are an error."""
    names = {f.name for f in fields(ModelConfig)}
    extra = set(d) - names
    if extra:
        raise UserError(f"config.json has unknown model fields {sorted(extra)}")
    d = dict(d)
    if "channels" in d:
        d["channels"] = tuple(d["channels"])
    return ModelConfig(**d)
