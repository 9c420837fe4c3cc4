"""The Fréchet distance against closed forms."""

from __future__ import annotations

import math

import torch

from fastflow.fid import feature_stats, fid_from_features, frechet_distance


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_diagonal_covariances():
    """N(μ₁, diag a) vs N(μ₂, diag b): d² = ‖μ₁ − μ₂‖² + Σ (√aᵢ − √bᵢ)²."""
    g = torch.Generator().manual_seed(0)
    d = 17
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64) * 3
    want = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-12), (got, want)


def test_rotated_diagonal_covariances():
    """Rotating both Gaussians by the same orthogonal Q leaves d² unchanged (covariances no longer diagonal)."""
    g = torch.Generator().manual_seed(1)
    d = 9
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    want = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert math.isclose(got, want, rel_tol=1e-9), (got, want)


def test_non_commuting_2x2():
    """For 2×2 SPD Σ₁, Σ₂ (which need not commute): tr (Σ₁^½ Σ₂ Σ₁^½)^½ = √(tr Σ₁Σ₂ + 2√(det Σ₁ det Σ₂)),
    since a 2×2 PSD M has tr √M = √(tr M + 2√det M)."""
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        s1, s2 = _spd(2, g), _spd(2, g)
        assert not torch.allclose(s1 @ s2, s2 @ s1)
        mu = torch.zeros(2, dtype=torch.float64)
        tr_covmean = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
        want = float(torch.trace(s1) + torch.trace(s2)) - 2 * tr_covmean
        got = frechet_distance(mu, s1, mu, s2)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (got, want)


def test_symmetric_and_zero_on_itself():
    g = torch.Generator().manual_seed(3)
    s1, s2 = _spd(6, g), _spd(6, g)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    assert math.isclose(frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1), rel_tol=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_identical_feature_sets_give_zero():
    x = torch.randn(500, 128, generator=torch.Generator().manual_seed(4))
    assert abs(fid_from_features(x, x)) < 1e-8
    # Rank-deficient (N < D) sets still work: the clamped eigenvalues keep the square roots real. The zero
    # eigenvalues come out as ±1e-15 and their square roots (3e-8 each) leave an error of a few 1e-8 relative
    # to the trace, so judge it relative to tr Σ (128 here), not absolutely.
    y = torch.randn(50, 128, generator=torch.Generator().manual_seed(5))
    tr = float(torch.trace(feature_stats(y)[1]))
    assert abs(fid_from_features(y, y)) < 1e-7 * tr


def test_samples_converge_to_the_closed_form():
    """Features drawn from two known Gaussians: the estimate from 200000 samples is near the closed form."""
    g = torch.Generator().manual_seed(6)
    n, d = 200_000, 4
    a, b = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([0.5, 1.0, 1.0, 3.0])
    mu2 = torch.tensor([0.3, -0.2, 0.0, 0.1])
    x = torch.randn(n, d, generator=g) * a.sqrt()
    y = mu2 + torch.randn(n, d, generator=g) * b.sqrt()
    want = float(mu2.double().square().sum() + (a.double().sqrt() - b.double().sqrt()).square().sum())
    assert abs(fid_from_features(x, y) - want) < 0.02 * want + 1e-3


def test_feature_stats():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(7))
    mu, cov = feature_stats(x)
    assert mu.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(x.double().T))
