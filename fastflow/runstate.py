"""A training run's state, what is saved and its restore side by side: the model, the optimizer, the EMA, the
generator every draw comes from, the position in the data, the loss log and the time budget's plan.
:class:`fastflow.trainer.Trainer` is a :class:`RunState` with the loop."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, TrainConfig, changed_settings
from .distributed import Dist, broadcast_module
from .ema import EMA
from .errors import TrainingDiverged, UserError
from .history import LossLog
from .progress import Progress
from .step import make_optimizer, place_adamw_state
from .unet import UNet

__all__ = ["RunState"]


class RunState:
    """The state of one training run of ``mcfg`` with ``cfg`` on ``device`` (this rank of ``dist``): fresh (the
    run's seed), continued from a checkpoint (:meth:`resume`) or started from another model's weights
    (:meth:`init_from`); written by :meth:`save`."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, dist: Dist = Dist()) -> None:
        self.mcfg, self.cfg, self.device, self.dist = mcfg, cfg, device, dist
        self.model_dir = Path(cfg.model_dir)
        torch.manual_seed(cfg.seed)
        self.model = UNet(mcfg).to(device)
        broadcast_module(self.model, dist)  # every rank starts from rank 0's weights
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # All training randomness (t, ε, dropped labels, ...) comes from this one generator: its state is saved.
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.planned_steps: int | None = None  # --time-budget: fixed from the measured rate, and saved
        self.log = LossLog(cfg.log_every)
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, batch_in_epoch) of the last save
        self._last_good: int | None = None  # step of the last checkpoint this run wrote or resumed from
        self.progress = Progress(dist.is_main)  # what the run says (rank 0 only)

    def say(self, line: str) -> None:
        self.progress.say(line)

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
            "generator": self.gen.get_state(),  # every draw of the objective
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "ema_updates": self.ema.updates if self.ema else 0,  # the EMA decay schedule's position
            **self.log.state_dict(),  # "history" and "loss_window"
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
        self.log.load_state_dict(st, self.device)
        if st.get("planned_steps") is not None and self.cfg.time_budget:
            self.planned_steps = int(st["planned_steps"])

    def resume(self) -> bool:
        """Continue the checkpoint in ``model_dir`` if there is one (:func:`~fastflow.checkpoint.load_for_resume`
        refuses one of another model); says what it resumed, and which settings now differ."""
        ck = ckpt.load_for_resume(
            self.model_dir, self.model, self.ema.shadow if self.ema else None, self.mcfg, self.cfg, self.STATE_KEYS
        )
        if ck is None:
            self.say(f"--resume: no checkpoint in {self.model_dir}; starting from scratch")
            return False
        try:
            self.load_state_dict(ck.state)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise UserError(
                f"--resume: {ck.state_path}: does not fit this run ({' '.join(str(e).split())[:160]})"
            ) from None
        if self.step != ck.step:
            raise UserError(f"--resume: {ck.state_path} is at step {self.step} but its manifest says {ck.step}")
        self._saved_at, self._last_good = (self.step, self.epoch, self.batch_in_epoch), self.step
        self.say(f"resumed from {ck.path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")
        if changed := changed_settings(ck.config.get("train") or {}, self.cfg):
            self.say(f"note: resuming with changed settings ({', '.join(changed)}); the run will differ from one left alone")  # fmt: skip
        return True

    def init_from(self, ck: ckpt.Checkpoint) -> str:
        """Start from ``ck``'s weights (``--init-from``, :func:`~fastflow.checkpoint.load_start`) in the model and
        the EMA; the optimizer, the step and the EMA schedule stay new. Returns which weights, for the start line."""
        which = ckpt.load_start(self.model, ck)
        broadcast_module(self.model, self.dist)  # every rank read the same file; this keeps them equal regardless
        if self.ema is not None:
            self.ema.shadow.load_state_dict(self.model.state_dict())
        return which

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss not yet logged or a weight is non-finite (one host sync).

        Runs before anything is written (checkpoint, sample grid), so a diverged run never replaces the last
        good checkpoint. Under DDP the weights are the same on every rank, so every rank decides the same.
        """
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        bad = self.log.first_bad(self.log.losses().cpu(), self.step)
        if bad is not None:
            self.diverged(bad)
        if not bool(weights_ok):
            self.diverged(self.step, "non-finite weights after")

    def diverged(self, step: int, what: str = "non-finite loss at") -> None:
        self.progress.close()  # the message goes on its own line, not after the progress bar
        note = ckpt.kept_note(self.model_dir, self._last_good)
        raise TrainingDiverged(f"{what} step {step}; training stopped; {note}")

    def save(self) -> None:
        """Write a checkpoint of the current state (rank 0), unless this exact state was saved already."""
        at = (self.step, self.epoch, self.batch_in_epoch)
        if self._saved_at == at:
            return
        self.check_finite()  # every rank: nothing non-finite is ever saved
        if self.dist.is_main:
            ema = self.ema.shadow if self.ema else None
            ckpt.save_checkpoint(self.model_dir, self.model, self.mcfg, self.cfg, ema, self.state_dict(), self.step)
        self._saved_at, self._last_good = at, self.step
