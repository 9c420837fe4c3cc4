"""``python -m fastflow.train``: conditional flow matching on MNIST.

With no flags it picks a preset for the device: ``original`` on CUDA (the Rust project's 10 epochs, batch 32,
lr 1e-4, widths 64/128/256; compiled, bf16, replayed as a CUDA graph) and ``cpu`` on a CPU (a smaller U-Net and
a short schedule sized for a 2-core laptop). Checkpoints go to ``--model-dir`` (./model), sample grids, the loss
history and its plot to ``--result-dir`` (./result). This module is the command line only: the loop is
:class:`fastflow.trainer.Trainer`, what it learns :mod:`fastflow.objectives`, the step :class:`fastflow.step.TrainStep`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys

from .checkpoint import has_checkpoint, init_checkpoint, own_folder
from .config import ModelConfig, TrainConfig, resolve_preset, validate
from .device import resolve_device
from .distributed import Dist, check_same, init_distributed, record_errors, shutdown
from .errors import ArgumentParser, PeerLost, UserError, cli
from .io import check_writable
from .launch import LAUNCHED, plan, run
from .objectives import make_objective
from .settings import add_settings
from .trainer import Trainer

__all__ = ["build_parser", "main", "resume_command"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastflow.train",
        description="Train a conditional flow-matching (or MeanFlow: --objective meanflow) U-Net on MNIST.",
    )
    add_settings(p.add_argument_group("training"), TrainConfig, preset=True)
    add_settings(
        p.add_argument_group("model (override the preset)"),
        ModelConfig,
        preset=True,
        skip=("num_classes", "in_channels", "mean_flow"),  # mean_flow follows --objective
    )
    return p


def resume_command(argv: list[str], dist: Dist = Dist()) -> str:
    """The command line that continues this run: the same flags plus ``--resume``."""
    args = [a for a in argv if a not in ("--resume", "--no-resume")] + ["--resume"]
    torchrun = dist.enabled and not os.environ.get(LAUNCHED)  # --procs children: python starts them again
    launcher = f"torchrun --nproc_per_node={dist.world_size}" if torchrun else "python"
    return f"{launcher} -m fastflow.train {shlex.join(args)}"


def _install_signal_handlers(trainer) -> None:
    """SIGINT/SIGTERM set ``trainer.stop_requested``: the loop finishes its step, saves and exits 0. A second
    signal stops at once (KeyboardInterrupt, exit 130; the checkpoint on disk is the last complete one)."""

    def handler(signum, frame):
        if trainer.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print(
            f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint (again to stop at once)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _probe_env(amp: str) -> dict[str, str]:
    """--amp auto on a CPU with bf16 instructions: measure here once, so that every child decides alike."""
    from .device import PROBE_ENV, _cpu_has_bf16, cpu_bf16_probe

    if amp != "auto" or not _cpu_has_bf16():
        return {}
    return {PROBE_ENV: ",".join(f"{v!r}" for v in cpu_bf16_probe())}


@record_errors  # outermost: an uncaught error on a rank becomes torchrun's root cause; UserError stays one line
@cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device or "auto")
    mcfg, cfg = resolve_preset(args, device.type)
    check_writable(cfg.model_dir, "--model-dir", kind="dir")
    check_writable(cfg.result_dir, "--result-dir", kind="dir")
    init = init_checkpoint(cfg.init_from)  # its model config replaces the preset's
    if init is not None:
        mcfg = init[1]
        validate(mcfg, cfg)
        flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ModelConfig)}
        other = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None and v != getattr(mcfg, k)]
        if other:
            raise UserError(
                f"--init-from {cfg.init_from}: its model config is the run's; {', '.join(other)} would change it"
            )
    launch = plan(cfg.procs, device.type, cfg.batch_size)
    if launch is not None:  # CPU: N processes as under torchrun, started here; each runs this same command
        return run(launch, argv, _probe_env(cfg.amp))
    dist = init_distributed(device)  # torchrun's process group, or one process
    device = dist.local_device(device)  # cuda:LOCAL_RANK under torchrun
    early = argparse.Namespace(stop_requested=False)  # a signal during start-up: stop after the first step
    _install_signal_handlers(early)
    try:
        # Rank 0 owns the checkpoint folder for the whole run: a second run on it is refused, not interleaved.
        with own_folder(cfg.model_dir) if dist.is_main else contextlib.nullcontext():
            teacher = init[0] if init is not None else None  # what meanflow-distill learns from
            trainer = Trainer(mcfg, cfg, device, dist, objective=make_objective(cfg, dist, teacher=teacher))
            trainer.resume_command = resume_command(argv, dist)
            resumed = False
            if cfg.resume:
                resumed = trainer.resume()
                check_same(
                    trainer.step,
                    dist,
                    f"--resume: the step of the checkpoint in {cfg.model_dir}",
                    "every rank must see the same --model-dir (put it on a shared file system)",
                )
            elif has_checkpoint(cfg.model_dir) and dist.is_main:
                print(
                    f"note: {cfg.model_dir} holds a checkpoint; this run replaces it (pass --resume to continue it instead)"
                )
            if init is not None and not resumed:
                which = trainer.init_from(init[0])
                if dist.is_main:
                    print(f"--init-from: starting at step 0 from the {which}; new optimizer")
            _install_signal_handlers(trainer)
            trainer.stop_requested = trainer.stop_requested or early.stop_requested
            return trainer.fit()
    except RuntimeError as e:  # gloo's "Connection closed by peer": a consequence, not the cause; one line
        if dist.enabled and ("closed by peer" in str(e) or "reset by peer" in str(e)):
            raise PeerLost(f"rank {dist.rank}: another process of this run ended, so this one stops") from None
        raise
    finally:
        shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
