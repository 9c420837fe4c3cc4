"""The closed form the MeanFlow tests check against (test_meanflow.py, test_meanflow_distill.py).

1-D data z ~ N(μ, σ²) and noise ε ~ N(0, 1) give x_t ~ N(m(t), sd(t)²) with m(t) = t·μ and
sd(t)² = t²σ² + (1 − t)². The flow of such a path keeps each point's standard score, so
x_s = m(s) + sd(s)/sd(t)·(x_t − m(t)), and u, v follow exactly. The field is curved in time (u ≠ v for s > t).
"""

from __future__ import annotations

import torch

MU, SIGMA = 0.7, 0.5


def m(t):
    return t * MU


def sd(t):
    return torch.sqrt(t * t * SIGMA**2 + (1 - t) ** 2)


def flow(x0, t):
    """x_t of the exact flow from x_0 (t = 0, where m = 0 and sd = 1)."""
    return m(t) + sd(t) * x0


def v(x, t):
    """The marginal field: m'(t) + sd'(t)/sd(t)·(x − m(t))."""
    dsd = (t * SIGMA**2 - (1 - t)) / sd(t)
    return MU + dsd / sd(t) * (x - m(t))


def u(x, t, s):
    """The exact average velocity over [t, s], s > t."""
    return (m(s) - m(t) + (sd(s) / sd(t) - 1) * (x - m(t))) / (s - t)
