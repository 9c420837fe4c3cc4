"""Fréchet distance between two sets of features, each summarised by a Gaussian (mean, covariance).

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁^½ Σ₂ Σ₁^½)^½)

The matrix square roots come from eigen-decompositions of symmetric matrices in float64: Σ₁^½ from Σ₁'s
eigenpairs, then tr((Σ₁^½ Σ₂ Σ₁^½)^½) as the sum of the square roots of that symmetric PSD product's eigenvalues
(it has the same spectrum as Σ₁Σ₂, whose square root is not symmetric and which scipy's ``sqrtm`` attacks with a
Schur decomposition instead). Eigenvalues that round below zero are clamped to 0.
"""

from __future__ import annotations

import torch

__all__ = ["feature_stats", "frechet_distance", "fid_from_features"]


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) of ``features`` [N, D], in float64, the covariance unbiased (N − 1)."""
    f = features.detach().to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def _sym_sqrt(s: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(0.5 * (s + s.T))
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2); inputs [D] and [D, D]."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return float(d)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))
