"""When things happen in a training run: the learning rate at each step, the step count a time budget buys, and
the steps that end in a checkpoint. Pure functions of steps and clock readings; the trainer reads the clock."""

from __future__ import annotations

import math

from .config import TrainConfig

__all__ = ["lr_at", "TimeBudget", "checkpoint_due", "PROBE", "UNPLANNED"]

# --time-budget: the step rate is measured over steps [PROBE[0], PROBE[1]) of the run (the first ones pay for
# compilation and warm caches, and that time counts against the budget all the same).
PROBE = (5, 25)
UNPLANNED = 10**9  # the step count until a time budget is planned (the lr schedule is then ~flat)


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


def checkpoint_due(step: int, epoch_end: bool, last: bool, every: int) -> bool:
    """A checkpoint is written at every epoch end, at the last step (the end, or a stop) and every ``every`` steps
    (0: never in between)."""
    return epoch_end or last or bool(every and step % every == 0)


class TimeBudget:
    """``--time-budget``: the step count that ends training about ``seconds`` after ``start``.

    The rate is first measured over the probe steps (:data:`PROBE`, counted from the run's first step here), then
    again over every log window, so that a machine that slows down (or speeds up) mid-run still ends on time; the
    cosine schedule follows the new count. A run resumed with a saved plan keeps it (``planned``): no probe, no
    re-planning.

    Call :meth:`at_step` after every step (it says when it wants a clock reading, :meth:`due`) and :meth:`at_log`
    after every log window; each returns ``(steps, rate in steps/s)`` when it plans, else None."""

    def __init__(self, seconds: float, step: int, start: float, planned: bool = False):
        self.seconds, self.start = seconds, start
        self.probe = None if planned else (step + PROBE[0], step + PROBE[1])
        self.replanning = False
        self._t_probe: float | None = None

    def due(self, step: int) -> bool:
        """Whether :meth:`at_step` needs the clock after ``step`` (the probe's first and last step)."""
        return self.probe is not None and step in self.probe

    def at_step(self, step: int, now: float) -> tuple[int, float] | None:
        if not self.due(step):
            return None
        if step == self.probe[0]:
            self._t_probe = now
            return None
        n = self.probe[1] - self.probe[0]
        self.probe, self.replanning = None, True
        return self._plan(step, now, n, self._t_probe)

    def at_log(self, step: int, now: float, steps: int, since: float) -> tuple[int, float] | None:
        """After a log window of ``steps`` steps timed from ``since``: the plan again, from the first plan on."""
        return self._plan(step, now, steps, since) if self.replanning else None

    def _plan(self, step: int, now: float, steps: int, since: float) -> tuple[int, float]:
        rate = steps / max(now - since, 1e-9)  # steps per second
        left = self.seconds - (now - self.start)
        return step + max(0, int(left * rate)), rate
