"""The training run's small helpers on their own: the time budget's plan, the checkpoint cadence, the loss log."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.config import TrainConfig
from fastflow.history import LossLog, write_loss_history
from fastflow.schedule import PROBE, TimeBudget, checkpoint_due, lr_at


def test_the_budget_probes_then_plans_from_the_measured_rate():
    """0.5 s per step from t = 10: the probe (steps 5-25) measures 2 steps/s; at step 25 (t = 22.5) the 40 s
    budget has 27.5 s left: 55 more steps."""
    budget = TimeBudget(40.0, step=0, start=10.0)
    clock = lambda step: 10.0 + 0.5 * step  # noqa: E731
    plans = {}
    for step in range(1, 30):
        assert budget.due(step) == (step in PROBE)
        plan = budget.at_step(step, clock(step)) if budget.due(step) else None
        if plan is not None:
            plans[step] = plan
    assert plans == {PROBE[1]: (25 + 55, 2.0)}
    assert budget.replanning and not budget.due(PROBE[0])


def test_the_budget_replans_from_each_log_window_and_never_plans_past_its_end():
    budget = TimeBudget(40.0, step=0, start=0.0)
    assert budget.at_log(10, 5.0, 10, 0.0) is None  # before the first plan: nothing
    budget.at_step(PROBE[0], 2.5)
    budget.at_step(PROBE[1], 12.5)
    # a window of 10 steps in 10 s (1 step/s) ending at step 40, t = 27.5: 12 steps left
    assert budget.at_log(40, 27.5, 10, 17.5) == (52, 1.0)
    # out of time: no more steps, whatever the rate
    assert budget.at_log(60, 45.0, 10, 35.0) == (60, 1.0)


def test_a_resumed_budget_keeps_its_plan():
    budget = TimeBudget(40.0, step=30, start=0.0, planned=True)
    assert not any(budget.due(s) for s in range(30, 100))
    assert budget.at_log(40, 100.0, 10, 90.0) is None


def test_the_probe_counts_from_the_first_step_of_this_process():
    budget = TimeBudget(40.0, step=100, start=0.0)
    assert [s for s in range(100, 140) if budget.due(s)] == [100 + PROBE[0], 100 + PROBE[1]]


@pytest.mark.parametrize(
    "step, epoch_end, last, every, due",
    [(7, False, False, 0, False), (7, True, False, 0, True), (7, False, True, 0, True), (30, False, False, 10, True),
     (31, False, False, 10, False), (31, False, True, 10, True)],
)  # fmt: skip
def test_checkpoint_cadence(step, epoch_end, last, every, due):
    assert checkpoint_due(step, epoch_end, last, every) == due


def test_lr_warms_up_then_follows_the_cosine_to_its_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) == lr_at(500, cfg, 110)
    assert lr_at(60, TrainConfig(lr=1.0), 110) == 1.0  # constant


def test_loss_log_rows_window_and_state(tmp_path):
    log = LossLog(every=3)
    for v in (1.0, float("nan"), 3.0):
        log.add(torch.tensor(v))
    assert log.full
    losses = log.losses()
    assert log.first_bad(losses, step=12) == 11  # the window's second step: 12 − 3 + 1 + 1
    log.log(12, 1, 2.0, 1e-3, 480.0)
    assert log.window == [] and log.rows == [[12, 1, 2.0, 1e-3, 480.0]]
    log.add(torch.tensor(0.5))
    restored = LossLog(every=3)
    restored.load_state_dict(log.state_dict(), torch.device("cpu"))
    assert restored.rows == log.rows and [float(v) for v in restored.window] == [0.5]
    write_loss_history(log.rows + [[15, 1, 1.5, 1e-3, 500.0]], tmp_path)
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,epoch,loss,lr,images_per_s", "12,1,2.000000,1.000e-03,480.0", "15,1,1.500000,1.000e-03,500.0"
    ]  # fmt: skip
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
