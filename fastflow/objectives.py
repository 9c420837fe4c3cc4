"""The training objectives: what a step draws, what it minimises, and what it needs before training starts.

One interface, :class:`Objective`, three implementations (``--objective``):

- ``flow`` (:class:`FlowMatching`): flow matching on MNIST, the field v(x, t); sampled with an ODE solver.
- ``meanflow`` (:class:`MeanFlow`): MeanFlow (Geng et al. 2025) on MNIST, the average velocity u(x, t, s) with
  its JVP target; sampled in a few jumps (``--solver meanflow``).
- ``meanflow-distill`` (:class:`MeanFlowDistill`): the same average velocity learnt from a flow-matching
  teacher's own trajectories (``--init-from``), where it is exact: no JVP.

The trainer asks its objective for the training set (:meth:`Objective.training_set`, made inside the time budget),
for each step's random draws (:meth:`Objective.draw`, from the checkpointed generator, outside any compiled graph),
and the train step asks it for the loss (:meth:`Objective.loss`, inside the graph). A batch is a named tuple of
tensors whose fields say what they are; the math lives in :mod:`fastflow.path`.

A new objective: a class with these three methods and the three class attributes, a choice in
``TrainConfig.objective`` and a branch in :func:`make_objective`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
from tqdm import tqdm

from . import path as fm
from .checkpoint import Checkpoint, build_model
from .config import TrainConfig
from .data import MNISTArrays, load_mnist
from .distributed import Dist, all_reduce_sum, local_main_first
from .errors import UserError
from .solvers import DEFAULT_INTERVAL, GuidedField, SamplerSpec, initial_noise, integrate, time_grid

__all__ = [
    "Objective",
    "Run",
    "FlowBatch",
    "MeanFlowBatch",
    "PairBatch",
    "FlowMatching",
    "MeanFlow",
    "MeanFlowDistill",
    "make_objective",
    "TRAJECTORY_CHUNK",
]

TRAJECTORY_CHUNK = 256  # distillation: trajectories made per teacher call, each chunk from its own seed


class FlowBatch(NamedTuple):
    z: torch.Tensor  # [B, 1, 28, 28] fp32 images in [-1, 1]
    y: torch.Tensor  # [B] int64 labels, the dropped ones NO_LABEL
    t: torch.Tensor  # [B] fp32 times
    eps: torch.Tensor  # [B, 1, 28, 28] fp32 noise


class MeanFlowBatch(NamedTuple):
    z: torch.Tensor  # [B, 1, 28, 28]
    y: torch.Tensor  # [B]
    t: torch.Tensor  # [B]
    s: torch.Tensor  # [B] the later time, s >= t
    eps: torch.Tensor  # [B, 1, 28, 28]


class PairBatch(NamedTuple):
    x: torch.Tensor  # [B, 1, 28, 28] a teacher trajectory's state at t
    y: torch.Tensor  # [B] its label (none dropped)
    t: torch.Tensor  # [B]
    s: torch.Tensor  # [B] the time of the later state, s > t
    u: torch.Tensor  # [B, 1, 28, 28] the exact average velocity from t to s: the target


@dataclass(frozen=True)
class Run:
    """What an objective may need to make its training set: this process's device and place in the job, the
    network's autocast context and the run's seed."""

    device: torch.device
    dist: Dist
    ctx: object
    seed: int


class Objective(Protocol):
    name: ClassVar[str]  # the --objective value
    mean_flow: ClassVar[bool]  # its U-Net takes the later time s (ModelConfig.mean_flow)
    solver: ClassVar[str]  # how its model is sampled: the epoch-end grids' solver
    items: ClassVar[str]  # what the training set holds, for messages

    @property
    def size(self) -> int:
        """Items in the training set (known before it is made)."""

    def training_set(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """(items [N, ...], labels [N]): uint8 images [N, 28, 28] (the loader scales them to [-1, 1]) or fp32
        items. Called once at the start of training, inside the time budget."""

    def draw(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, dist: Dist) -> tuple:
        """One step's batch from the loader's (x, y) and the run's generator.

        Under torchrun every rank draws the randomness of the whole global batch (the same generator state on
        all ranks) and keeps its own rows: N ranks then train as one process at the same global batch, up to
        fp32 summation order. In one process the draws are unchanged."""

    def loss(self, model, batch: tuple, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, the loss to log), both 0-d fp32; runs inside the (compiled) step."""


def _rows(b: int, dist: Dist) -> tuple[int, slice]:
    """The global batch size and this rank's rows of it."""
    return b * dist.world_size, slice(b * dist.rank, b * (dist.rank + 1))


class _OnMNIST:
    """The objectives that learn from MNIST: its training set (or the first ``subset`` images)."""

    items: ClassVar[str] = "training images"

    def __init__(self, data: MNISTArrays):
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data.labels)

    def training_set(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.images, self.data.labels


class FlowMatching(_OnMNIST):
    """Flow matching: x_t = t·z + (1 − t)·ε, the loss ‖v_θ(x_t, t, y) − (z − ε)‖² (:func:`fm.flow_matching_loss`);
    t uniform or logit-normal, each label dropped with probability ``label_drop``."""

    name, mean_flow, solver = "flow", False, "euler"

    def __init__(self, data: MNISTArrays, time_sampling: str = "uniform", label_drop: float = 0.1):
        super().__init__(data)
        self.time_sampling, self.label_drop = time_sampling, label_drop

    def draw(self, x, y, gen, dist) -> FlowBatch:
        n, mine = _rows(x.shape[0], dist)
        t = fm.sample_time(n, self.time_sampling, gen, x.device)[mine]  # [B]
        eps = torch.randn((n, *x.shape[1:]), generator=gen, device=x.device)[mine]  # [B, 1, 28, 28]
        y = fm.drop_labels(y.repeat(dist.world_size), self.label_drop, gen)[mine]  # the mask of the global batch
        return FlowBatch(x, y, t, eps)

    @staticmethod
    def loss(model, batch: FlowBatch, ctx):
        loss = fm.flow_matching_loss(model, *batch, ctx)
        return loss, loss


class MeanFlow(_OnMNIST):
    """MeanFlow: (t, s) with t ≤ s (s = t in a share ``equal_share``: flow matching on u(x, t, t)), the target
    v + (s − t)·du/dt from one JVP, guided at ``guidance`` inside training, with the adaptive loss weight
    (:func:`fm.meanflow_loss`)."""

    name, mean_flow, solver = "meanflow", True, "meanflow"

    def __init__(
        self,
        data: MNISTArrays,
        label_drop: float = 0.1,
        equal_share: float = 0.75,
        time_mean: float = 0.4,
        time_std: float = 1.0,
        guidance: float = 1.0,
        adaptive_p: float = 1.0,
    ):
        super().__init__(data)
        self.label_drop, self.equal_share, self.time_mean, self.time_std = label_drop, equal_share, time_mean, time_std
        self.guidance, self.adaptive_p = guidance, adaptive_p

    def draw(self, x, y, gen, dist) -> MeanFlowBatch:
        n, mine = _rows(x.shape[0], dist)
        t, s = fm.sample_time_pair(n, self.time_mean, self.time_std, self.equal_share, gen, x.device)
        eps = torch.randn((n, *x.shape[1:]), generator=gen, device=x.device)[mine]  # [B, 1, 28, 28]
        y = fm.drop_labels(y.repeat(dist.world_size), self.label_drop, gen)[mine]
        return MeanFlowBatch(x, y, t[mine], s[mine], eps)

    def loss(self, model, batch: MeanFlowBatch, ctx):
        return fm.meanflow_loss(model, *batch, ctx, guidance=self.guidance, adaptive_p=self.adaptive_p)


class MeanFlowDistill:
    """MeanFlow distillation: the teacher's trajectories, its states at the ``steps + 1`` times of a uniform grid
    by that many midpoint steps guided at ``guidance`` in [0.2, 0.7], and for two states x_t, x_s of one of them
    the exact average velocity u = (x_s − x_t)/(s − t) as the target (:func:`fm.average_velocity_loss`, with the
    adaptive weight); the whole path (0, 1), the one jump, in a share ``long_share`` of the pairs. No label is
    dropped: the guidance is the teacher's.

    The set is made in chunks of :data:`TRAJECTORY_CHUNK`, chunk c from noise and labels of its own seed, the
    chunks shared out over the ranks and summed into every rank's copy (one all-reduce): it is the same for any
    number of ranks, and a resumed run makes it again, the same."""

    name, mean_flow, solver = "meanflow-distill", True, "meanflow"
    items: ClassVar[str] = "trajectories"

    def __init__(
        self,
        teacher: Checkpoint,
        steps: int = 4,
        trajectories: int = 16384,
        long_share: float = 0.7,
        guidance: float = 1.75,
        adaptive_p: float = 1.0,
    ):
        if teacher.model_cfg.mean_flow:
            raise UserError(
                f"--init-from: {teacher.path} holds a MeanFlow model; the teacher must be a flow-matching one"
            )
        self.teacher, self.steps, self.long_share = teacher, steps, long_share
        self.guidance, self.adaptive_p = guidance, adaptive_p
        self.trajectories = -(-trajectories // TRAJECTORY_CHUNK) * TRAJECTORY_CHUNK  # rounded up to whole chunks
        self.times = time_grid(steps)  # [steps + 1] the trajectories' times

    @property
    def size(self) -> int:
        return self.trajectories

    @torch.no_grad()
    def training_set(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        dist, k, n = run.dist, self.steps, self.trajectories
        t0 = time.perf_counter()
        teacher = build_model(self.teacher).to(run.device).eval().requires_grad_(False)
        spec = SamplerSpec("midpoint", k, self.guidance, interval=DEFAULT_INTERVAL)
        self.times = times = self.times.to(run.device)
        states = torch.zeros((n, k + 1, teacher.cfg.in_channels, 28, 28), device=run.device)  # [N, k + 1, 1, 28, 28]
        labels = torch.zeros(n, dtype=torch.int64, device=run.device)
        for c in range(dist.rank, n // TRAJECTORY_CHUNK, dist.world_size):
            g = torch.Generator(device=run.device).manual_seed(run.seed * 1_000_003 + c)
            y = torch.randint(0, teacher.cfg.num_classes, (TRAJECTORY_CHUNK,), generator=g, device=run.device)
            x = initial_noise(y, tuple(states.shape[2:]), g)
            out: list[torch.Tensor] = []
            field = GuidedField(teacher, y, self.guidance, run.ctx, DEFAULT_INTERVAL)
            integrate(field, x, times, "midpoint", spec.plan, states=out)
            rows = slice(c * TRAJECTORY_CHUNK, (c + 1) * TRAJECTORY_CHUNK)
            states[rows], labels[rows] = torch.stack(out, 1), y
        all_reduce_sum(states, dist)  # each row is non-zero on one rank only: the sum is that rank's row, exactly
        all_reduce_sum(labels, dist)
        if dist.is_main:
            lo, hi = DEFAULT_INTERVAL
            tqdm.write(
                f"{self.name}: {n} trajectories of the teacher ({k} midpoint steps, w = {self.guidance:g} in "
                f"[{lo:g}, {hi:g}]) in {time.perf_counter() - t0:.1f} s"
            )
        return states, labels

    def draw(self, x, y, gen, dist) -> PairBatch:
        n, mine = _rows(x.shape[0], dist)  # x: trajectories [B, k + 1, 1, 28, 28]
        i, j = fm.grid_pairs(n, self.steps, self.long_share, gen, x.device)  # [n] each
        x, t, s, u = fm.trajectory_pairs(x, self.times, i[mine], j[mine])
        return PairBatch(x, y, t, s, u)

    def loss(self, model, batch: PairBatch, ctx):
        return fm.average_velocity_loss(model, *batch, ctx, adaptive_p=self.adaptive_p)


def make_objective(
    cfg: TrainConfig, dist: Dist = Dist(), data: MNISTArrays | None = None, teacher: Checkpoint | None = None
) -> Objective:
    """The objective ``cfg`` asks for. ``data``: the training images (None: MNIST from ``cfg.data_root``, read
    once per machine first); ``teacher``: ``--init-from``'s checkpoint, which distillation learns from."""
    if cfg.objective == "meanflow-distill":
        if teacher is None:
            raise UserError("--objective meanflow-distill learns from a teacher's trajectories: give --init-from")
        return MeanFlowDistill(
            teacher, cfg.distill_steps, cfg.distill_trajectories, cfg.distill_long_share, cfg.teacher_guidance,
            cfg.mf_adaptive_p,
        )  # fmt: skip
    if data is None:
        with local_main_first(dist):  # one offline rebuild / download per machine, not one per rank
            data = load_mnist(cfg.data_root, train=True, verbose=dist.is_main)
    data = MNISTArrays(data.images[: cfg.subset or None], data.labels[: cfg.subset or None])
    if cfg.objective == "meanflow":
        return MeanFlow(
            data, cfg.label_drop, cfg.mf_equal_share, cfg.mf_time_mean, cfg.mf_time_std, cfg.mf_guidance,
            cfg.mf_adaptive_p,
        )  # fmt: skip
    return FlowMatching(data, cfg.time_sampling, cfg.label_drop)
