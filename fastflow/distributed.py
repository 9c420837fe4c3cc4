"""Process-group set-up for torchrun; a plain ``python -m fastflow.train`` stays single-process."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Dist", "init_distributed", "barrier", "shutdown"]


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Dist:
    """Single process for now (torchrun support: issue 3)."""
    return Dist()


def barrier(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(dist: Dist) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
