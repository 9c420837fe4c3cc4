"""``python -m fastflow.train``: conditional flow matching on MNIST.

With no flags it picks a preset for the device: ``original`` on CUDA (the Rust project's 10 epochs, batch 32,
lr 1e-4, widths 64/128/256) and ``cpu`` on a CPU (a smaller U-Net and a short schedule sized for a 2-core
laptop). Checkpoints go to ``--model-dir`` (./model), sample grids, the loss history and its plot to
``--result-dir`` (./result).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import path as fm
from .checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from .compile import make_optimizer, train_step_for
from .config import ModelConfig, TrainConfig, add_dataclass_args, resolve_preset
from .data import DeviceLoader, load_mnist
from .device import autocast, resolve_amp, resolve_device
from .distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    check_same,
    init_distributed,
    local_main_first,
    record_errors,
    shutdown,
    wrap_ddp,
)
from .ema import EMA
from .errors import ArgumentParser, TrainingDiverged, UserError, cli
from .io import atomic_save, atomic_write_text, check_writable, fault
from .solvers import sample
from .unet import UNet, count_parameters

__all__ = ["Trainer", "build_parser", "main", "lr_at", "save_grid"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastflow.train",
        description="Train a conditional flow-matching U-Net on MNIST.",
    )
    add_dataclass_args(p.add_argument_group("training"), TrainConfig)
    add_dataclass_args(
        p.add_argument_group("model (override the preset)"), ModelConfig, skip=("num_classes", "in_channels")
    )
    return p


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine down to ``lr_min_ratio·lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.lr_min_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))


def grid_labels(device, per_digit: int = 10) -> torch.Tensor:
    return torch.arange(10, device=device).repeat_interleave(per_digit)  # row k = digit k


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10) -> Path:
    """Write images [N, 1, 28, 28] in [0, 1] as a PNG grid, atomically."""
    from torchvision.utils import save_image

    return atomic_save(path, lambda tmp: save_image(images.float().cpu(), tmp, nrow=nrow, padding=2, format="png"))


def write_loss_history(rows: list[list[float]], result_dir: Path) -> None:
    """``loss.csv`` (step, epoch, loss, lr, images/s) and ``loss.png``."""
    lines = ["step,epoch,loss,lr,images_per_s"] + [
        f"{int(s)},{int(e)},{loss:.6f},{lr:.3e},{ips:.1f}" for s, e, loss, lr, ips in rows
    ]
    atomic_write_text(result_dir / "loss.csv", "\n".join(lines) + "\n")
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r[0] for r in rows], [r[2] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(result_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


class Trainer:
    """Owns the model, optimizer, EMA, data and RNG; runs the loop; saves and resumes."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, dist: Dist = Dist()):
        self.mcfg, self.cfg, self.device, self.dist = mcfg, cfg, device, dist
        self.model_dir, self.result_dir = Path(cfg.model_dir), Path(cfg.result_dir)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.ctx = autocast(device, self.amp_dtype)

        with local_main_first(dist):  # one offline rebuild / download per machine, not one per rank
            data = load_mnist(cfg.data_root, train=True, verbose=dist.is_main)
        images, labels = data.images, data.labels
        if cfg.subset:
            images, labels = images[: cfg.subset], labels[: cfg.subset]
        self.loader = DeviceLoader(
            images, labels, cfg.batch_size, cfg.seed, device, drop_last=True, rank=dist.rank, world_size=dist.world_size
        )
        steps_per_epoch = len(self.loader)
        self.total_steps = cfg.num_epochs * steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        torch.manual_seed(cfg.seed)
        self.model = UNet(mcfg).to(device)
        # The step runs train_model (DDP under torchrun); optimizer, EMA and checkpoints use the unwrapped model.
        self.train_model = wrap_ddp(self.model, dist, device)
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay, device, compiled=cfg.compile)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # --compile: loss, backward, AdamW and EMA as one compiled graph (fastflow.compile); None: the eager step.
        self.compiled_step = train_step_for(cfg, self.train_model, self.opt, self.ema, self.ctx, device)
        # All training randomness (t, ε, dropped labels) comes from this one generator: its state is saved.
        # Same seed on every rank: each draws the whole global batch's noise and keeps its rows (train_step).
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[list[float]] = []
        self.stop_requested = False
        self.stop_agreed = False  # under DDP: a stop every rank has seen (see fit)
        self.window: list[torch.Tensor] = []  # losses [0-d, on device] since the last log line; saved with the state
        self.resume_command = "python -m fastflow.train --resume (with the same flags)"  # main() makes it concrete
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, batch_in_epoch) of the last save
        self._last_good: int | None = None  # step of the last checkpoint this run wrote or resumed from
        self._bar = None

    # -- state -----------------------------------------------------------------------------------------
    # Everything the next step depends on. Adding randomness to the step (e.g. an in-kernel noise seed and
    # offset)? Save it here and restore it in resume(): tests/fastflow/test_resume.py checks the weights of a
    # killed-and-resumed run against an uninterrupted one, bit for bit.
    def state(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,  # position in epoch ``epoch``'s permutation (seeded by epoch)
            "generator": self.gen.get_state(),  # t, ε and the dropped labels
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "ema_updates": self.ema.updates if self.ema else 0,  # the EMA decay schedule's position
            "history": self.history,
            "loss_window": torch.stack(self.window).float().cpu() if self.window else torch.zeros(0),
        }

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss not yet logged or a weight is non-finite (one host sync).

        Runs before anything is written (checkpoint, sample grid), so a diverged run never replaces the last
        good checkpoint. Under DDP the weights are the same on every rank, so every rank decides the same.
        """
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        losses = torch.stack(self.window).float() if self.window else weights_ok.new_zeros(0, dtype=torch.float32)
        bad = (~torch.isfinite(losses)).nonzero().cpu()
        if len(bad):
            self._diverged(self.step - len(self.window) + int(bad[0]) + 1)
        if not bool(weights_ok):
            self._diverged(self.step, "non-finite weights after")

    def _diverged(self, step: int, what: str = "non-finite loss at") -> None:
        if self._bar is not None:
            self._bar.close()  # the message goes on its own line, not after the progress bar
        if self._last_good is not None:
            kept = f"last good checkpoint: {self.model_dir} (step {self._last_good}), left as it was"
        elif (self.model_dir / "manifest.json").exists():
            kept = f"this run wrote no checkpoint; {self.model_dir} is left as it was"
        else:
            kept = "no checkpoint was written"
        raise TrainingDiverged(f"{what} step {step}; training stopped; {kept}")

    def save(self) -> None:
        """Write a checkpoint of the current state (rank 0), unless this exact state was saved already."""
        at = (self.step, self.epoch, self.batch_in_epoch)
        if self._saved_at == at:
            return
        self.check_finite()  # every rank: nothing non-finite is ever saved
        if self.dist.is_main:
            save_checkpoint(
                self.model_dir,
                self.model,
                self.mcfg,
                self.cfg,
                self.ema.shadow if self.ema else None,
                self.state(),
                self.step,
            )
        self._saved_at, self._last_good = at, self.step

    # Settings that do not change the trajectory: a resume may change them without a note.
    _FREE = {
        "resume",
        "model_dir",
        "result_dir",
        "data_root",
        "device",
        "num_workers",
        "compile",
        "cuda_graphs",
        "checkpoint_every",
        "log_every",
        "sample_steps",
    }

    def resume(self) -> bool:
        """Load ``model_dir`` if it holds a checkpoint; refuse one trained with another model config."""
        d = self.model_dir
        if not (d / "manifest.json").exists() and not (d / "previous").exists():
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {d}; starting from scratch")
            return False
        ck = load_checkpoint(d)
        if ck.model_cfg != self.mcfg:
            diff = ", ".join(
                f"{f.name} {_show(getattr(ck.model_cfg, f.name))} (flags: {_show(getattr(self.mcfg, f.name))})"
                for f in dataclasses.fields(ModelConfig)
                if getattr(ck.model_cfg, f.name) != getattr(self.mcfg, f.name)
            )
            raise UserError(f"--resume: {ck.path} holds another model: {diff}; pass the same --preset and model flags")
        st, spath = ck.state, ck.path / "state.pt"
        if st is None:
            raise UserError(f"--resume: {ck.path} has no training state (state.pt); it can be sampled, not resumed")
        need = ("optimizer", "step", "epoch", "batch_in_epoch", "generator", "torch_rng", "ema_updates", "history")
        missing = [k for k in need if k not in st]
        if missing:
            raise UserError(f"--resume: {spath}: not a fastflow training state (no {', '.join(missing)})")
        if self.ema is not None and ck.ema_weights is None:
            raise UserError(f"--resume: {ck.path} has no EMA weights but --ema-decay is {self.cfg.ema_decay}")
        load_weights_into(self.model, ck.weights, ck.path)
        if self.ema is not None:
            load_weights_into(self.ema.shadow, ck.ema_weights, ck.path, "EMA weights")
        try:
            self.opt.load_state_dict(st["optimizer"])
            self.gen.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
            if self.device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], self.device)
            if self.ema is not None:
                self.ema.updates = int(st["ema_updates"])
            self.step, self.epoch, self.batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
            self.history = [[float(v) for v in r] for r in st["history"]]
            self.window = [v.to(self.device) for v in torch.as_tensor(st.get("loss_window", [])).float().unbind()]
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise UserError(f"--resume: {spath}: does not fit this run ({' '.join(str(e).split())[:160]})") from None
        if self.step != ck.step:
            raise UserError(f"--resume: {spath} is at step {self.step} but its manifest says {ck.step}")
        self._saved_at, self._last_good = (self.step, self.epoch, self.batch_in_epoch), self.step
        if self.dist.is_main:
            print(f"resumed from {ck.path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")
            old = (ck.config.get("train") or {}) if isinstance(ck.config, dict) else {}
            new = dataclasses.asdict(self.cfg)
            changed = [
                f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k not in self._FREE and k in old and old[k] != new[k]
            ]
            if changed:
                print(
                    f"note: resuming with changed settings ({', '.join(changed)}); the run will differ from one left alone"
                )
        return True

    # -- one step --------------------------------------------------------------------------------------
    def train_step(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the batch (z [B, 1, 28, 28] in [-1, 1], y [B]); returns the loss (0-d, on device)."""
        b = z.shape[0]
        # Under DDP every rank draws t, ε and the label mask for the whole global batch (n rows, same generator
        # state on all ranks) and keeps its own rows [lo, lo + b): N ranks then train as one process at the same
        # global batch, up to fp32 summation order. One process: n = b, lo = 0, the draws are unchanged.
        n, lo = b * self.dist.world_size, b * self.dist.rank
        t = fm.sample_time(n, self.cfg.time_sampling, self.gen, self.device)[lo : lo + b]  # [B]
        eps = torch.randn((n, *z.shape[1:]), generator=self.gen, device=self.device)[lo : lo + b]  # [B, 1, 28, 28]
        y = fm.drop_labels(y.repeat(self.dist.world_size), self.cfg.label_drop, self.gen)[lo : lo + b]  # mask of n
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg, self.total_steps)
        if self.compiled_step is not None:  # same draws as below; the lr goes in as a tensor (no recompiles)
            return self.compiled_step(z, y, t, eps, self.opt.param_groups[0]["lr"])
        loss = fm.flow_matching_loss(self.train_model, z, y, t, eps, self.ctx)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    # -- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        net = self.ema.shadow if self.ema is not None else self.model
        net.eval()
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        images, _ = sample(net, grid_labels(self.device), self.cfg.sample_steps, generator=g, ctx=self.ctx)
        self.model.train()
        return save_grid(images, self.result_dir / name)

    # -- the loop --------------------------------------------------------------------------------------
    def _reduce_window(self, losses: torch.Tensor) -> torch.Tensor:
        """Under DDP: the global-batch mean of each step's loss [W] over ranks, and whether any rank was asked
        to stop (``stop_agreed``), in one all-reduce per log window. One process: ``losses`` unchanged."""
        if not self.dist.enabled:
            return losses
        flag = losses.new_tensor([1.0 if self.stop_requested else 0.0])
        packed = all_reduce_sum(torch.cat([losses, flag]), self.dist).cpu()  # [W + 1]
        if packed[-1] > 0:
            self.stop_agreed = self.stop_requested = True
        return packed[:-1] / self.dist.world_size  # equal shards: the mean of rank means is the global mean

    def fit(self) -> int:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            print(
                f"fastflow: preset {cfg.preset}, device {self.device}, amp {self.amp_dtype or 'fp32'}, "
                f"{count_parameters(self.model):,} parameters, {self.total_steps} steps of batch {cfg.batch_size}"
            )
        if self.step >= self.total_steps:  # resumed a finished run: write nothing, touch nothing
            if main:
                print(f"nothing to do: {self.model_dir} is at step {self.step} of {self.total_steps}")
            return 0
        window = self.window  # restored by resume(): a log line covers the same steps as in an uninterrupted run
        t_window = time.perf_counter()
        bar = self._bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not main, dynamic_ncols=True, unit="step"
        )
        done = False
        while not done and self.epoch < cfg.num_epochs:
            for z, y in self.loader.epoch(self.epoch, self.batch_in_epoch):
                loss = self.train_step(z, y)
                window.append(loss)
                self.step += 1
                self.batch_in_epoch += 1
                fault("step", self.step)  # test hook: a kill between a step and its checkpoint
                bar.update(1)
                if len(window) >= cfg.log_every:
                    losses = self._reduce_window(torch.stack(window).float()).cpu()  # the one host synchronisation
                    bad = (~torch.isfinite(losses)).nonzero()
                    if len(bad):
                        self._diverged(self.step - len(window) + int(bad[0]) + 1)
                    dt = time.perf_counter() - t_window
                    ips = len(window) * cfg.batch_size / dt
                    mean = float(losses.mean())
                    self.history.append([self.step, self.epoch + 1, mean, self.opt.param_groups[0]["lr"], ips])
                    bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.0f}", epoch=self.epoch + 1)
                    window, t_window = [], time.perf_counter()
                    self.window = window
                # Every N steps; an epoch's last step and the run's last step are saved below, after their
                # sample grids, so a kill between grid and checkpoint redoes both on resume.
                last = self.batch_in_epoch >= len(self.loader) or self.step >= self.total_steps
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self.save()
                # Under DDP a stop (signal) counts once every rank knows of it, at a log step: ranks stopping
                # at different steps would leave one waiting in a collective for the others.
                stop = self.stop_agreed if self.dist.enabled else self.stop_requested
                if stop or self.step >= self.total_steps:
                    done = True
                    break
            if done and self.batch_in_epoch < len(self.loader):
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            self.check_finite()  # no grid and no checkpoint from non-finite weights
            if main:
                self.save_samples(f"epoch-{self.epoch:03d}.png")
                write_loss_history(self.history, self.result_dir)
            if not done:  # the last epoch's checkpoint is the final one, below
                self.save()
            barrier(self.dist)
        bar.close()
        self.check_finite()
        stopped = self.stop_requested and self.step < self.total_steps
        grid = None
        if main:
            write_loss_history(self.history, self.result_dir)
            if not stopped:  # a stop skips the grid: SIGTERM comes with a deadline
                grid = self.save_samples("samples.png")
        self.save()  # last: a kill before it resumes from the previous checkpoint and redoes the grid
        if main:
            if stopped:
                print(
                    f"stopped at step {self.step} of {self.total_steps}; checkpoint in {self.model_dir}; resume with: {self.resume_command}"
                )
            else:
                print(f"done: {self.step} steps; checkpoint in {self.model_dir}, samples in {grid}")
        barrier(self.dist)  # the other ranks wait for rank 0's last checkpoint and samples
        return 0


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def resume_command(argv: list[str], dist: Dist = Dist()) -> str:
    """The command line that continues this run: the same flags plus ``--resume``."""
    args = [a for a in argv if a not in ("--resume", "--no-resume")] + ["--resume"]
    launcher = f"torchrun --nproc_per_node={dist.world_size}" if dist.enabled else "python"
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


@record_errors  # outermost: an uncaught error on a rank becomes torchrun's root cause; UserError stays one line
@cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device or "auto")
    mcfg, cfg = resolve_preset(args, device.type)
    check_writable(cfg.model_dir, "--model-dir", kind="dir")
    check_writable(cfg.result_dir, "--result-dir", kind="dir")
    dist = init_distributed(device)  # torchrun's process group, or one process
    device = dist.local_device(device)  # cuda:LOCAL_RANK under torchrun
    early = argparse.Namespace(stop_requested=False)  # a signal during start-up: stop after the first step
    _install_signal_handlers(early)
    try:
        trainer = Trainer(mcfg, cfg, device, dist)
        trainer.resume_command = resume_command(argv, dist)
        if cfg.resume:
            trainer.resume()
            check_same(
                trainer.step,
                dist,
                f"--resume: the step of the checkpoint in {cfg.model_dir}",
                "every rank must see the same --model-dir (put it on a shared file system)",
            )
        elif (Path(cfg.model_dir) / "manifest.json").exists() and dist.is_main:
            print(
                f"note: {cfg.model_dir} holds a checkpoint; this run replaces it (pass --resume to continue it instead)"
            )
        _install_signal_handlers(trainer)
        trainer.stop_requested = trainer.stop_requested or early.stop_requested
        return trainer.fit()
    finally:
        shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
