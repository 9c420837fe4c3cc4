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

MeanFlow distillation (``--objective meanflow-distill``): a teacher flow-matching model's own trajectories, its states at the
K + 1 times of a uniform grid, give the average velocity of the teacher's flow between any two of those times
exactly, u(x_tᵢ, tᵢ, tⱼ) = (x_tⱼ − x_tᵢ)/(tⱼ − tᵢ) (:func:`trajectory_pairs`); the loss is the squared error to it
with MeanFlow's adaptive weight (:func:`average_velocity_loss`): no JVP, and the long jumps are taught directly, not
bootstrapped from short ones.
"""

from __future__ import annotations

import torch

import kernels

__all__ = [
    "sample_time",
    "sample_time_pair",
    "drop_labels",
    "flow_matching_loss",
    "meanflow_target",
    "meanflow_loss",
    "grid_pairs",
    "trajectory_pairs",
    "average_velocity_loss",
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


ADAPTIVE_C = 1e-3  # MeanFlow's adaptive loss weight 1/(|Δ|² + c)^p: the paper's c


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
    *,
    guidance: float = 1.0,
    adaptive_p: float = 1.0,
    adaptive_c: float = ADAPTIVE_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MeanFlow training loss. z, eps (B, 1, 28, 28) fp32; t ≤ s (B,); y (B,) int64 with dropped labels
    already :data:`NO_LABEL`; ``ctx`` the autocast context of the network's gradient-taking forward.

    ``guidance`` w: the guided target ṽ = w·(z − ε) + (1 − w)·u(x_t, t, t | no label) for the images that kept
    their label (the MeanFlow paper's guidance: the guided field is learnt, so sampling needs one call a step);
    1: off. ``adaptive_p``, ``adaptive_c``: the per-image loss weight 1/(|Δ|² + c)^p, detached (|Δ|² the image's
    mean squared error); p = 0: plain MSE.

    Returns ``(loss, mse)``, both 0-d fp32: ``loss`` to differentiate (adaptively weighted), ``mse`` the plain
    mean squared error to the target, detached (what the training log shows, comparable across p).
    Costs one forward (and backward) with gradients, one forward-mode JVP (about two forwards), and under
    guidance one more forward without gradients."""
    x_t, _ = kernels.flow_path(z, eps, t, with_target=False)  # [B, 1, 28, 28] fp32
    v = z - eps  # [B, 1, 28, 28] fp32: the conditional velocity
    if guidance != 1.0:
        w = guidance
        with torch.no_grad(), ctx:
            u_uncond = model(x_t, t, torch.full_like(y, NO_LABEL)).float()  # u(x_t, t, t | no label)
        guided = w * v + (1.0 - w) * u_uncond
        v = torch.where((y == NO_LABEL).view(-1, 1, 1, 1), v, guided)  # dropped labels keep the plain v
    target, _ = meanflow_target(model, x_t, t, s, y, v)  # [B, 1, 28, 28] fp32, detached
    with ctx:
        u = model(x_t, t, y, s)
    return _adaptive((u.float() - target).pow(2).mean(dim=(1, 2, 3)), adaptive_p, adaptive_c)  # per image: [B]


def _adaptive(per_image: torch.Tensor, p: float, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, mse)`` from the per-image mean squared errors [B]: the loss adaptively weighted by
    1/(|Δ|² + c)^p (detached; p = 0: the plain mean), the mse plain and detached."""
    mse = per_image.mean()
    if p == 0:
        return mse, mse.detach()
    weight = (per_image.detach() + c).pow(-p)  # [B]
    return (weight * per_image).mean(), mse.detach()


def grid_pairs(
    batch: int, k: int, long_share: float, generator: torch.Generator | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j), each of shape (batch,), i < j, into the k + 1 states of a trajectory: (0, k), the whole
    path that one jump takes, in a share ``long_share``; otherwise one of the other k(k + 1)/2 − 1 pairs,
    uniformly (for k = 1, (0, 1) always). Two draws from ``generator``: the share mask, then the pair."""
    pairs = torch.tensor([(i, j) for i in range(k + 1) for j in range(i + 1, k + 1) if (i, j) != (0, k)] or [(0, k)])
    long = torch.rand(batch, generator=generator, device=device) < long_share  # [B]
    pick = torch.randint(0, len(pairs), (batch,), generator=generator, device=device)  # [B]
    ij = pairs.to(device)[pick]  # [B, 2]
    whole = torch.tensor([0, k], device=device)
    ij = torch.where(long[:, None], whole, ij)
    return ij[:, 0], ij[:, 1]


def trajectory_pairs(
    states: torch.Tensor, times: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From trajectories ``states`` (B, k + 1, ...) fp32 at ``times`` (k + 1,), for each row b the pair of states
    i_b < j_b: returns ``(x, t, s, u)`` with x = states[b, i_b] (B, ...), t = times[i], s = times[j] (B,) and the
    average velocity between them u = (states[b, j_b] − x)/(s − t) (B, ...) fp32: the target of the jump."""
    rows = torch.arange(len(states), device=states.device)
    x, x_s = states[rows, i], states[rows, j]  # [B, ...] each
    t, s = times[i], times[j]  # [B] each
    u = (x_s - x) / (s - t).view(-1, *(1,) * (x.dim() - 1))
    return x, t, s, u


def average_velocity_loss(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    ctx,
    *,
    adaptive_p: float = 1.0,
    adaptive_c: float = ADAPTIVE_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow distillation's loss: the squared error between u_θ(x, t, s, y) and the target average velocity
    ``u`` (:func:`trajectory_pairs`), with MeanFlow's adaptive weight (as :func:`meanflow_loss`; p = 0: plain
    MSE). x, u (B, 1, 28, 28) fp32; t < s (B,); y (B,) int64. Returns ``(loss, mse)`` as :func:`meanflow_loss`."""
    with ctx:
        pred = model(x, t, y, s)
    return _adaptive((pred.float() - u).pow(2).flatten(1).mean(dim=1), adaptive_p, adaptive_c)
