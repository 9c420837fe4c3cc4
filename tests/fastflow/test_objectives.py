"""The objectives behind one interface: what each draws for a batch (and that N ranks draw one global batch), what
it needs before training (its training set), and how the config picks one."""

from __future__ import annotations

import pytest
import torch

from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.config import OBJECTIVES, PRESETS, ModelConfig, TrainConfig, takes_later_time
from fastflow.data import MNISTArrays
from fastflow.distributed import Dist
from fastflow.errors import UserError
from fastflow.objectives import (
    FlowBatch,
    FlowMatching,
    MeanFlow,
    MeanFlowBatch,
    MeanFlowDistill,
    PairBatch,
    make_objective,
)
from fastflow.unet import UNet

DATA = MNISTArrays(torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8), torch.arange(64) % 10)


def _teacher(tmp_path):
    cfg = ModelConfig(**PRESETS["tiny"][0])
    save_checkpoint(tmp_path / "flow", UNet(cfg), cfg, None, None, None, 1)
    return load_checkpoint(tmp_path / "flow", with_state=False)


@pytest.fixture
def objectives(tmp_path):
    return [FlowMatching(DATA, "logit-normal", 0.3), MeanFlow(DATA, 0.3, 0.5), MeanFlowDistill(_teacher(tmp_path), 3)]


def _batch_for(obj, b: int):
    """A loader batch of ``b`` for ``obj``: images in [-1, 1], or trajectories [b, k + 1, 1, 28, 28]."""
    g = torch.Generator().manual_seed(5)
    shape = (b, obj.steps + 1, 1, 28, 28) if isinstance(obj, MeanFlowDistill) else (b, 1, 28, 28)
    return torch.rand(shape, generator=g) * 2 - 1, torch.arange(b) % 10


def test_each_objective_draws_its_own_batch(objectives):
    types = {FlowMatching: FlowBatch, MeanFlow: MeanFlowBatch, MeanFlowDistill: PairBatch}
    for obj in objectives:
        x, y = _batch_for(obj, 8)
        batch = obj.draw(x, y, torch.Generator().manual_seed(0), Dist())
        assert type(batch) is types[type(obj)]
        assert all(len(v) == 8 for v in batch)
        assert obj.mean_flow == takes_later_time(obj.name) and obj.name in OBJECTIVES
        if isinstance(batch, (MeanFlowBatch, PairBatch)):
            assert bool((batch.s >= batch.t).all())
        if isinstance(batch, PairBatch):  # the target is the average velocity between two states of one trajectory
            rows = torch.arange(8)
            i = torch.searchsorted(obj.times, batch.t)
            j = torch.searchsorted(obj.times, batch.s)
            want = (x[rows, j] - x[rows, i]) / (batch.s - batch.t).view(-1, 1, 1, 1)
            torch.testing.assert_close(batch.u, want)
            assert torch.equal(batch.y, y)  # no label dropped: the guidance is the teacher's


def test_ranks_draw_the_global_batch_and_keep_their_rows(objectives):
    """Two ranks with the same generator state each keep half of what one process draws for the global batch."""
    for obj in objectives:
        x, y = _batch_for(obj, 8)
        whole = obj.draw(x, y, torch.Generator().manual_seed(1), Dist())
        for rank in (0, 1):
            rows = slice(4 * rank, 4 * rank + 4)
            part = obj.draw(x[rows], y[rows], torch.Generator().manual_seed(1), Dist(rank, 2))
            for name, a, b in zip(whole._fields, whole, part):
                assert torch.equal(a[rows], b), f"{obj.name}: rank {rank}'s {name}"


def test_the_config_picks_the_objective(tmp_path):
    base = dict(preset="tiny", subset=32)
    assert type(make_objective(TrainConfig(**base), data=DATA)) is FlowMatching
    mf = make_objective(TrainConfig(**base, objective="meanflow", mf_guidance=1.5), data=DATA)
    assert type(mf) is MeanFlow and mf.guidance == 1.5 and mf.size == 32
    cfg = TrainConfig(**base, objective="meanflow-distill", distill_steps=2, distill_trajectories=300)
    with pytest.raises(UserError, match="give --init-from"):
        make_objective(cfg, data=DATA)
    distill = make_objective(cfg, teacher=_teacher(tmp_path))
    assert type(distill) is MeanFlowDistill and distill.size == 512 and distill.items == "trajectories"
    assert distill.times.tolist() == [0.0, 0.5, 1.0]
