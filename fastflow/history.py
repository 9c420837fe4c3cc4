"""The loss history of a training run: one row per log window, written as ``loss.csv`` and ``loss.png``."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import atomic_save, atomic_write_text

__all__ = ["LossLog", "write_loss_history"]


class LossLog:
    """The losses of the steps since the last log line (0-d device tensors: reading them is the loop's only host
    synchronisation) and the rows logged so far, ``[step, epoch, mean loss, lr, images/s]``. Both are saved with
    the training state, so a resumed run logs the same windows as an uninterrupted one."""

    def __init__(self, every: int):
        self.every = every
        self.window: list[torch.Tensor] = []
        self.rows: list[list[float]] = []

    def add(self, loss: torch.Tensor) -> None:
        self.window.append(loss)

    @property
    def full(self) -> bool:
        return len(self.window) >= self.every

    def losses(self) -> torch.Tensor:
        """The window's losses [W] fp32, on the device (empty: a 0-element tensor)."""
        return torch.stack(self.window).float() if self.window else torch.zeros(0)

    def first_bad(self, losses: torch.Tensor, step: int) -> int | None:
        """The step of the window's first non-finite loss (``losses`` read back, the window ending at ``step``)."""
        bad = (~torch.isfinite(losses)).nonzero()
        return step - len(self.window) + int(bad[0]) + 1 if len(bad) else None

    def log(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        self.rows.append([step, epoch, loss, lr, images_per_s])
        self.window = []

    def state_dict(self) -> dict:
        return {"history": self.rows, "loss_window": self.losses().cpu() if self.window else torch.zeros(0)}

    def load_state_dict(self, st: dict, device: torch.device) -> None:
        self.rows = [[float(v) for v in r] for r in st["history"]]
        self.window = [v.to(device) for v in torch.as_tensor(st.get("loss_window", [])).float().unbind()]


def write_loss_history(rows: list[list[float]], result_dir: Path) -> None:
    """``loss.csv`` (step, epoch, loss, lr, images/s) and ``loss.png``."""
    lines = ["step,epoch,loss,lr,images_per_s"] + [
        f"{int(s)},{int(e)},{loss:.6f},{lr:.3e},{ips:.1f}" for s, e, loss, lr, ips in rows
    ]
    atomic_write_text(result_dir / "loss.csv", "\n".join(lines) + "\n")
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r[0] for r in rows], [r[2] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE to the target)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(result_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
