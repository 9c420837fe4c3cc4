"""The training loop: one run of an objective, one flat loop with one exit and one save site.

The command line is :mod:`fastflow.train`. What is learnt (the data, each step's draws, the loss) is the
objective's (:mod:`fastflow.objectives`); the step's math is :mod:`fastflow.step`; what a run saves and restores is
:class:`~fastflow.runstate.RunState`, which a Trainer is; when to plan, log and save is :mod:`fastflow.schedule`
and :mod:`fastflow.history`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig
from .data import DeviceLoader, MNISTArrays
from .device import autocast, configure_backends, describe_amp, resolve_amp, synchronize
from .distributed import Dist, barrier, from_main, mean_over_ranks
from .errors import UserError
from .history import write_loss_history
from .images import grid_labels, save_grid
from .io import fault
from .objectives import Objective, Run, make_objective
from .runstate import RunState
from .schedule import PROBE, UNPLANNED, TimeBudget, checkpoint_due, lr_at
from .solvers import SamplerSpec, sample
from .step import TrainStep, resolve_mode
from .unet import count_parameters

__all__ = ["Trainer"]

_clock = time.perf_counter  # the loop's only clock (tests replace it)


class Trainer(RunState):
    """One training run: ``Trainer(...).fit()``; ``resume()`` first to continue the checkpoint in ``model_dir``.

    Args:
        mcfg, cfg: the model and training settings.
        device: where to train (under torchrun, this rank's device).
        dist: this process's place in a torchrun job.
        data: the training images (uint8 [N, 28, 28], labels [N]) for an objective that learns from MNIST; None
            reads MNIST from ``cfg.data_root``.
        objective: what to learn (:func:`~fastflow.objectives.make_objective` of ``cfg`` and ``data`` by default).
    """

    def __init__(
        self, mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, dist: Dist = Dist(),
        data: MNISTArrays | None = None, objective: Objective | None = None,
    ) -> None:  # fmt: skip
        configure_backends(device, cfg.tf32)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.ctx = autocast(device, self.amp_dtype)
        self.objective = obj = objective or make_objective(cfg, dist, data)
        if cfg.batch_size > obj.size:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the {obj.size} {obj.items}")
        self.epoch_len = obj.size // cfg.batch_size
        self.loader: DeviceLoader | None = None  # the objective's training set, made by prepare()
        super().__init__(mcfg, cfg, device, dist)  # the model, optimizer, EMA, generator, position and log
        self.result_dir = Path(cfg.result_dir)
        self.mode = resolve_mode(cfg.compile, cfg.cuda_graphs, device)
        # An explicit --compile that fails is an error; the CUDA default falls back to eager with one line.
        self.train_fn = TrainStep(
            self.model, self.opt, self.ema, self.ctx, mode=self.mode, process_group=dist.group,
            fallback=cfg.compile is None, loss=obj.loss,
        )  # fmt: skip
        self.stop_requested = False  # set by a signal: finish the step, save, exit 0
        self.stop_agreed = False  # under DDP: a stop every rank has seen (see _should_stop)
        self.resume_command = "python -m fastflow.train --resume (with the same flags)"  # the CLI makes it concrete

    @property
    def total_steps(self) -> int:
        """The run's step count: the time budget's plan (a huge number until it is made) or the epochs', capped
        by ``--max-steps``."""
        n = self.planned_steps if self.planned_steps is not None else UNPLANNED
        if not self.cfg.time_budget:
            n = self.cfg.num_epochs * self.epoch_len
        return min(n, self.cfg.max_steps) if self.cfg.max_steps else n

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return lr_at(self.step, self.cfg, self.total_steps)

    def prepare(self) -> None:
        """Make the objective's training set and its loader (once; inside the time budget when fit() calls it)."""
        if self.loader is None:
            cfg, d = self.cfg, self.dist
            items, labels = self.objective.training_set(Run(self.device, d, self.ctx, cfg.seed))
            self.loader = DeviceLoader(items, labels, cfg.batch_size, cfg.seed, self.device, True, d.rank, d.world_size)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the loader's batch (x, y): the objective's draws, then the step; advances
        ``step``; returns the loss (0-d, on device, not synchronised)."""
        loss = self.train_fn(self.objective.draw(x, y, self.gen, self.dist), self.lr)
        self.step += 1
        return loss

    @torch.no_grad()
    def save_samples(self, name: str) -> Path:
        """A grid of the EMA model's digits (row k: digit k), from the run's seed, with the objective's solver."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        net = (self.ema.shadow if self.ema else self.model).eval()
        spec = SamplerSpec(self.objective.solver, self.cfg.sample_steps)
        images, _ = sample(net, grid_labels(self.device), spec, generator=g, ctx=self.ctx)
        self.model.train()
        return save_grid(images, self.result_dir / name)

    # -- the loop --------------------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        # Under DDP a stop (signal) counts once every rank knows of it, at a log step: ranks stopping at different
        # steps would leave one waiting in a collective for the others.
        return self.stop_agreed if self.dist.enabled else self.stop_requested

    def _adopt(self, plan: tuple[int, float] | None, announce: bool) -> None:
        """Take a time budget's plan (rank 0's, on every rank) as the run's step count."""
        if plan is not None:
            self.planned_steps = n = from_main(plan[0], self.dist, self.device)
            self.progress.retotal(self.total_steps)
            if announce:
                probed, rate = (self.step - (PROBE[1] - PROBE[0]) + 1, self.step), plan[1]
                self.progress.plan(self.cfg.time_budget, n, self.cfg.batch_size, rate, probed, (n - self.step) / rate)

    def fit(self) -> int:
        cfg = self.cfg
        t_start = _clock()  # the time budget counts from here: making the training set is inside it
        budget = TimeBudget(cfg.time_budget, self.step, t_start, self.planned_steps is not None) if cfg.time_budget else None  # fmt: skip
        total = None if self.total_steps == UNPLANNED else self.total_steps
        procs = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
        self.progress.begin(
            f"preset {cfg.preset}, device {self.device}{procs}, amp {describe_amp(cfg.amp, self.amp_dtype, self.device)}"
            f", step {self.mode}, objective {self.objective.name}, {count_parameters(self.model):,} parameters",
            total, cfg.time_budget, cfg.batch_size,
        )  # fmt: skip
        if self.step >= self.total_steps:  # resumed a finished run: write nothing, touch nothing
            self.say(f"nothing to do: {self.model_dir} is at step {self.step} of {self.total_steps}")
            return 0
        self.prepare()
        self.progress.start(total, self.step)
        # A log line covers the same steps as in an uninterrupted run (the window is restored by resume), but
        # images/s counts only the steps this process timed.
        timed, t_window = 0, _clock()
        batches, stopped = None, False
        while not stopped and self.step < self.total_steps:
            if batches is None:  # the epoch's permutation, from the saved position on
                batches = self.loader.epoch(self.epoch, self.batch_in_epoch)
            x, y = next(batches)
            self.batch_in_epoch += 1  # the position of the next batch: what a checkpoint saves
            self.log.add(self.train_step(x, y))
            timed += 1
            fault("step", self.step)  # test hook: a kill between a step and its checkpoint
            self.progress.step()
            if self.log.full:
                losses, agreed = mean_over_ranks(self.log.losses(), self.stop_requested, self.dist)
                losses = losses.cpu()  # the one host sync
                if agreed and self.dist.enabled:  # a stop every rank now knows of
                    self.stop_agreed = self.stop_requested = True
                if (bad := self.log.first_bad(losses, self.step)) is not None:
                    self.diverged(bad)
                ips = timed * cfg.batch_size / (_clock() - t_window)
                if budget is not None and budget.replanning:  # the budget's plan, again from this window's rate
                    self._adopt(budget.at_log(self.step, _clock(), timed, t_window), announce=False)
                mean = float(losses.mean())
                self.log.log(self.step, self.epoch + 1, mean, lr_at(self.step - 1, cfg, self.total_steps), ips)
                self.progress.window(mean, ips, self.epoch + 1)
                timed, t_window = 0, _clock()
            if budget is not None and budget.due(self.step):
                synchronize(self.device)
                self._adopt(budget.at_step(self.step, _clock()), announce=True)
            epoch_end = self.batch_in_epoch == len(self.loader)
            if epoch_end:  # saved as (next epoch, batch 0)
                self.epoch, self.batch_in_epoch, batches = self.epoch + 1, 0, None
            stopped = self._should_stop() and self.step < self.total_steps
            last = stopped or self.step >= self.total_steps
            if checkpoint_due(self.step, epoch_end, last, cfg.checkpoint_every):
                self._checkpoint(epoch_end, last, stopped)
        self.progress.close()
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
            write_loss_history(self.log.rows, self.result_dir)
        if main and last and not stopped:  # a stop skips the grid: SIGTERM comes with a deadline
            grid = self.save_samples("samples.png")
        self.save()
        if last:
            self.progress.close()
            if stopped:
                where = f"checkpoint in {self.model_dir}; resume with: {self.resume_command}"
                self.say(f"stopped at step {self.step} of {self.total_steps}; {where}")
            else:
                self.say(f"done: {self.step} steps; checkpoint in {self.model_dir}, samples in {grid}")
        if epoch_end or last:
            barrier(self.dist)  # the other ranks wait for rank 0's checkpoint and samples
