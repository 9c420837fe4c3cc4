"""MeanFlow distillation (``--objective meanflow-distill``): the average velocity between two states of a teacher's trajectory
against the closed form of a Gaussian path, the pairs drawn, the trajectories the trainer makes against the
sampler's own run of the teacher, a resumed run bit for bit, and the refusals.

The closed form is gaussian_path.py's (as test_meanflow.py's): u there is written from the formula, not as the
difference (x_s − x_t)/(s − t) of two states. The path is curved, so u(x, t, s) differs from v(x, t) by O(1) and a
pair taken the wrong way round (or divided by the wrong gap) is far off.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from gaussian_path import flow as _flow
from gaussian_path import u as _u
from gaussian_path import v as _v

from fastflow import path as fm
from fastflow.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from fastflow.config import PRESETS, ModelConfig, TrainConfig, resolve_configs
from fastflow.errors import UserError
from fastflow.objectives import TRAJECTORY_CHUNK, MeanFlowDistill, make_objective
from fastflow.solvers import DEFAULT_INTERVAL, SamplerSpec, initial_noise, integrate, sample, time_grid, to_unit
from fastflow.trainer import Trainer
from fastflow.unet import UNet

FLOW = ModelConfig(**PRESETS["tiny"][0])
TINY_MF = ModelConfig(**{**PRESETS["tiny"][0], "mean_flow": True})


def test_trajectory_pairs_give_the_exact_average_velocity():
    k = 4
    times = time_grid(k).double()
    x0 = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = torch.stack([_flow(x0, t) for t in times], 1)  # [64, k + 1, 1]
    i, j = fm.grid_pairs(64, k, 0.3, torch.Generator().manual_seed(1), "cpu")
    x, t, s, u = fm.trajectory_pairs(states, times, i, j)
    assert torch.equal(x, states[torch.arange(64), i]) and bool((s > t).all())
    want = _u(x, t.view(-1, 1), s.view(-1, 1))
    torch.testing.assert_close(u, want, rtol=1e-10, atol=1e-10)
    # curved: the average velocity is not the instantaneous one, so a wrong pair or gap would show
    assert float((u - _v(x, t.view(-1, 1))).abs().max()) > 0.1


@pytest.mark.parametrize("k", [1, 2, 4])
def test_grid_pairs(k):
    n, share = 40000, 0.3
    i, j = fm.grid_pairs(n, k, share, torch.Generator().manual_seed(0), "cpu")
    assert bool((i < j).all()) and int(i.min()) >= 0 and int(j.max()) <= k
    whole = ((i == 0) & (j == k)).float().mean()
    others = k * (k + 1) // 2 - 1
    if k == 1:
        assert float(whole) == 1.0
        return
    assert abs(float(whole) - share) < 0.01
    counts = torch.bincount(i[~((i == 0) & (j == k))] * (k + 1) + j[~((i == 0) & (j == k))], minlength=(k + 1) ** 2)
    seen = counts[counts > 0].float()
    assert len(seen) == others  # every other pair occurs, uniformly
    assert float(seen.max() / seen.min()) < 1.1


def test_integrate_records_the_trajectory():
    field = lambda x, t: -x + t  # noqa: E731
    x = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    start = x.clone()
    out: list[torch.Tensor] = []
    end = integrate(field, x, time_grid(3), "midpoint", states=out)
    assert len(out) == 4 and torch.equal(out[0], start) and torch.equal(out[-1], end)
    assert all(a.data_ptr() != end.data_ptr() for a in out)  # copies, not views of the updated x


def test_average_velocity_loss_is_zero_at_the_target():
    class Exact(torch.nn.Module):
        def forward(self, x, t, y, s=None):
            return _u(x, t.view(-1, 1), s.view(-1, 1))

    times = time_grid(4).double()
    x0 = torch.randn(32, 1, dtype=torch.float64)
    states = torch.stack([_flow(x0, t) for t in times], 1)
    i, j = fm.grid_pairs(32, 4, 0.3, None, "cpu")
    x, t, s, u = fm.trajectory_pairs(states, times, i, j)
    y = torch.zeros(32, dtype=torch.int64)
    ctx = contextlib.nullcontext()
    # the loss takes the network's output as fp32 (it may come from bf16): zero up to fp32 rounding
    loss, mse = fm.average_velocity_loss(Exact(), x, y, t, s, u, ctx, adaptive_p=0.0)
    assert float(loss) == float(mse) < 1e-12
    loss, mse = fm.average_velocity_loss(Exact(), x, y, t, s, -u, ctx, adaptive_p=0.0)
    torch.testing.assert_close(mse, (2 * u.float()).pow(2).mean().double())
    # the adaptive weight: the mean of |Δ|²/(|Δ|² + c)^p per image, the mse unweighted
    loss_w, mse_w = fm.average_velocity_loss(Exact(), x, y, t, s, -u, ctx, adaptive_p=0.5, adaptive_c=1e-3)
    per = (2 * u.float()).pow(2).flatten(1).mean(1).double()
    torch.testing.assert_close(loss_w, (per / (per + 1e-3).sqrt()).mean())
    assert float(mse_w) == float(mse)


def _teacher(tmp_path):
    torch.manual_seed(3)
    raw, ema = UNet(FLOW), UNet(FLOW)
    for p in ema.parameters():  # a field that is not near zero, so the trajectories move
        p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    save_checkpoint(tmp_path / "flow", raw, FLOW, None, ema, None, 7)
    return ema.eval()


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = {**PRESETS["tiny"][1], "log_every": 2, "num_epochs": 1, "batch_size": 16}
    return TrainConfig(
        **{**base, **kw}, preset="tiny", amp="none", sample_steps=1, objective="meanflow-distill",
        teacher_guidance=2.0, distill_steps=2, distill_trajectories=200, init_from=str(tmp_path / "flow"),
        model_dir=str(tmp_path / name), result_dir=str(tmp_path / f"{name}-r"),
    )  # fmt: skip


def _trainer(cfg: TrainConfig, resume: bool = False) -> Trainer:
    ck, mcfg = init_checkpoint(cfg.init_from)
    trainer = Trainer(mcfg, cfg, torch.device("cpu"), objective=make_objective(cfg, teacher=ck))
    if not (resume and trainer.resume()):
        trainer.init_from(ck)
    return trainer


def test_trajectories_are_the_teachers_guided_midpoint_runs(tmp_path):
    """Chunk c of the set: labels and noise from seed·1000003 + c, then K midpoint steps guided at
    --teacher-guidance in [0.2, 0.7]: its last state is what ``sample`` draws from the same generator, and its first
    the noise."""
    teacher = _teacher(tmp_path)
    cfg = _cfg(tmp_path, "mf", max_steps=1)
    trainer = _trainer(cfg)
    assert trainer.loader is None  # made in fit(), inside the time budget, not at construction
    trainer.prepare()
    states, labels = trainer.loader.images, trainer.loader.labels
    assert states.shape == (TRAJECTORY_CHUNK, 3, 1, 28, 28)  # 200 rounded up to one chunk
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003)
    y = torch.randint(0, 10, (TRAJECTORY_CHUNK,), generator=g)
    assert torch.equal(labels, y)
    after_labels = g.get_state()
    assert torch.equal(states[:, 0], initial_noise(y, (1, 28, 28), g))
    g.set_state(after_labels)
    images, nfe = sample(teacher, y, SamplerSpec("midpoint", 2, 2.0, interval=DEFAULT_INTERVAL), generator=g)
    assert nfe == 6  # stages at 0, 0.25, 0.5, 0.75: the middle two guided
    torch.testing.assert_close(to_unit(states[:, -1].clone()), images, rtol=0, atol=1e-6)
    assert float((states[:, 1] - states[:, 0]).abs().mean()) > 0.01  # the teacher moved them


def test_distill_run_trains_on_pairs_and_resumes_bit_identically(tmp_path):
    _teacher(tmp_path)
    ref = _trainer(_cfg(tmp_path, "ref", max_steps=4))
    ref.fit()
    _trainer(_cfg(tmp_path, "run", max_steps=2)).fit()
    again = _trainer(_cfg(tmp_path, "run", max_steps=4, resume=True), resume=True)
    assert again.step == 2
    again.fit()
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "run")
    assert a.step == b.step == 4 and a.objective == "meanflow-distill" and a.model_cfg == TINY_MF
    for wa, wb in ((a.weights, b.weights), (a.ema_weights, b.ema_weights)):
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    first = load_checkpoint(tmp_path / "flow")
    assert any(not torch.equal(a.weights[k], first.ema_weights[k]) for k in first.ema_weights)  # it trained


def test_distill_refusals(tmp_path):
    with pytest.raises(UserError, match="meanflow-distill learns from a teacher's trajectories: give --init-from"):
        resolve_configs("tiny", "cpu", train={"objective": "meanflow-distill"})
    with pytest.raises(UserError, match="--distill-steps must be > 0"):
        resolve_configs("tiny", "cpu", train={"objective": "meanflow-distill", "distill_steps": 0, "init_from": "x"})
    _teacher(tmp_path)
    trainer = _trainer(_cfg(tmp_path, "mf", max_steps=1))
    save_checkpoint(tmp_path / "mfmodel", trainer.model, TINY_MF, None, None, None, 1)
    with pytest.raises(UserError, match="holds a MeanFlow model; the teacher must be a flow-matching one"):
        MeanFlowDistill(load_checkpoint(tmp_path / "mfmodel", with_state=False))
    with pytest.raises(UserError, match="--batch-size 512 is larger than the 256 trajectories"):
        _trainer(_cfg(tmp_path, "big", batch_size=512))
