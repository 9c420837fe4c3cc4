"""``python -m fastflow.train``: conditional flow matching on MNIST.

With no flags it picks a preset for the device: ``original`` on CUDA (the Rust project's 10 epochs, batch 32,
lr 1e-4, widths 64/128/256) and ``cpu`` on a CPU (a smaller U-Net and a short schedule sized for a 2-core
laptop). Checkpoints go to ``--model-dir`` (./model), sample grids, the loss history and its plot to
``--result-dir`` (./result).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import path as fm
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig, add_dataclass_args, resolve_preset
from .data import DeviceLoader, load_mnist
from .device import autocast, resolve_amp, resolve_device
from .distributed import Dist, barrier, init_distributed, shutdown
from .ema import EMA
from .errors import UserError, cli
from .io import atomic_save, atomic_write_text, check_writable
from .solvers import sample
from .unet import UNet, count_parameters

__all__ = ["Trainer", "build_parser", "main", "lr_at", "save_grid"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastflow.train",
        description="Train a conditional flow-matching U-Net on MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_args(p.add_argument_group("training"), TrainConfig)
    add_dataclass_args(p.add_argument_group("model (override the preset)"), ModelConfig)
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
    lines = ["step,epoch,loss,lr,images_per_s"] + [f"{int(s)},{int(e)},{l:.6f},{lr:.3e},{ips:.1f}" for s, e, l, lr, ips in rows]
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
        self.train_model = self.model  # DDP wraps this one (issue 3)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=device.type != "cuda",
            fused=device.type == "cuda" or None,
        )
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # All training randomness (t, ε, dropped labels) comes from this one generator: its state is saved.
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * dist.rank)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[list[float]] = []
        self.stop_requested = False
        self._saved_step = -1

    # -- state -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema_updates": self.ema.updates if self.ema else 0,
            "history": self.history,
        }

    def save(self) -> None:
        if not self.dist.is_main or self._saved_step == self.step:
            return
        self._saved_step = self.step
        save_checkpoint(
            self.model_dir, self.model, self.mcfg, self.cfg, self.ema.shadow if self.ema else None, self.state(), self.step
        )

    def resume(self) -> bool:
        """Load ``model_dir`` if it holds a checkpoint; refuse one trained with another model config."""
        if not (self.model_dir / "manifest.json").exists() and not (self.model_dir / "previous").exists():
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {self.model_dir}; starting from scratch")
            return False
        ck = load_checkpoint(self.model_dir)
        if ck.model_cfg != self.mcfg:
            raise UserError(
                f"--resume: {ck.path} was trained with {ck.model_cfg}, not {self.mcfg}; pass the same preset and model flags"
            )
        if ck.state is None:
            raise UserError(f"--resume: {ck.path} has no training state (state.pt)")
        self.model.load_state_dict(ck.weights)
        if self.ema is not None:
            if ck.ema_weights is None:
                raise UserError(f"--resume: {ck.path} has no EMA weights but --ema-decay is {self.cfg.ema_decay}")
            self.ema.shadow.load_state_dict(ck.ema_weights)
            self.ema.updates = int(ck.state["ema_updates"])
        self.opt.load_state_dict(ck.state["optimizer"])
        self.step = int(ck.state["step"])
        self.epoch = int(ck.state["epoch"])
        self.batch_in_epoch = int(ck.state["batch_in_epoch"])
        self.gen.set_state(ck.state["generator"])
        torch.set_rng_state(ck.state["torch_rng"])
        self.history = [list(r) for r in ck.state["history"]]
        if self.dist.is_main:
            print(f"resumed from {ck.path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")
        return True

    # -- one step --------------------------------------------------------------------------------------
    def train_step(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the batch (z [B, 1, 28, 28] in [-1, 1], y [B]); returns the loss (0-d, on device)."""
        b = z.shape[0]
        t = fm.sample_time(b, self.cfg.time_sampling, self.gen, self.device)  # [B]
        eps = torch.randn(z.shape, generator=self.gen, device=self.device)  # [B, 1, 28, 28]
        y = fm.drop_labels(y, self.cfg.label_drop, self.gen)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg, self.total_steps)
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
    def fit(self) -> int:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            print(
                f"fastflow: preset {cfg.preset}, device {self.device}, amp {self.amp_dtype or 'fp32'}, "
                f"{count_parameters(self.model):,} parameters, {self.total_steps} steps of batch {cfg.batch_size}"
            )
        window: list[torch.Tensor] = []
        t_window = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not main, dynamic_ncols=True, unit="step")
        done = self.step >= self.total_steps
        while not done and self.epoch < cfg.num_epochs:
            for z, y in self.loader.epoch(self.epoch, self.batch_in_epoch):
                loss = self.train_step(z, y)
                window.append(loss)
                self.step += 1
                self.batch_in_epoch += 1
                bar.update(1)
                if len(window) >= cfg.log_every:
                    losses = torch.stack(window).float().cpu()  # the one host synchronisation
                    bad = (~torch.isfinite(losses)).nonzero()
                    if len(bad):
                        first = self.step - len(window) + int(bad[0]) + 1
                        bar.close()
                        kept = f"the last good checkpoint in {self.model_dir} is kept" if (self.model_dir / "manifest.json").exists() else "no checkpoint was written yet"
                        raise UserError(f"non-finite loss at step {first}; training stopped, {kept}")
                    dt = time.perf_counter() - t_window
                    ips = len(window) * cfg.batch_size / dt
                    mean = float(losses.mean())
                    self.history.append([self.step, self.epoch + 1, mean, self.opt.param_groups[0]["lr"], ips])
                    bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.0f}", epoch=self.epoch + 1)
                    window, t_window = [], time.perf_counter()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self.stop_requested or self.step >= self.total_steps:
                    done = True
                    break
            if done and self.batch_in_epoch < len(self.loader):
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            self.save()
            if main:
                self.save_samples(f"epoch-{self.epoch:03d}.png")
                write_loss_history(self.history, self.result_dir)
            barrier(self.dist)
        bar.close()
        self.save()
        if main:
            write_loss_history(self.history, self.result_dir)
            grid = self.save_samples("samples.png")
            if self.stop_requested:
                print(f"stopped at step {self.step}; checkpoint in {self.model_dir}; resume with: python -m fastflow.train --resume ...same flags")
            else:
                print(f"done: {self.step} steps; checkpoint in {self.model_dir}, samples in {grid}")
        return 0


def _install_signal_handlers(trainer: Trainer) -> None:
    def handler(signum, frame):
        if trainer.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device or "auto")
    mcfg, cfg = resolve_preset(args, device.type)
    check_writable(cfg.model_dir, "--model-dir")
    check_writable(cfg.result_dir, "--result-dir")
    dist = init_distributed(device)
    try:
        trainer = Trainer(mcfg, cfg, device, dist)
        if cfg.resume:
            trainer.resume()
        elif (Path(cfg.model_dir) / "manifest.json").exists() and dist.is_main:
            print(f"note: {cfg.model_dir} holds a checkpoint; it will be replaced (its last complete set stays in previous/)")
        _install_signal_handlers(trainer)
        return trainer.fit()
    finally:
        shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
