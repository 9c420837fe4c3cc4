"""Sample grids as PNG files."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import atomic_save

__all__ = ["grid_labels", "save_grid"]


def grid_labels(device, per_digit: int = 10) -> torch.Tensor:
    """Labels [10·per_digit] int64, digit by digit: row k of a grid is digit k."""
    return torch.arange(10, device=device).repeat_interleave(per_digit)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10) -> Path:
    """Write images [N, 1, 28, 28] in [0, 1] as a PNG grid, atomically."""
    from torchvision.utils import save_image

    return atomic_save(path, lambda tmp: save_image(images.float().cpu(), tmp, nrow=nrow, padding=2, format="png"))
