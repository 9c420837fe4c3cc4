"""Exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_decay_at"]


def ema_decay_at(step: int, decay: float, warmup: int) -> float:
    """Decay for update number ``step`` (0-based): ``min(decay, (1 + step) / (warmup + step))``, so early
    averages are not dominated by the random initialisation: the first update uses 1/warmup (at warmup 100 the
    shadow becomes 99% the current weights), and the ramp reaches ``decay`` after about
    ``(decay·warmup − 1)/(1 − decay)`` updates (98 900 for 0.999 and 100). ``warmup`` 0 or 1: ``decay`` from
    the start. At warmup 2, until the ramp meets ``decay``, the shadow is the plain mean of the initial weights
    and every update so far."""
    if warmup <= 0:
        return decay
    return min(decay, (1 + step) / (warmup + step))


class EMA:
    """``shadow`` is a copy of the model whose floating-point parameters follow θ_ema ← d·θ_ema + (1 − d)·θ.

    ``updates`` is a Python int (no device read per step) saved with the training state, so a resumed run
    continues the same decay schedule.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 100):
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self._ema = [p for p in self.shadow.parameters()]
        self._ema_buffers = list(self.shadow.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay_at(self.updates, self.decay, self.warmup)
        torch._foreach_lerp_(self._ema, [p.detach() for p in model.parameters()], 1.0 - d)
        for b_ema, b in zip(self._ema_buffers, model.buffers()):
            b_ema.copy_(b)
        self.updates += 1
