"""Training on real MNIST, and the whole pipeline through the command line: train → sample → evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastflow.config import PRESETS, ModelConfig, TrainConfig
from fastflow.errors import UserError
from fastflow.schedule import lr_at
from fastflow.trainer import Trainer


def test_short_training_lowers_the_loss(mnist_root, tmp_path):
    mcfg = ModelConfig(**PRESETS["tiny"][0])
    cfg = TrainConfig(
        **{**PRESETS["tiny"][1], "batch_size": 32, "lr": 3e-3, "log_every": 10, "max_steps": 80, "num_epochs": 5},
        preset="tiny", subset=1024, amp="none", data_root=str(mnist_root),
        model_dir=str(tmp_path / "model"), result_dir=str(tmp_path / "result"),
    )  # fmt: skip
    trainer = Trainer(mcfg, cfg, torch.device("cpu"))
    assert trainer.fit() == 0
    losses = [row[2] for row in trainer.log.rows]
    assert len(losses) == 8
    # the first window sits near the untrained loss (E|z − ε|² ≈ 1 + E z² ≈ 1.6); it must fall clearly
    assert losses[-1] < 0.75 * losses[0], losses


def _run(cli, env, *args, timeout=600):
    """``python -m ARGS`` through the warm-fork runner (tests/cli_runner.py: the same program, without the
    interpreter's start-up each time; it runs a real process itself where a fork cannot stand in)."""
    proc = cli.run([sys.executable, "-m", *args], env=env, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_train_checkpoint_sample_evaluate_resume_end_to_end(mnist_root, tmp_path, cli, cli_env, stand_in_classifier):
    model, result = tmp_path / "model", tmp_path / "result"
    train = ["fastflow.train", "--preset", "tiny", "--subset", "256", "--data-root", str(mnist_root),
             "--model-dir", str(model), "--result-dir", str(result), "--sample-steps", "2", "--log-every", "2"]  # fmt: skip
    out = _run(cli, cli_env, *train, "--max-steps", "6")
    assert "parameters" in out.stdout  # the parameter count is printed at start
    for name in ("model.safetensors", "ema.safetensors", "config.json", "state.pt", "manifest.json"):
        assert (model / name).is_file(), name
    assert json.loads((model / "manifest.json").read_text())["step"] == 6
    assert (result / "samples.png").is_file() and (result / "loss.csv").is_file()

    # --resume continues from the saved step
    out = _run(cli, cli_env, *train, "--max-steps", "10", "--resume")
    assert "at step 6" in out.stdout
    assert json.loads((model / "manifest.json").read_text())["step"] == 10

    # sample: a grid and the tensor dict, ordered digit by digit
    grid, tensor = tmp_path / "g.png", tmp_path / "s.pt"
    _run(cli, cli_env, "fastflow.sample", "--checkpoint", str(model), "--digits", "3,7", "--per-digit", "4",
         "--steps", "3", "--seed", "1", "--out", str(grid), "--save-tensor", str(tensor))  # fmt: skip
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = torch.load(tensor, weights_only=True)
    assert d["images"].dtype == torch.float32 and d["images"].shape == (8, 1, 28, 28)
    assert d["images"].min() >= 0 and d["images"].max() <= 1
    assert d["labels"].tolist() == [3] * 4 + [7] * 4

    # evaluate: with a stand-in classifier in a private cache (the real one takes a minute to train)
    cache = stand_in_classifier
    report = tmp_path / "eval.json"
    _run(cli, cli_env, "fastflow.evaluate", "--checkpoint", str(model), "--num-samples", "20", "--steps", "2",
         "--data-root", str(mnist_root), "--classifier", str(cache), "--out", str(report))  # fmt: skip
    r = json.loads(report.read_text())
    assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_digit"]) == {str(k) for k in range(10)}
    assert r["num_samples"] == 20 and r["nfe"] == 2


# The smallest U-Net: the compiled step's graph is the one tests/fastflow/test_step.py compiles (same shapes, fp32,
# batch 16), so Inductor's cache usually serves it instead of a minute of C++ code generation.
MICRO = ["--preset", "tiny", "--channels", "4", "--emb-dim", "8", "--groups", "1", "--amp", "none", "--device", "cpu"]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("first, then", [("--compile", "--no-compile"), ("--no-compile", "--compile")])
def test_resume_across_step_modes(mnist_root, tmp_path, cli, cli_env, first, then):
    """A run trained compiled resumes eagerly and the reverse (the optimizer state is placed for the new mode),
    and ends where an uninterrupted eager run ends, within the compiled-vs-eager bound of test_step.py (2% of
    Σlr; losing AdamW's moments or step count moves weights by ~lr)."""
    common = [*MICRO, "--subset", "64", "--data-root", str(mnist_root), "--sample-steps", "1", "--log-every", "1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(cli, cli_env, "fastflow.train", *common, "--model-dir", str(ref), "--result-dir", str(tmp_path / "r0"),
         "--max-steps", "4", "--no-compile")  # fmt: skip
    out = _run(cli, cli_env, "fastflow.train", *common, "--model-dir", str(run), "--result-dir", str(tmp_path / "r1"),
               "--max-steps", "2", first)  # fmt: skip
    assert ("step compile" in out.stdout) == (first == "--compile"), out.stdout
    out = _run(cli, cli_env, "fastflow.train", *common, "--model-dir", str(run), "--result-dir", str(tmp_path / "r1"),
               "--max-steps", "4", then, "--resume")  # fmt: skip
    assert "at step 2" in out.stdout and ("step compile" in out.stdout) == (then == "--compile"), out.stdout
    assert "warning" not in out.stderr, out.stderr  # no silent fallback to eager
    state = torch.load(run / "state.pt", weights_only=True)
    assert all(float(s["step"]) == 4 for s in state["optimizer"]["state"].values())
    got, want = _weights(run), _weights(ref)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 0.02 * 4e-3, f"max |Δθ| {worst:.3g} vs the uninterrupted eager run (bound {0.02 * 4e-3:.3g})"


def test_a_second_run_on_the_same_model_dir_is_refused(mnist_root, tmp_path, cli, cli_env):
    from fastflow.checkpoint import own_folder

    model = tmp_path / "model"
    cmd = [*MICRO, "--subset", "64", "--max-steps", "1", "--data-root", str(mnist_root), "--model-dir", str(model)]
    cmd += ["--result-dir", str(tmp_path / "result")]
    with own_folder(model):  # the first run, still going
        p = subprocess.run([sys.executable, "-m", "fastflow.train", *cmd], env=cli_env, capture_output=True, text=True)
        assert p.returncode != 0
        assert p.stderr.strip().splitlines() == [
            f"error: --model-dir {model}: another training run is using it; "
            "wait for it to end or pass another --model-dir"
        ], p.stderr
        assert not list(model.iterdir())  # the refused run wrote nothing
    # A run that was killed holds nothing: the kernel drops its lock with the process.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fastflow.checkpoint import own_folder\nwith own_folder({str(model)!r}):\n"
         "    print('held', flush=True)\n    import time; time.sleep(600)"],
        env=cli_env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="another training run"):
        with own_folder(model):
            pass
    holder.kill()
    holder.wait()
    _run(cli, cli_env, "fastflow.train", *cmd)
    assert (model / "manifest.json").exists()


def test_images_per_second_counts_only_the_steps_this_process_timed(mnist_root, tmp_path, monkeypatch):
    """After --resume the first log window holds losses restored from the checkpoint: images/s must count only
    the steps timed since the start, not the restored ones (seen: 677 img/s shown for a run doing 150)."""
    import fastflow.trainer as tr

    clock = iter(range(1000))
    monkeypatch.setattr(tr, "_clock", lambda: float(next(clock)))
    mcfg = ModelConfig(**PRESETS["tiny"][0])
    cfg = TrainConfig(
        **{**PRESETS["tiny"][1], "log_every": 4, "max_steps": 1}, preset="tiny", subset=64, amp="none", sample_steps=1,
        data_root=str(mnist_root), model_dir=str(tmp_path / "model"), result_dir=str(tmp_path / "result"),
    )  # fmt: skip
    trainer = Trainer(mcfg, cfg, torch.device("cpu"))
    trainer.log.window = [torch.tensor(1.0)] * 3  # as restored by resume(): 3 steps of the window were done before
    trainer.fit()
    (row,) = trainer.log.rows
    assert row[4] == cfg.batch_size * 1 / 1.0  # one step timed in one (fake) second


def test_time_budget_plans_the_steps_from_the_measured_rate_and_resume_keeps_the_plan(
    mnist_root, tmp_path, monkeypatch
):
    """A fake clock at 0.5 s per step: the rate measured over steps 6-25 is 2 steps/s; 12.5 s of the 40 s budget
    are gone at step 25, so 27.5 s buy 55 more steps: 80 in all. A resumed run keeps 80 whatever its clock says."""
    import fastflow.trainer as tr

    mcfg = ModelConfig(**PRESETS["tiny"][0])
    cfg = TrainConfig(
        **{**PRESETS["tiny"][1], "log_every": 10, "time_budget": 40.0, "checkpoint_every": 30}, preset="tiny",
        lr_schedule="cosine", sample_steps=1,
        subset=1024, amp="none", ema_decay=0.0, data_root=str(mnist_root), model_dir=str(tmp_path / "model"),
        result_dir=str(tmp_path / "result"),
    )  # fmt: skip
    trainer = Trainer(mcfg, cfg, torch.device("cpu"))
    monkeypatch.setattr(tr, "_clock", lambda: 0.5 * trainer.step)
    step = trainer.train_step

    def stop_at_30(z, y):  # a SIGINT after step 30 (a checkpoint step)
        loss = step(z, y)
        trainer.stop_requested = trainer.step >= 30
        return loss

    trainer.train_step = stop_at_30
    trainer.fit()
    assert (trainer.planned_steps, trainer.total_steps, trainer.step) == (80, 80, 30)
    assert trainer.lr == lr_at(30, cfg, 80)  # the cosine runs over the planned 80 steps

    again = Trainer(mcfg, cfg, torch.device("cpu"))
    monkeypatch.setattr(tr, "_clock", lambda: 100.0 * again.step)  # a much slower machine now: the plan stands
    assert again.resume()
    assert (again.planned_steps, again.total_steps) == (80, 80)
    again.fit()
    assert again.step == 80


def test_time_budget_replans_when_the_machine_slows_down_and_ends_on_time(mnist_root, tmp_path, monkeypatch):
    """0.5 s per step up to step 25 (the plan: 80 steps of a 40 s budget), then 1 s per step. At step 40 the clock
    reads 27.5 s and the last window ran 1 step/s: 12 more steps, 52 in all, ending at 39.5 s, within the budget
    (the first plan alone would have ended at 67.5 s)."""
    import fastflow.trainer as tr

    mcfg = ModelConfig(**PRESETS["tiny"][0])
    cfg = TrainConfig(
        **{**PRESETS["tiny"][1], "log_every": 10, "time_budget": 40.0}, preset="tiny", lr_schedule="cosine",
        sample_steps=1, subset=1024, amp="none", ema_decay=0.0, data_root=str(mnist_root),
        model_dir=str(tmp_path / "model"), result_dir=str(tmp_path / "result"),
    )  # fmt: skip
    trainer = Trainer(mcfg, cfg, torch.device("cpu"))
    monkeypatch.setattr(tr, "_clock", lambda: 0.5 * min(trainer.step, 25) + max(trainer.step - 25, 0))
    trainer.fit()
    assert (trainer.planned_steps, trainer.step) == (52, 52)
    assert tr._clock() <= cfg.time_budget


def test_the_cpu_preset_trains_for_a_time_budget_unless_epochs_are_asked_for():
    from fastflow.config import resolve_configs

    assert resolve_configs("cpu", "cpu")[1].time_budget == 300
    assert resolve_configs("auto", "cpu")[1].time_budget == 300
    assert resolve_configs("auto", "cuda")[1].time_budget == 0  # the original recipe: its 10 epochs
    epochs = resolve_configs("cpu", "cpu", train={"num_epochs": 3})[1]
    assert (epochs.num_epochs, epochs.time_budget) == (3, 0)
    both = resolve_configs("cpu", "cpu", train={"num_epochs": 3, "time_budget": 60.0})[1]
    assert both.time_budget == 60
    assert resolve_configs("cpu", "cpu", train={"time_budget": 0.0})[1].num_epochs == 2
