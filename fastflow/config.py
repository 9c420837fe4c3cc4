"""The model and training settings as dataclasses, and the named presets.

Each setting is defined once, on its field (:func:`fastflow.settings.setting`): its type and default, its help
text, its choices, the rule its value must obey and whether a ``--resume`` may change it without changing the run.
The parser (:func:`fastflow.settings.add_settings`), the checks (:func:`validate`) and the resume check
(:func:`resume_free`) all read it from there, so adding a training setting is one new field in
:class:`TrainConfig` (plus its use).

Precedence, lowest first: the dataclass defaults, the preset, the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields

from .errors import UserError
from .settings import (
    FINITE,
    FINITE_NONNEG,
    FINITE_POSITIVE,
    NONNEG,
    POSITIVE,
    UNIT_CLOSED,
    UNIT_HALF_OPEN,
    flag_name,
    setting,
)

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "OBJECTIVES",
    "takes_later_time",
    "PRESETS",
    "resolve_preset",
    "resolve_configs",
    "resume_free",
    "changed_settings",
    "validate",
    "model_config_from_dict",
]

# --objective: flow matching, MeanFlow, MeanFlow distillation (fastflow.objectives); all but flow train a U-Net that
# takes the later time s (ModelConfig.mean_flow).
OBJECTIVES = ("flow", "meanflow", "meanflow-distill")


def takes_later_time(objective: str) -> bool:
    """Whether ``objective`` trains a U-Net with MeanFlow's second time input (``ModelConfig.mean_flow``)."""
    return objective != "flow"


# name -> (model overrides, training overrides)
PRESETS: dict[str, tuple[dict, dict]] = {
    # The original recipe: the Rust project's widths and its config.
    "original": (
        dict(channels=(64, 128, 256)),
        dict(num_epochs=10, batch_size=32, lr=1e-4),
    ),
    # Sized for a 2-core laptop CPU: 300 s of training on any of them (README, "CPU recipe"). The space-to-depth
    # stem (patch 2: the U-Net runs at 14 and 7 pixels) trains 1.6-2.4x the images per second of a U-Net at 28
    # pixels. Widths 24/48 with logit-normal t, against 32/64 with uniform t, 300 s each held to AVX2, seeds
    # 42/1/2/3: 95.4/94.3/94.7/95.0% against 95.5/92.0/93.2/94.3%, FID 15-17 against 21-29 (1.3-1.7x the steps).
    "cpu": (
        dict(channels=(24, 48), emb_dim=64, patch=2),
        dict(
            time_budget=300.0,  # ends on time on any CPU; --num-epochs N (or --time-budget 0: 2 epochs) instead
            num_epochs=2,
            batch_size=48,
            lr=2e-3,
            warmup_steps=100,
            lr_schedule="cosine",
            time_sampling="logit-normal",
            procs=0,  # two single-thread processes on 2 cores: 1.05-1.37x one two-thread process (README)
        ),
    ),
    # For tests: seconds, not minutes.
    "tiny": (
        dict(channels=(8, 16, 16), emb_dim=32, groups=4),
        dict(num_epochs=1, batch_size=16, lr=1e-3, ema_warmup=10, log_every=5),
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's shape. Everything a checkpoint needs to rebuild the network."""

    channels: tuple[int, ...] = setting((64, 128, 256), "U-Net widths at 28, 14 and 7 pixels")
    blocks_per_level: int = setting(
        1, "residual blocks per level on the way down (one more on the way up)", check=POSITIVE
    )
    emb_dim: int = setting(256, "time and label embedding width", check=POSITIVE)
    num_classes: int = setting(10, "digits; index num_classes is 'no label' (classifier-free guidance)")
    groups: int = setting(8, "GroupNorm groups (capped by the channel count)", check=POSITIVE)
    in_channels: int = setting(1, "image channels (MNIST: 1)")
    patch: int = setting(
        1, "space-to-depth stem: the U-Net runs on (28/patch)² pixels of patch² values each (1: off)", check=POSITIVE
    )
    mean_flow: bool = setting(
        False,
        "MeanFlow's second time input: the gap s − t through the sinusoidal features and its own MLP (last layer "
        "zero-initialised), added to the embedding; set by --objective meanflow",
    )


@dataclass
class TrainConfig:
    """Training settings. The first five fields are the original Rust/Burn project's config."""

    num_epochs: int = setting(10, "passes over the training set", check=POSITIVE)
    batch_size: int = setting(32, "images per optimizer step (the global batch under torchrun)", check=POSITIVE)
    num_workers: int = setting(
        1, "kept from the original config; the on-device loader needs no worker processes", check=NONNEG,
        resume_free=True,
    )  # fmt: skip
    seed: int = setting(42, "seed for weights, data order, noise and sample grids")
    lr: float = setting(1e-4, "peak AdamW learning rate", check=FINITE_POSITIVE)
    device: str = setting(
        "auto", "where to train: auto picks CUDA when available", choices=("auto", "cpu", "cuda"), resume_free=True
    )
    preset: str = setting(
        "auto",
        "named settings: original (the Rust project's), cpu (a 2-core laptop), tiny (tests); "
        "auto: original on CUDA, cpu elsewhere",
        choices=("auto", *PRESETS),
    )
    model_dir: str = setting("model", "checkpoint folder", resume_free=True)
    result_dir: str = setting("result", "sample grids, loss.csv and loss.png", resume_free=True)
    data_root: str = setting(
        "data", "MNIST in torchvision's layout (<root>/MNIST/raw), fetched or rebuilt when missing", resume_free=True
    )
    label_drop: float = setting(
        0.1, "share of labels replaced by 'no label' (index 10) for classifier-free guidance", check=UNIT_HALF_OPEN
    )
    objective: str = setting(
        "flow",
        "flow: flow matching, the field v(x, t); meanflow: MeanFlow (Geng et al. 2025), the average velocity "
        "u(x, t, s) over [t, s], sampled in a few jumps with --solver meanflow (its U-Net takes the gap s − t too); "
        "meanflow-distill: the same u learnt from the --init-from flow model's own trajectories (docs/meanflow.md)",
        choices=OBJECTIVES,
    )
    mf_equal_share: float = setting(
        0.75,
        "meanflow: share of pairs with s = t (plain flow matching on u(x, t, t)); the MeanFlow paper's best was "
        "0.75 (its Table 1a; 0.5 was close, 1 fails at one step)",
        check=UNIT_CLOSED,
    )
    mf_time_mean: float = setting(
        0.4,
        "meanflow: t and s are two draws of sigmoid(N(mean, std²)), sorted (t ≤ s); 0.4 is the paper's -0.4 "
        "in this project's time direction (t = 1 is data)",
        check=FINITE,
    )
    mf_time_std: float = setting(1.0, "meanflow: the std of that normal (the paper's 1.0)", check=FINITE_POSITIVE)
    mf_adaptive_p: float = setting(
        1.0,
        "meanflow and meanflow-distill: adaptive loss weight 1/(|Δ|² + 1e-3)^p per image, |Δ|² its mean squared "
        "error, detached; 0 = plain MSE (the paper's best: p = 1)",
        check=FINITE_NONNEG,
    )
    mf_guidance: float = setting(
        1.0,
        "meanflow: guidance w inside training (the paper's guided target ṽ = w·(z − ε) + (1 − w)·u(x_t, t, t | no "
        "label) for images that kept their label); sample such a model at --guidance 1 (1: off)",
        check=FINITE,
    )
    distill_steps: int = setting(
        4,
        "meanflow-distill: midpoint steps of each teacher trajectory; the states at any two of its times t < s give "
        "u = (x_s − x_t)/(s − t) exactly, the target (no JVP, no label dropped)",
        check=POSITIVE,
    )
    distill_trajectories: int = setting(
        16384,
        "meanflow-distill: trajectories to make at the start of the run (inside --time-budget; made again by "
        "--resume), all processes together, rounded up to 256s",
        check=POSITIVE,
    )
    distill_long_share: float = setting(
        0.7, "meanflow-distill: share of pairs that are the whole path (t, s) = (0, 1), the one jump", check=UNIT_CLOSED
    )
    teacher_guidance: float = setting(
        1.75,
        "meanflow-distill: the teacher's guidance w, in [0.2, 0.7] (1.75 measured best of 1.25-2: docs/meanflow.md)",
        check=FINITE,
    )
    init_from: str = setting(
        "",
        "meanflow: start a new run (new optimizer, step 0) from the checkpoint in this folder: its model config "
        "plus the gap input, its EMA weights (its raw weights if it has none), the gap MLP at zero so step 0 is "
        "that model's field; meanflow-distill: the same, and that model is the teacher",
    )
    resume: bool = setting(False, "continue from the checkpoint in --model-dir", resume_free=True)
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps", check=NONNEG)
    lr_schedule: str = setting(
        "constant",
        "after warm-up: constant, or cosine down to lr x lr-min-ratio at the last step",
        choices=("constant", "cosine"),
    )
    lr_min_ratio: float = setting(0.05, "final learning rate as a share of --lr (cosine)", check=UNIT_CLOSED)
    weight_decay: float = setting(0.0, "AdamW weight decay", check=FINITE_NONNEG)
    ema_decay: float = setting(0.999, "EMA of the weights, used for sampling (0: off)", check=UNIT_HALF_OPEN)
    ema_warmup: int = setting(
        100, "EMA decay ramps as min(decay, (1 + k) / (ema_warmup + k)) over update k", check=NONNEG
    )
    time_sampling: str = setting(
        "uniform",
        "distribution of t during training (the cpu preset's: logit-normal, measured better: docs/cpu_recipe.md)",
        choices=("uniform", "logit-normal"),
    )
    amp: str = setting(
        "auto", "network precision: auto = bf16 where the device runs it fast, none = fp32",
        choices=("auto", "none", "bf16"),
    )  # fmt: skip
    compile: bool | None = setting(
        None, "torch.compile the train step (default: on with CUDA, off on a CPU)", resume_free=True
    )
    cuda_graphs: bool | None = setting(
        None, "replay the compiled train step as a CUDA graph (default: on with --compile on CUDA)", resume_free=True
    )
    tf32: bool = setting(
        True, "CUDA fp32 matmuls and convolutions in TF32 (fp32 runs only; bf16 autocast does not use it)",
        resume_free=True,
    )  # fmt: skip
    checkpoint_every: int = setting(
        0, "also checkpoint every N steps (0: at epoch ends only)", check=NONNEG, resume_free=True
    )
    max_steps: int = setting(0, "stop after N optimizer steps (0: all epochs)", check=NONNEG)
    time_budget: float = setting(
        0.0,
        "train for about this many seconds instead of --num-epochs: the step count (and so the lr schedule) is "
        "planned from the step rate of the first steps and planned again at every log step, so training ends on "
        "time; saved, so --resume keeps it (0: off)",
        check=FINITE_NONNEG,
    )
    subset: int = setting(0, "train on the first N images (0: all 60000)", check=NONNEG)
    sample_steps: int = setting(
        10, "steps for the epoch-end sample grids (Euler; meanflow jumps under --objective meanflow)", check=POSITIVE,
        resume_free=True,
    )  # fmt: skip
    log_every: int = setting(
        25, "steps between loss reads (the only host synchronisation)", check=POSITIVE, resume_free=True
    )
    procs: int = setting(
        1,
        "CPU: train in N processes, each with 1/N of the threads, as under torchrun (this command starts them); "
        "0: auto, 2 where 2 or more threads are available (measured faster than one process on 2 cores)",
        check=NONNEG, resume_free=True,
    )  # fmt: skip


def resolve_configs(
    preset: str, device_type: str, model: dict | None = None, train: dict | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """Dataclass defaults < the preset < ``model`` / ``train`` overrides; ``preset`` ``auto`` picks ``original``
    on CUDA and ``cpu`` elsewhere. ``--num-epochs`` given without ``--time-budget`` drops the preset's time
    budget (the epochs asked for are trained). The result is validated, and ``TrainConfig.preset`` names the preset used."""
    preset = preset or "auto"
    if preset == "auto":
        preset = "original" if device_type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model_over, train_over = PRESETS[preset]
    if train and "num_epochs" in train and "time_budget" not in train:
        train_over = {k: v for k, v in train_over.items() if k != "time_budget"}  # epochs asked for: they rule
    tcfg = TrainConfig(**{**train_over, **(train or {}), "preset": preset})
    # The objective decides the U-Net's inputs (ModelConfig.mean_flow): one setting, not two to keep in step.
    mcfg = ModelConfig(**{**model_over, "mean_flow": takes_later_time(tcfg.objective), **(model or {})})
    validate(mcfg, tcfg)
    return mcfg, tcfg


def resolve_preset(args: argparse.Namespace, device_type: str) -> tuple[ModelConfig, TrainConfig]:
    """:func:`resolve_configs` from parsed flags (those not given are None and leave the preset's value)."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    model = {f.name: given[f.name] for f in fields(ModelConfig) if f.name in given}
    train = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given and f.name != "preset"}
    return resolve_configs(args.preset, device_type, model, train)


def resume_free() -> frozenset[str]:
    """The training settings a ``--resume`` may change without changing the run."""
    return frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("resume_free"))


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"name old -> new"`` for each setting of ``cfg`` that differs from a checkpoint's saved training config and
    changes the run (not :func:`resume_free`); settings the checkpoint does not record are not compared."""
    new, free = dataclasses.asdict(cfg), resume_free()
    return [f"{k} {saved[k]!r} -> {new[k]!r}" for k in new if k not in free and k in saved and saved[k] != new[k]]


def validate(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse values that cannot work, each with one line naming the flag (the rules live on the fields)."""
    for cfg in (tcfg, mcfg):
        for f in fields(cfg):
            check, value = f.metadata.get("check"), getattr(cfg, f.name)
            if check is not None and not check[0](value):
                raise UserError(f"{flag_name(f.name)} must be {check[1]}, got {value}")
    if not mcfg.channels or any(c <= 0 for c in mcfg.channels):
        raise UserError(f"--channels must be positive, got {mcfg.channels}")
    if 28 % mcfg.patch:
        raise UserError(f"--patch must divide 28 (1, 2, 4, 7, 14, 28), got {mcfg.patch}")
    side = 28 // mcfg.patch
    levels = [side // 2**i for i in range(len(mcfg.channels))]
    if any(s * 2 != p for p, s in zip(levels, levels[1:])):  # 7 -> 4 -> 8 cannot be joined back to 7
        raise UserError(
            f"--channels: {len(mcfg.channels)} levels do not fit {side}x{side} pixels (--patch {mcfg.patch}); "
            f"each level but the last must have an even side"
        )
    if mcfg.num_classes != 10:
        raise UserError(f"--num-classes must be 10 (the MNIST digits), got {mcfg.num_classes}")
    if mcfg.in_channels != 1:
        raise UserError(f"--in-channels must be 1 (MNIST is grayscale), got {mcfg.in_channels}")
    gap = takes_later_time(tcfg.objective)
    if mcfg.mean_flow != gap:
        raise UserError(
            f"--objective {tcfg.objective} needs a U-Net {'with' if gap else 'without'} the mean-flow gap input "
            f"(mean_flow={gap}), got mean_flow={mcfg.mean_flow}"
        )
    if tcfg.init_from and not gap:
        raise UserError(
            "--init-from starts a MeanFlow run from a checkpoint: it needs --objective meanflow or meanflow-distill"
        )
    if tcfg.objective == "meanflow-distill" and not tcfg.init_from:
        raise UserError("--objective meanflow-distill learns from a teacher's trajectories: give --init-from")


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
