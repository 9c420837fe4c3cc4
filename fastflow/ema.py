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
    continues the same decay schedule. The train step (:mod:`fastflow.step`) asks :meth:`next_weight` for the
    weight of its update and calls :meth:`update_` inside its (possibly compiled) function.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 100):
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    @property
    def params(self) -> list[torch.Tensor]:
        """The shadow's parameters, in ``model.parameters()`` order."""
        return list(self.shadow.parameters())

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The shadow's buffers (copied, not averaged), in ``model.buffers()`` order."""
        return list(self.shadow.buffers())

    def next_weight(self) -> float:
        """``1 − decay`` of the next update, and count it (host only: the decay schedule is a Python int)."""
        w = 1.0 - ema_decay_at(self.updates, self.decay, self.warmup)
        self.updates += 1
        return w

    @staticmethod
    def update_(
        shadow: list[torch.Tensor],
        params: list[torch.Tensor],
        weight: torch.Tensor,
        shadow_buffers: list[torch.Tensor] = (),
        buffers: list[torch.Tensor] = (),
    ) -> None:
        """θ_ema ← θ_ema + w·(θ − θ_ema) as three foreach ops (one kernel each per dtype/device group, not one per
        tensor), with ``weight`` a 0-d tensor: no ``.item()``, no recompile when it changes, capturable in a CUDA
        graph. (``_foreach_lerp_`` takes a Python scalar weight, which a compiled step would specialise on.)"""
        with torch.no_grad():
            delta = torch._foreach_sub(params, shadow)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(shadow, delta)
            for be, b in zip(shadow_buffers, buffers):
                be.copy_(b)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One eager update from ``model`` (outside a train step: tests, tools)."""
        first = self.params[0]
        w = torch.tensor(self.next_weight(), dtype=first.dtype, device=first.device)
        self.update_(self.params, [p.detach() for p in model.parameters()], w, self.buffers, list(model.buffers()))
