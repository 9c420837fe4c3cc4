"""The flow-matching path and loss, through the kernels' public ops.

Conventions (ARCHITECTURE.md): t = 0 is noise, t = 1 is data; x_t = t·z + (1 − t)·ε; u = z − ε; the loss is
the MSE between v_θ(x_t, t, y) and u. The path math and the loss reduction stay fp32.
"""

from __future__ import annotations

import torch

import kernels

__all__ = ["sample_time", "drop_labels", "flow_matching_loss", "NO_LABEL"]

NO_LABEL = 10  # the 11th label embedding: "no label", for classifier-free guidance


def sample_time(batch: int, kind: str, generator: torch.Generator | None, device) -> torch.Tensor:
    """t of shape (batch,) in (0, 1): ``uniform``, or ``logit-normal`` (sigmoid of N(0, 1), SD3's choice,
    which spends more of the training on the middle of the path where the field is hardest to learn)."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {kind!r}")


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Replace each label by :data:`NO_LABEL` with probability ``p`` (per sample)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, NO_LABEL), y)


def flow_matching_loss(
    model, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ctx
) -> torch.Tensor:
    """One training loss. z, eps (B, 1, 28, 28) fp32; t (B,); y (B,) int64; ``ctx`` the autocast context.

    The network may run in bf16 under ``ctx``; x_t and the loss are computed in fp32 by the kernels.
    """
    x_t, _ = kernels.flow_path(z, eps, t, with_target=False)  # [B, 1, 28, 28] fp32; u is never stored
    with ctx:
        v = model(x_t, t, y)
    return kernels.flow_matching_loss(v, z, eps)
