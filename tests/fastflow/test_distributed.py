"""torchrun / DDP on CPU (gloo): two processes against one, checkpoints across process counts, failures.

Every multi-process test starts the real command line under ``python -m torch.distributed.run`` (torchrun) in a
subprocess. A small harness (written to a temporary folder, not part of the package) runs ``fastflow.train``'s
``main`` unchanged and, on every rank, records the weights after each step and the logged losses.

The chain, on the tiny preset and a 256-image subset (16 steps of global batch 16 per epoch):
  A  2 processes, steps 1-3            (fresh)         -> checkpoint in ``ck``
  B  1 process,   steps 1-6            (fresh)         -> the reference for everything below
  C  1 process,   steps 4-5            (--resume ``ck``, a DDP checkpoint)
  F  2 processes, step 6               (--resume ``ck``, now a single-process checkpoint)
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastflow.distributed import Dist, broadcast_module, init_distributed

TINY = ["--preset", "tiny", "--subset", "256", "--log-every", "1", "--amp", "none", "--sample-steps", "2"]
# fp32 summation order: N ranks sum each half of the batch apart, then DDP averages; Adam then scales the
# tiny gradient differences. Seen: max |Δw| 4e-7 after 3 steps at lr 1e-3. A wrong shard or wrong noise moves
# the weights by about lr (1e-3) per step, 100× this tolerance.
W_ATOL, W_RTOL = 1e-5, 1e-4
LOSS_RTOL = 1e-5
TIMEOUT_S = 300  # per command: a hang fails the test instead of the CI job

HARNESS = """
import os, sys
import torch
from fastflow import train, trainer

out = sys.argv[1]
fail_rank, fail_step = (int(v) for v in os.environ.get("HARNESS_FAIL", "-1:-1").split(":"))
snaps = {}
_step, _fit = trainer.Trainer.train_step, trainer.Trainer.fit


def train_step(self, z, y):
    if (self.dist.rank, self.step + 1) == (fail_rank, fail_step):
        raise RuntimeError(f"injected failure on rank {fail_rank} at step {fail_step}")
    loss = _step(self, z, y)  # advances self.step
    snaps[self.step] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
    return loss


def fit(self):
    rc = _fit(self)
    torch.save(
        {
            "weights": snaps,
            "ema": {k: v.cpu() for k, v in self.ema.shadow.state_dict().items()},
            "history": self.log.rows,
            "process_group": torch.distributed.is_initialized(),
            "world_size": self.dist.world_size,
            "averages_over": self.train_fn.process_group is not None,
        },
        os.path.join(out, f"rank{self.dist.rank}.pt"),
    )
    return rc


trainer.Trainer.train_step, trainer.Trainer.fit = train_step, fit
sys.exit(train.main(sys.argv[2:]))
"""


# The train step under torchrun (fastflow.step.TrainStep with the process group) averages the gradients itself,
# eager or compiled. Two ranks each take half of a global batch of 8 through the step (compiled: traced by Dynamo
# + AOTAutograd, backend aot_eager: no minutes of C++ code generation); rank 0 also runs torch's own single-process
# loop (loss.backward, AdamW.step) on the whole batch as the reference.
COMPILED_HARNESS = """
import os, sys
import torch
import torch.distributed as tdist
from fastflow import path as fm
from fastflow.distributed import Dist, broadcast_module
from fastflow.objectives import FlowBatch
from fastflow.step import TrainStep, make_optimizer
from fastflow.config import PRESETS, ModelConfig
from fastflow.device import autocast
from fastflow.ema import EMA
from fastflow.unet import UNet

out, mode = sys.argv[1], sys.argv[2]
tdist.init_process_group("gloo")
rank, world = tdist.get_rank(), tdist.get_world_size()
cpu, ctx, lrs, B = torch.device("cpu"), autocast(torch.device("cpu"), None), (1e-3, 2e-3), 8


def parts():
    torch.manual_seed(0)
    model = UNet(ModelConfig(**PRESETS["tiny"][0]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero everywhere (conv_out starts at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, make_optimizer(model.parameters(), 1e-3, 0.01), EMA(model, 0.999, 10)


g = torch.Generator().manual_seed(1)
batches = [(torch.rand(B, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 11, (B,), generator=g),
            torch.rand(B, generator=g), torch.randn(B, 1, 28, 28, generator=g)) for _ in lrs]
model, opt, ema = parts()
if rank == 1:  # a different start on rank 1: the broadcast (as in the Trainer) must make it rank 0's
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
broadcast_module(model, Dist(rank, world))
ema = EMA(model, 0.999, 10)
start = {k: v.clone() for k, v in model.state_dict().items()}
step = TrainStep(model, opt, ema, ctx, mode=mode, process_group=tdist.group.WORLD, backend="aot_eager")
lo, hi = rank * B // world, (rank + 1) * B // world
losses = [step(FlowBatch(*(x[lo:hi] for x in b)), lr) for b, lr in zip(batches, lrs)]
rec = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
       "ema": {k: v.clone() for k, v in ema.shadow.state_dict().items()}, "losses": torch.stack(losses), "start": start}
if rank == 0:
    ref, _, ref_ema = parts()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    for (z, y, t, eps), lr in zip(batches, lrs):
        for grp in ref_opt.param_groups:
            grp["lr"] = lr
        fm.flow_matching_loss(ref, z, y, t, eps, ctx).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_ema.update(ref)
    rec["ref"] = {k: v.clone() for k, v in ref.state_dict().items()}
    rec["ref_ema"] = {k: v.clone() for k, v in ref_ema.shadow.state_dict().items()}
torch.save(rec, os.path.join(out, f"{mode}-rank{rank}.pt"))
tdist.destroy_process_group()
"""


def _launch(nproc: int) -> list[str]:
    if nproc == 1:  # the plain single-process command: no torchrun, no process group
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _run(cmd: list[str], env: dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=TIMEOUT_S)


class Chain:
    def __init__(self, root: Path, mnist_root: Path, env: dict):
        self.root, self.mnist_root, self.env = root, mnist_root, env
        self.harness = root / "harness.py"
        self.harness.write_text(HARNESS)
        self.ck = root / "ck"

    def train(self, name: str, nproc: int, model_dir: Path, *flags: str) -> list[dict]:
        """Run the harness; return each rank's record."""
        out = self.root / name
        out.mkdir()
        cmd = [
            *_launch(nproc),
            str(self.harness),
            str(out),
            *TINY,
            "--data-root",
            str(self.mnist_root),
            "--model-dir",
            str(model_dir),
            "--result-dir",
            str(out / "result"),
            *flags,
        ]
        p = _run(cmd, self.env)
        assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, mnist_root, cli_env) -> dict:
    c = Chain(tmp_path_factory.mktemp("ddp"), mnist_root, cli_env)
    runs = {"A": c.train("A", 2, c.ck, "--max-steps", "3")}
    runs["B"] = c.train("B", 1, c.root / "ck_ref", "--max-steps", "6")
    runs["C"] = c.train("C", 1, c.ck, "--max-steps", "5", "--resume")
    runs["F"] = c.train("F", 2, c.ck, "--max-steps", "6", "--resume")
    runs["ck"] = c.ck
    return runs


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        err = (a[k] - b[k]).abs()
        assert torch.allclose(a[k], b[k], atol=W_ATOL, rtol=W_RTOL), (
            f"{what}: {k} max |Δ| {err.max().item():.3g}, mean {err.mean().item():.3g}"
        )


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs, max |Δ| {(a[k] - b[k]).abs().max().item():.3g}"


def _losses(record: dict) -> dict[int, float]:
    return {int(row[0]): row[2] for row in record["history"]}


def _assert_losses(got: dict, ref: dict, steps: list[int], what: str) -> None:
    assert sorted(got) == steps, f"{what}: logged steps {sorted(got)}"
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=LOSS_RTOL), f"{what}: loss at step {s} {got[s]} vs {ref[s]}"


# -- in-process: the single-process path ---------------------------------------------------------------------


def test_plain_python_has_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = init_distributed(torch.device("cpu"))
    assert dist == Dist() and not dist.enabled and dist.is_main
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    broadcast_module(model, dist)  # a no-op in one process
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert dist.group is None


def test_torchrun_with_one_process_has_no_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_distributed(torch.device("cpu")) == Dist()
    assert not torch.distributed.is_initialized()


def test_local_device():
    assert Dist(3, 4, 1).local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert Dist(3, 4, 1).local_device(torch.device("cpu")) == torch.device("cpu")
    assert Dist().local_device(torch.device("cuda")) == torch.device("cuda")


# -- torchrun, 2 processes (gloo) -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_agree_and_match_one_process(chain):
    a0, a1 = chain["A"]
    (b,) = chain["B"]
    assert (a0["process_group"], a0["world_size"], a0["averages_over"]) == (True, 2, True)
    assert (b["process_group"], b["world_size"], b["averages_over"]) == (False, 1, False)
    for s in (1, 2, 3):
        _assert_equal(a0["weights"][s], a1["weights"][s], f"rank 0 vs rank 1 after step {s}")
        _assert_close(a0["weights"][s], b["weights"][s], f"2 processes vs 1 after step {s}")
    _assert_equal(a0["ema"], a1["ema"], "EMA, rank 0 vs rank 1")
    # The logged loss is the global-batch mean (all-reduced), the same on both ranks and as one process's.
    _assert_losses(_losses(a0), _losses(b), [1, 2, 3], "2 processes vs 1")
    assert _losses(a0) == _losses(a1)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process(chain):
    (b,) = chain["B"]
    (c,) = chain["C"]
    assert c["process_group"] is False
    # The history restored from the DDP checkpoint (steps 1-3) and the steps trained after it (4-5).
    _assert_losses(_losses(c), _losses(b), [1, 2, 3, 4, 5], "resumed in 1 process vs uninterrupted")
    assert sorted(c["weights"]) == [4, 5]
    for s in (4, 5):
        _assert_close(c["weights"][s], b["weights"][s], f"resumed in 1 process vs uninterrupted after step {s}")


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_ddp(chain):
    from safetensors.torch import load_file

    (b,) = chain["B"]
    f0, f1 = chain["F"]
    assert sorted(f0["weights"]) == [6]
    _assert_equal(f0["weights"][6], f1["weights"][6], "resumed: rank 0 vs rank 1")
    _assert_close(f0["weights"][6], b["weights"][6], "resumed under DDP vs uninterrupted, step 6")
    _assert_losses(_losses(f0), _losses(b), [1, 2, 3, 4, 5, 6], "resumed under DDP vs uninterrupted")
    # Saved from the unwrapped model: the same names as a single-process checkpoint, no "module." prefix.
    saved = load_file(str(chain["ck"] / "model.safetensors"))
    assert saved.keys() == b["weights"][6].keys()
    _assert_close(saved, b["weights"][6], "the DDP checkpoint's weights")


@pytest.mark.slow
def test_batch_that_does_not_divide_is_one_line_error(tmp_path, mnist_root, cli_env):
    cmd = [*_launch(2), "-m", "fastflow.train", *TINY, "--max-steps", "2", "--batch-size", "15"]
    cmd += ["--data-root", str(mnist_root), "--model-dir", str(tmp_path / "m"), "--result-dir", str(tmp_path / "r")]
    p = _run(cmd, cli_env)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    # Both ranks raise it; torchrun may stop the slower one before it prints.
    assert 1 <= len(errors) <= 2, out
    assert set(errors) == {"error: --batch-size 15 does not divide evenly across 2 processes"}, out
    assert not re.search(r'File ".*/fastflow/', out), f"a worker printed a traceback:\n{out}"
    assert not (tmp_path / "m" / "manifest.json").exists()


@pytest.mark.slow
def test_failure_on_one_rank_ends_the_job(tmp_path, mnist_root, cli_env):
    """Rank 1 raises at step 2 while rank 0 waits in the gradient all-reduce: the job must end, not hang."""
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    (tmp_path / "out").mkdir()
    cmd = [*_launch(2), str(harness), str(tmp_path / "out"), *TINY, "--max-steps", "4"]
    cmd += ["--data-root", str(mnist_root), "--model-dir", str(tmp_path / "m"), "--result-dir", str(tmp_path / "r")]
    t0 = time.monotonic()
    p = _run(cmd, cli_env, {"HARNESS_FAIL": "1:2"})
    elapsed = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 2" in out
    # torchrun names the failed rank; record_errors puts its error in the summary, not a pointer to the docs.
    root_cause = out.split("Root Cause (first observed failure):")[-1]
    assert "injected failure on rank 1 at step 2" in root_cause, out[-4000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after one rank failed"
    assert not list((tmp_path / "out").iterdir()), "a rank finished training although its peer had failed"


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_step_under_torchrun_matches_one_process(tmp_path, cli_env, mode):
    """The train step under torchrun averages the gradients over the ranks (eagerly with all_reduce; compiled
    inside the graph with the functional collective, the path CUDA graphs capture), so 2 ranks at half the batch
    each end where one process ends on the whole batch, and the ranks stay bit-identical.

    Tolerance: AdamW moves each weight by ~lr per step whatever the gradient's size, so the bound is on the update
    (as in test_compile.py): max |Δθ| within 2% of Σlr. Gradients that were never averaged, or averaged twice, move
    the weights by ~lr (the half-batch gradient of one rank is not the global one): 50× the bound."""
    harness = tmp_path / "harness.py"
    harness.write_text(COMPILED_HARNESS)
    p = _run([*_launch(2), str(harness), str(tmp_path), mode], cli_env)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    r0, r1 = (torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=True) for r in (0, 1))
    _assert_equal(r0["weights"], r1["weights"], "rank 0 vs rank 1 weights")
    _assert_equal(r0["ema"], r1["ema"], "rank 0 vs rank 1 EMA")
    budget = 1e-3 + 2e-3
    for got, want, what in ((r0["weights"], r0["ref"], "weights"), (r0["ema"], r0["ref_ema"], "EMA")):
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert worst <= 0.02 * budget, f"{what}: max |Δθ| {worst:.3g} vs one process, bound {0.02 * budget:.3g}"
    # not vacuous: the steps moved the weights by about Σlr, 50× the bound
    moved = max(float((r0["ref"][k] - r0["start"][k]).abs().max()) for k in r0["ref"])
    assert moved > 0.5 * budget, f"the reference moved only {moved:.3g}"
