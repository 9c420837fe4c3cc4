"""The training loop: data, model, optimizer, EMA and RNG; one loop with one save site; the saved state and its
restore side by side. The command line is :mod:`fastflow.train`; the step's math is :mod:`fastflow.step`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import path as fm
from .checkpoint import Checkpoint, build_model, has_checkpoint, load_checkpoint, load_weights_into, save_checkpoint
from .config import ModelConfig, TrainConfig, resume_free
from .data import DeviceLoader, MNISTArrays, load_mnist
from .device import autocast, configure_backends, describe_amp, resolve_amp, synchronize
from .distributed import Dist, all_reduce_sum, barrier, broadcast_module, local_main_first
from .ema import EMA
from .errors import TrainingDiverged, UserError
from .io import atomic_save, atomic_write_text, fault
from .sampling_args import DEFAULT_INTERVAL
from .solvers import GuidedField, initial_noise, integrate, sample, stage_plan, time_grid
from .step import TrainStep, make_optimizer, place_adamw_state, resolve_mode
from .unet import UNet, count_parameters

__all__ = ["Trainer", "lr_at", "save_grid", "grid_labels", "write_loss_history", "init_checkpoint"]

_clock = time.perf_counter  # the loop's only clock (tests replace it)
# --time-budget: the step rate is measured over steps [PROBE[0], PROBE[1]) of the run (the first ones pay for
# compilation and warm caches, and that time counts against the budget all the same).
PROBE = (5, 25)
UNPLANNED = 10**9  # the step count until a time budget is planned (the lr schedule is then ~flat)
TRAJECTORY_CHUNK = 256  # --mf-distill: trajectories made per teacher call, each chunk from its own seed


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
    ax.set_ylabel("loss (MSE to the target)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(result_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def init_checkpoint(cfg: TrainConfig) -> tuple[Checkpoint, ModelConfig] | None:
    """``--init-from DIR``: the checkpoint in DIR and the model config of the run that starts from it (DIR's,
    with the mean-flow gap input); None without ``--init-from``. Every problem with DIR is a one-line UserError
    naming the flag."""
    if not cfg.init_from:
        return None
    try:
        ck = load_checkpoint(cfg.init_from, with_state=False)
    except UserError as e:
        raise UserError(f"--init-from: {e}") from None
    return ck, dataclasses.replace(ck.model_cfg, mean_flow=True)


class Trainer:
    """One training run: ``Trainer(...).fit()``; ``resume()`` first to continue the checkpoint in ``model_dir``.

    Args:
        mcfg, cfg: the model and training settings.
        device: where to train (under torchrun, this rank's device).
        dist: this process's place in a torchrun job.
        data: the training set (uint8 images [N, 28, 28], labels [N]); None reads MNIST from ``cfg.data_root``.
            Unused with ``--mf-distill``, which trains on a teacher's trajectories (:meth:`set_teacher`).
    """

    def __init__(
        self, mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, dist: Dist = Dist(), data=None
    ) -> None:
        self.mcfg, self.cfg, self.device, self.dist = mcfg, cfg, device, dist
        self.model_dir, self.result_dir = Path(cfg.model_dir), Path(cfg.result_dir)
        configure_backends(device, cfg.tf32)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.ctx = autocast(device, self.amp_dtype)

        # --mf-distill: the data are the teacher's trajectories, made at the start of fit() (make_trajectories).
        self.distill = cfg.objective == "meanflow" and cfg.mf_distill > 0
        self.teacher: torch.nn.Module | None = None
        self.loader: DeviceLoader | None = None
        if self.distill:
            n = self.num_trajectories = -(-cfg.mf_distill_trajectories // TRAJECTORY_CHUNK) * TRAJECTORY_CHUNK
            if cfg.batch_size > n:
                raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n} trajectories")
            epoch_len = n // cfg.batch_size
            self.grid = time_grid(cfg.mf_distill, device=device)  # the trajectories' times
        else:
            if data is None:
                with local_main_first(dist):  # one offline rebuild / download per machine, not one per rank
                    data = load_mnist(cfg.data_root, train=True, verbose=dist.is_main)
            data = MNISTArrays(data.images[: cfg.subset or None], data.labels[: cfg.subset or None])
            self.loader = DeviceLoader(
                data.images, data.labels, cfg.batch_size, cfg.seed, device, rank=dist.rank, world_size=dist.world_size
            )
            epoch_len = len(self.loader)
        # With --time-budget the step count is planned in fit() from the measured rate (and saved).
        self.planned_steps: int | None = None
        self.total_steps = UNPLANNED if cfg.time_budget else cfg.num_epochs * epoch_len
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        torch.manual_seed(cfg.seed)
        self.model = UNet(mcfg).to(device)
        broadcast_module(self.model, dist)  # every rank starts from rank 0's weights
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.mode = resolve_mode(cfg.compile, cfg.cuda_graphs, device)
        meanflow = None
        if cfg.objective == "meanflow":
            meanflow = fm.MeanFlowSettings(guidance=cfg.mf_guidance, adaptive_p=cfg.mf_adaptive_p, distill=self.distill)
        # An explicit --compile that fails is an error; the CUDA default falls back to eager with one line.
        self.train_fn = TrainStep(
            self.model,
            self.opt,
            self.ema,
            self.ctx,
            mode=self.mode,
            process_group=dist.group,
            fallback=cfg.compile is None,
            meanflow=meanflow,
        )
        # All training randomness (t, ε, dropped labels) comes from this one generator: its state is saved.
        # Same seed on every rank: each draws the whole global batch's noise and keeps its rows (train_step).
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[list[float]] = []
        self.window: list[torch.Tensor] = []  # losses [0-d, on device] since the last log line; saved
        self.stop_requested = False
        self.stop_agreed = False  # under DDP: a stop every rank has seen (see _should_stop)
        self.resume_command = "python -m fastflow.train --resume (with the same flags)"  # the CLI makes it concrete
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, batch_in_epoch) of the last save
        self._last_good: int | None = None  # step of the last checkpoint this run wrote or resumed from
        self._bar = None

    # -- the training state: what is saved, and its restore, side by side ------------------------------------
    # Everything the next step depends on. Adding randomness to the step? Save it here and restore it in
    # load_state_dict(): tests/fastflow/test_resume.py checks a killed-and-resumed run against an uninterrupted
    # one, bit for bit.
    STATE_KEYS = ("optimizer", "step", "epoch", "batch_in_epoch", "generator", "torch_rng", "ema_updates", "history")

    def state_dict(self) -> dict:
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
            "planned_steps": self.planned_steps,  # --time-budget: the step count fixed by the measured rate
        }

    def load_state_dict(self, st: dict) -> None:
        self.opt.load_state_dict(st["optimizer"])
        place_adamw_state(self.opt)  # this run's placement and flags, whatever mode or device saved it
        self.gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        if self.device.type == "cuda" and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        if self.ema is not None:
            self.ema.updates = int(st["ema_updates"])
        self.step, self.epoch, self.batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
        self.history = [[float(v) for v in r] for r in st["history"]]
        self.window = [v.to(self.device) for v in torch.as_tensor(st.get("loss_window", [])).float().unbind()]
        if st.get("planned_steps") is not None and self.cfg.time_budget:
            self._set_plan(int(st["planned_steps"]))

    def init_from(self, ck: Checkpoint) -> str:
        """Start from ``ck``'s weights (``--init-from``): its EMA weights where it has them, else its raw ones,
        into the model and the EMA; the optimizer, the step and the EMA schedule stay new. A flow-matching
        checkpoint lacks only the gap MLP, which keeps its initialisation (last layer zero: the model starts as
        ``ck``'s field for every s). Returns which weights were used, for the start line."""
        which = "EMA" if ck.ema_weights is not None else "raw"
        weights = ck.ema_weights if ck.ema_weights is not None else ck.weights
        if not ck.model_cfg.mean_flow:  # the gap MLP keeps its initialisation
            own = self.model.state_dict()
            weights = {**{k: v for k, v in own.items() if k.startswith("gap_mlp.")}, **weights}
        load_weights_into(self.model, weights, ck.path, f"{which} weights")
        broadcast_module(self.model, self.dist)  # every rank read the same file; this keeps them equal regardless
        if self.ema is not None:
            self.ema.shadow.load_state_dict(self.model.state_dict())
        return f"{which} weights of {ck.path} (step {ck.step}, objective {ck.objective})"

    def set_teacher(self, ck: Checkpoint) -> None:
        """``--mf-distill``: the flow-matching model whose trajectories the run learns from (``--init-from``'s
        checkpoint, its EMA weights where saved; also on ``--resume``, which makes the trajectories again)."""
        if ck.model_cfg.mean_flow:
            raise UserError(f"--mf-distill: {ck.path} holds a MeanFlow model; the teacher must be a flow-matching one")
        self.teacher = build_model(ck).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def make_trajectories(self) -> None:
        """``--mf-distill``: the teacher's trajectories, its states at the ``mf_distill + 1`` times of a uniform
        grid by that many midpoint steps, guided at ``mf_guidance`` in [0.2, 0.7], and the loader over them.

        Made in chunks of 256, chunk c from noise and labels of its own seed, the chunks shared out over the
        ranks and summed into every rank's copy (one all-reduce): the set is the same for any number of ranks,
        and a resumed run makes it again, the same."""
        cfg, dist, k = self.cfg, self.dist, self.cfg.mf_distill
        if self.teacher is None:
            raise RuntimeError("make_trajectories needs set_teacher first")
        t0 = _clock()
        n = self.num_trajectories  # a multiple of TRAJECTORY_CHUNK
        states = torch.zeros((n, k + 1, self.mcfg.in_channels, 28, 28), device=self.device)  # [N, k + 1, 1, 28, 28]
        labels = torch.zeros(n, dtype=torch.int64, device=self.device)
        plan = stage_plan(self.grid, "midpoint", DEFAULT_INTERVAL)
        for c in range(dist.rank, n // TRAJECTORY_CHUNK, dist.world_size):
            g = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + c)
            y = torch.randint(0, self.mcfg.num_classes, (TRAJECTORY_CHUNK,), generator=g, device=self.device)
            x = initial_noise(y, tuple(states.shape[2:]), g)
            field = GuidedField(self.teacher, y, cfg.mf_guidance, self.ctx, DEFAULT_INTERVAL)
            out: list[torch.Tensor] = []
            integrate(field, x, self.grid, "midpoint", plan, states=out)
            rows = slice(c * TRAJECTORY_CHUNK, (c + 1) * TRAJECTORY_CHUNK)
            states[rows], labels[rows] = torch.stack(out, 1), y
        all_reduce_sum(states, dist)  # each row is non-zero on one rank only: the sum is that rank's row, exactly
        all_reduce_sum(labels, dist)
        self.loader = DeviceLoader(
            states, labels, cfg.batch_size, cfg.seed, self.device, rank=dist.rank, world_size=dist.world_size
        )
        if dist.is_main:
            tqdm.write(
                f"--mf-distill: {n} trajectories of the teacher ({k} midpoint steps, w = {cfg.mf_guidance:g} in "
                f"[{DEFAULT_INTERVAL[0]:g}, {DEFAULT_INTERVAL[1]:g}]) in {_clock() - t0:.1f} s"
            )

    def resume(self) -> bool:
        """Load ``model_dir`` if it holds a checkpoint; refuse one trained with another model config."""
        d = self.model_dir
        if not has_checkpoint(d):
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {d}; starting from scratch")
            return False
        ck = load_checkpoint(d)
        if ck.model_cfg != self.mcfg:
            diff = ", ".join(
                f"objective {ck.objective} (flags: {self.cfg.objective})"
                if f.name == "mean_flow"  # not a flag: --objective sets it
                else f"{f.name} {_show(getattr(ck.model_cfg, f.name))} (flags: {_show(getattr(self.mcfg, f.name))})"
                for f in dataclasses.fields(ModelConfig)
                if getattr(ck.model_cfg, f.name) != getattr(self.mcfg, f.name)
            )
            raise UserError(f"--resume: {ck.path} holds another model: {diff}; pass the same --preset and model flags")
        st, spath = ck.state, ck.state_path
        if st is None:
            raise UserError(f"--resume: {ck.path} has no training state ({spath.name}); it can be sampled, not resumed")
        missing = [k for k in self.STATE_KEYS if k not in st]
        if missing:
            raise UserError(f"--resume: {spath}: not a fastflow training state (no {', '.join(missing)})")
        if self.ema is not None and ck.ema_weights is None:
            raise UserError(f"--resume: {ck.path} has no EMA weights but --ema-decay is {self.cfg.ema_decay}")
        load_weights_into(self.model, ck.weights, ck.path)
        if self.ema is not None:
            load_weights_into(self.ema.shadow, ck.ema_weights, ck.path, "EMA weights")
        try:
            self.load_state_dict(st)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise UserError(f"--resume: {spath}: does not fit this run ({' '.join(str(e).split())[:160]})") from None
        if self.step != ck.step:
            raise UserError(f"--resume: {spath} is at step {self.step} but its manifest says {ck.step}")
        self._saved_at, self._last_good = (self.step, self.epoch, self.batch_in_epoch), self.step
        if self.dist.is_main:
            print(f"resumed from {ck.path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")
            old = (ck.config.get("train") or {}) if isinstance(ck.config, dict) else {}
            new, free = dataclasses.asdict(self.cfg), resume_free()
            changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k not in free and k in old and old[k] != new[k]]
            if changed:
                print(
                    f"note: resuming with changed settings ({', '.join(changed)}); the run will differ from one left alone"
                )
        return True

    # -- one step --------------------------------------------------------------------------------------------
    def train_step(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the batch (z [B, 1, 28, 28] in [-1, 1], y [B]); advances ``step``; returns the
        loss (0-d, on device, not synchronised)."""
        b = z.shape[0]
        # Under DDP every rank draws t, ε and the label mask for the whole global batch (n rows, same generator
        # state on all ranks) and keeps its own rows [lo, lo + b): N ranks then train as one process at the same
        # global batch, up to fp32 summation order. One process: n = b, lo = 0, the draws are unchanged.
        cfg = self.cfg
        n, lo = b * self.dist.world_size, b * self.dist.rank
        if self.distill:  # z: trajectories [B, k + 1, 1, 28, 28]; a pair of their states, labels kept
            i, j = fm.grid_pairs(n, cfg.mf_distill, cfg.mf_distill_long, self.gen, self.device)
            x, t, s, u = fm.trajectory_pairs(z, self.grid, i[lo : lo + b], j[lo : lo + b])
            loss = self.train_fn(x, y, t, u, self.lr, s)
            self.step += 1
            return loss
        s = None
        if cfg.objective == "meanflow":  # (t, s) with t ≤ s, s = t in a share mf_equal_share
            t, s = fm.sample_time_pair(n, cfg.mf_time_mean, cfg.mf_time_std, cfg.mf_equal_share, self.gen, self.device)
            t, s = t[lo : lo + b], s[lo : lo + b]  # [B] each
        else:
            t = fm.sample_time(n, cfg.time_sampling, self.gen, self.device)[lo : lo + b]  # [B]
        eps = torch.randn((n, *z.shape[1:]), generator=self.gen, device=self.device)[lo : lo + b]  # [B, 1, 28, 28]
        y = fm.drop_labels(y.repeat(self.dist.world_size), cfg.label_drop, self.gen)[lo : lo + b]  # mask of n
        loss = self.train_fn(z, y, t, eps, self.lr, s)
        self.step += 1
        return loss

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return lr_at(self.step, self.cfg, self.total_steps)

    # -- checks and outputs ----------------------------------------------------------------------------------
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
        elif has_checkpoint(self.model_dir):
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
            ema = self.ema.shadow if self.ema else None
            save_checkpoint(self.model_dir, self.model, self.mcfg, self.cfg, ema, self.state_dict(), self.step)
        self._saved_at, self._last_good = at, self.step

    @torch.no_grad()
    def save_samples(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        net = self.ema.shadow if self.ema is not None else self.model
        net.eval()
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        solver = "meanflow" if self.cfg.objective == "meanflow" else "euler"
        images, _ = sample(
            net, grid_labels(self.device), self.cfg.sample_steps, solver=solver, generator=g, ctx=self.ctx
        )
        self.model.train()
        return save_grid(images, self.result_dir / name)

    # -- the loop --------------------------------------------------------------------------------------------
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

    def _should_stop(self) -> bool:
        # Under DDP a stop (signal) counts once every rank knows of it, at a log step: ranks stopping at different
        # steps would leave one waiting in a collective for the others.
        return self.stop_agreed if self.dist.enabled else self.stop_requested

    def _set_plan(self, steps: int) -> None:
        self.planned_steps = steps
        self.total_steps = min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def _plan(self, t_start: float, t_probe: float, probed: int, announce: bool = True) -> None:
        """Fix the step count so that training ends about ``time_budget`` seconds after ``t_start``, from the rate
        of the last ``probed`` steps, timed since ``t_probe``. Rank 0 decides; every rank follows.

        Called once after the probe steps (``announce``: the plan is printed), then again at every log step
        with the last window's rate, so that a machine that slows down (or speeds up) mid-run still ends on
        time; the cosine schedule follows the new count."""
        synchronize(self.device)
        now = _clock()
        rate = probed / max(now - t_probe, 1e-9)  # steps per second
        left = self.cfg.time_budget - (now - t_start)
        steps = self.step + max(0, int(left * rate))
        if self.dist.enabled:
            steps = int(
                all_reduce_sum(torch.tensor([steps if self.dist.is_main else 0], device=self.device), self.dist)
            )
        self._set_plan(steps)
        if self._bar is not None:
            self._bar.total = self.total_steps
            self._bar.refresh()
        if self.dist.is_main and announce:
            ips = rate * self.cfg.batch_size
            tqdm.write(
                f"time budget {self.cfg.time_budget:g} s: {self.total_steps} steps of batch {self.cfg.batch_size} "
                f"at {ips:.0f} img/s (measured over steps {self.step - probed + 1}-{self.step}), "
                f"ends in about {(self.total_steps - self.step) / rate:.0f} s more"
            )

    def fit(self) -> int:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            steps = f"{cfg.time_budget:g} s" if self.total_steps == UNPLANNED else f"{self.total_steps} steps"
            print(
                f"fastflow: preset {cfg.preset}, device {self.device}"
                + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
                + f", amp {describe_amp(cfg.amp, self.amp_dtype, self.device)}, "
                f"step {self.mode}, objective {cfg.objective}, "
                f"{count_parameters(self.model):,} parameters, {steps} of batch {cfg.batch_size}"
            )
        if self.step >= self.total_steps:  # resumed a finished run: write nothing, touch nothing
            if main:
                print(f"nothing to do: {self.model_dir} is at step {self.step} of {self.total_steps}")
            return 0
        bar = self._bar = tqdm(
            total=None if self.total_steps == UNPLANNED else self.total_steps,
            initial=self.step,
            disable=not main,
            dynamic_ncols=True,
            unit="step",
        )
        # A log line covers the same steps as in an uninterrupted run (the window is restored by resume), but
        # images/s counts only the steps this process timed.
        timed, t_window = 0, _clock()
        t_start, t_probe = t_window, None
        planning = bool(self.cfg.time_budget) and self.planned_steps is None
        replanning = False  # from the first plan on; a resumed run keeps its saved plan
        probe = (self.step + PROBE[0], self.step + PROBE[1])  # steps, counted from this run's start
        batches, stopped = None, False
        if self.distill and self.loader is None:
            self.make_trajectories()  # inside the time budget: t_start is before it
            t_window = _clock()  # the first window's img/s counts training steps only
        while not stopped and self.step < self.total_steps:
            if batches is None:  # the epoch's permutation, from the saved position on
                batches = self.loader.epoch(self.epoch, self.batch_in_epoch)
            z, y = next(batches)
            self.batch_in_epoch += 1  # the position of the next batch: what a checkpoint saves
            self.window.append(self.train_step(z, y))
            timed += 1
            fault("step", self.step)  # test hook: a kill between a step and its checkpoint
            bar.update(1)
            if len(self.window) >= cfg.log_every:
                losses = self._reduce_window(torch.stack(self.window).float()).cpu()  # the one host sync
                bad = (~torch.isfinite(losses)).nonzero()
                if len(bad):
                    self._diverged(self.step - len(self.window) + int(bad[0]) + 1)
                ips = timed * cfg.batch_size / (_clock() - t_window)
                if replanning:  # the budget's plan, again from this window's rate
                    self._plan(t_start, t_window, timed, announce=False)
                mean = float(losses.mean())
                self.history.append([self.step, self.epoch + 1, mean, lr_at(self.step - 1, cfg, self.total_steps), ips])
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.0f}", epoch=self.epoch + 1)
                self.window, timed, t_window = [], 0, _clock()
            if planning and self.step == probe[0]:
                synchronize(self.device)
                t_probe = _clock()
            elif planning and self.step == probe[1]:
                self._plan(t_start, t_probe, probe[1] - probe[0])
                planning, replanning = False, True
            epoch_end = self.batch_in_epoch == len(self.loader)
            if epoch_end:  # saved as (next epoch, batch 0)
                self.epoch, self.batch_in_epoch, batches = self.epoch + 1, 0, None
            stopped = self._should_stop() and self.step < self.total_steps
            last = stopped or self.step >= self.total_steps
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if epoch_end or last or periodic:
                self._checkpoint(epoch_end, last, stopped)
        bar.close()
        return 0

    def _checkpoint(self, epoch_end: bool, last: bool, stopped: bool) -> None:
        """The one save site: the grids and the loss history first, the checkpoint last, so a kill between them
        resumes from the previous checkpoint and redoes both."""
        main = self.dist.is_main
        if epoch_end or last:
            self.check_finite()  # no grid and no checkpoint from non-finite weights
        grid = None
        if main and epoch_end:
            self.save_samples(f"epoch-{self.epoch:03d}.png")
        if main and (epoch_end or last):
            write_loss_history(self.history, self.result_dir)
        if main and last and not stopped:  # a stop skips the grid: SIGTERM comes with a deadline
            grid = self.save_samples("samples.png")
        self.save()
        if last and main:
            if self._bar is not None:
                self._bar.close()
            if stopped:
                print(
                    f"stopped at step {self.step} of {self.total_steps}; checkpoint in {self.model_dir}; "
                    f"resume with: {self.resume_command}"
                )
            else:
                print(f"done: {self.step} steps; checkpoint in {self.model_dir}, samples in {grid}")
        if epoch_end or last:
            barrier(self.dist)  # the other ranks wait for rank 0's checkpoint and samples
