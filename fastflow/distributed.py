"""Process-group set-up for torchrun; a plain ``python -m fastflow.train`` stays single-process.

torchrun starts one process per device and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed` reads it: NCCL on
CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. Without those variables (or with
``WORLD_SIZE=1``) no process group is created and every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as tdist

from .errors import UserError

__all__ = [
    "Dist",
    "init_distributed",
    "barrier",
    "shutdown",
    "broadcast_module",
    "local_main_first",
    "all_reduce_sum",
    "from_main",
    "mean_over_ranks",
    "check_same",
    "record_errors",
    "TIMEOUT",
]

# How long a collective waits for a rank that neither answers nor exits (a dead peer is usually noticed at
# once: torchrun tears the group down when a worker exits non-zero). The longest legitimate wait is the others
# at the epoch-end barrier while rank 0 writes a checkpoint and a sample grid: seconds, not minutes.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the job: global ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def group(self):
        """The process group the train step averages gradients over (None in one process)."""
        return tdist.group.WORLD if self.enabled else None

    def local_device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` on CUDA under torchrun, else ``device``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_distributed(device: torch.device) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; otherwise return the single-process :class:`Dist`.

    ``device`` is the resolved training device type: NCCL when it is CUDA, gloo when it is the CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Dist()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not tdist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist = Dist(rank, world_size, local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA devices; "
                "pass torchrun --nproc_per_node at most the GPU count"
            )
        torch.cuda.set_device(local_rank)
        # device_id binds the communicator to this GPU now (no guessing in barrier(), eager NCCL init).
        tdist.init_process_group("nccl", timeout=TIMEOUT, device_id=dist.local_device(device))
    elif device.type == "cpu":
        tdist.init_process_group("gloo", timeout=TIMEOUT)
    else:
        raise UserError(f"distributed training supports cuda (NCCL) and cpu (gloo), not {device.type}")
    return dist


def barrier(dist: Dist) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.barrier()


def shutdown(dist: Dist) -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def broadcast_module(model: torch.nn.Module, dist: Dist) -> None:
    """Make every rank's parameters and buffers rank 0's (what DDP does when it wraps a model); a no-op in one
    process. After this, equal averaged gradients (:func:`fastflow.step.average_over_ranks`) keep them equal."""
    if not dist.enabled:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            tdist.broadcast(t.data, src=0)


@contextlib.contextmanager
def local_main_first(dist: Dist) -> Iterator[None]:
    """Run the body on each machine's local rank 0 first, then on the others (one data download per machine)."""
    if dist.enabled and not dist.is_local_main:
        barrier(dist)
    yield
    if dist.enabled and dist.is_local_main:
        barrier(dist)


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum ``x`` over ranks in place (a no-op in one process); gloo has no AVG, so callers divide."""
    if dist.enabled:
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def from_main(value: int, dist: Dist, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (a decision one rank makes for all); unchanged in one process."""
    if not dist.enabled:
        return value
    return int(all_reduce_sum(torch.tensor([value if dist.is_main else 0], device=device), dist))


def mean_over_ranks(values: torch.Tensor, flag: bool, dist: Dist) -> tuple[torch.Tensor, bool]:
    """Each of ``values`` [W] averaged over the ranks, and whether any rank raised ``flag``, in one all-reduce
    (a log window's losses and a stop request). One process: both unchanged. Equal shards: the mean of the ranks'
    means is the global mean."""
    if not dist.enabled:
        return values, flag
    packed = all_reduce_sum(torch.cat([values, values.new_tensor([1.0 if flag else 0.0])]), dist).cpu()  # [W + 1]
    return packed[:-1] / dist.world_size, bool(packed[-1] > 0)


def check_same(value, dist: Dist, what: str, hint: str = "") -> None:
    """Raise :class:`UserError` on every rank unless all ranks hold the same ``value`` (a small picklable)."""
    if not dist.enabled:
        return
    values: list = [None] * dist.world_size
    tdist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"{what} differs between ranks ({seen})" + (f"; {hint}" if hint else ""))


def record_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Under torchrun, hand an uncaught exception's traceback to torchrun's failure summary ("Root Cause").

    torchrun sets ``TORCHELASTIC_ERROR_FILE`` per worker; torch's ``@record`` writes the exception there. Outside
    torchrun ``main`` runs as it is (``@record`` would also turn on faulthandler).
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            return main(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(main)(*args, **kwargs)

    return wrapper
