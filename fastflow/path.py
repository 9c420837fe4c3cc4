"""The flow-matching path and loss, through the kernels' public ops; MeanFlow's target and loss.

Conventions (ARCHITECTURE.md): t = 0 is noise, t = 1 is data; x_t = t·z + (1 − t)·ε; u = z − ε; the loss is
the MSE between v_θ(x_t, t, y) and u. The path math and the loss reduction stay fp32.

MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), in this project's time direction: the
network learns the average velocity from t to a later time s, u(x_t, t, s) = (1/(s − t))·∫ₜˢ v(x_τ, τ) dτ, so
that x_s = x_t + (s − t)·u and one jump x_1 = x_0 + u(x_0, 0, 1) is a sample. Differentiating
(s − t)·u = ∫ₜˢ v dτ in t (s fixed) gives the identity u = v + (s − t)·du/dt, where du/dt = v·∂ₓu + ∂ₜu is the
derivative along the trajectory: one forward-mode JVP of the network with tangents (v, 1, 0) for (x, t, s). The
training target is that right-hand side with the network's own du/dt, detached. (The paper's time runs the
other way, data at 0: its u = v − (t − r)·du/dt is the same identity.)
"""

from __future__ import annotations

import dataclasses

import torch

import kernels

__all__ = [
    "sample_time",
    "sample_time_pair",
    "drop_labels",
    "flow_matching_loss",
    "MeanFlowSettings",
    "meanflow_target",
    "meanflow_loss",
    "NO_LABEL",
]

NO_LABEL = 10  # the 11th label embedding: "no label", for classifier-free guidance


def sample_time(batch: int, kind: str, generator: torch.Generator | None, device) -> torch.Tensor:
    """t of shape (batch,) in (0, 1): ``uniform``, or ``logit-normal`` (sigmoid of N(0, 1), SD3's choice,
    which spends more of the training on the middle of the path where the field is hardest to learn)."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {kind!r}")


def sample_time_pair(
    batch: int, mean: float, std: float, equal_share: float, generator: torch.Generator | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's (t, s), each of shape (batch,), t ≤ s in (0, 1): two draws of sigmoid(N(mean, std²)) sorted,
    then s set to t in a share ``equal_share`` of the pairs (there the target is the flow-matching one).
    Three draws from ``generator``, in this order: the pair [batch, 2], then the mask [batch]."""
    pair = torch.sigmoid(torch.randn(batch, 2, generator=generator, device=device) * std + mean)  # [B, 2]
    t, s = pair.min(dim=1).values, pair.max(dim=1).values  # [B] each
    equal = torch.rand(batch, generator=generator, device=device) < equal_share
    return t, torch.where(equal, t, s)


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


@dataclasses.dataclass(frozen=True)
class MeanFlowSettings:
    """The MeanFlow loss's settings (TrainConfig's ``mf_*``).

    guidance: w of the guided target ṽ = w·(z − ε) + (1 − w)·u(x_t, t, t | no label) for the images that kept
        their label (the MeanFlow paper's guidance: the guided field is learnt, so sampling needs one call a
        step); 1: off.
    adaptive_p, adaptive_c: the per-image loss weight 1/(|Δ|² + c)^p, detached (|Δ|² the image's mean squared
        error); p = 0: plain MSE.
    """

    guidance: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def meanflow_target(model, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor, v: torch.Tensor):
    """``v + (s − t)·du/dt`` (detached) and ``du/dt``, with du/dt = v·∂ₓu + ∂ₜu the JVP of ``model(x, t, y, s)``
    along the tangents (v, 1, 0) for (x, t, s).

    x, v (B, ...) fp32 (or fp64 with an fp64 model); t, s (B,). The JVP runs without gradients, with autocast
    off (the network in the model's own precision), through ``torch.func.jvp`` and plain PyTorch ops (the
    network's GroupNorms decomposed: ``plain_norm``), so that torch.compile traces the forward-mode derivative;
    the network holds no custom autograd.Function, whose missing jvp a trace could drop. s is held fixed
    (closed over: a zero tangent)."""
    with torch.no_grad(), _no_autocast(x.device):
        _, dudt = torch.func.jvp(lambda x_, t_: model(x_, t_, y, s, plain_norm=True), (x, t), (v, torch.ones_like(t)))
        dudt = dudt.to(v.dtype)
        target = v + (s - t).view(-1, *(1,) * (v.dim() - 1)).to(v.dtype) * dudt
    return target, dudt


def meanflow_loss(
    model,
    z: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    eps: torch.Tensor,
    ctx,
    settings: MeanFlowSettings = MeanFlowSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MeanFlow training loss. z, eps (B, 1, 28, 28) fp32; t ≤ s (B,); y (B,) int64 with dropped labels
    already :data:`NO_LABEL`; ``ctx`` the autocast context of the network's gradient-taking forward.

    Returns ``(loss, mse)``, both 0-d fp32: ``loss`` to differentiate (adaptively weighted), ``mse`` the plain
    mean squared error to the target, detached (what the training log shows, comparable across p).
    Costs one forward (and backward) with gradients, one forward-mode JVP (about two forwards), and under
    guidance one more forward without gradients."""
    x_t, _ = kernels.flow_path(z, eps, t, with_target=False)  # [B, 1, 28, 28] fp32
    v = z - eps  # [B, 1, 28, 28] fp32: the conditional velocity
    if settings.guidance != 1.0:
        w = settings.guidance
        with torch.no_grad(), ctx:
            u_uncond = model(x_t, t, torch.full_like(y, NO_LABEL)).float()  # u(x_t, t, t | no label)
        guided = w * v + (1.0 - w) * u_uncond
        v = torch.where((y == NO_LABEL).view(-1, 1, 1, 1), v, guided)  # dropped labels keep the plain v
    target, _ = meanflow_target(model, x_t, t, s, y, v)  # [B, 1, 28, 28] fp32, detached
    with ctx:
        u = model(x_t, t, y, s)
    per_image = (u.float() - target).pow(2).mean(dim=(1, 2, 3))  # [B] fp32
    mse = per_image.mean()
    if settings.adaptive_p == 0:
        return mse, mse.detach()
    weight = (per_image.detach() + settings.adaptive_c).pow(-settings.adaptive_p)  # [B]
    return (weight * per_image).mean(), mse.detach()
