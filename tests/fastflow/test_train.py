"""Training on real MNIST, and the whole pipeline through the command line: train → sample → evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from fastflow.classifier import Classifier
from fastflow.config import PRESETS, ModelConfig, TrainConfig
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
    losses = [row[2] for row in trainer.history]
    assert len(losses) == 8
    # the first window sits near the untrained loss (E|z − ε|² ≈ 1 + E z² ≈ 1.6); it must fall clearly
    assert losses[-1] < 0.75 * losses[0], losses


def _run(env, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_train_checkpoint_sample_evaluate_resume_end_to_end(mnist_root, tmp_path, cli_env):
    model, result = tmp_path / "model", tmp_path / "result"
    train = ["fastflow.train", "--preset", "tiny", "--subset", "256", "--data-root", str(mnist_root),
             "--model-dir", str(model), "--result-dir", str(result), "--sample-steps", "2", "--log-every", "2"]  # fmt: skip
    out = _run(cli_env, *train, "--max-steps", "6")
    assert "parameters" in out.stdout  # the parameter count is printed at start
    for name in ("model.safetensors", "ema.safetensors", "config.json", "state.pt", "manifest.json"):
        assert (model / name).is_file(), name
    assert json.loads((model / "manifest.json").read_text())["step"] == 6
    assert (result / "samples.png").is_file() and (result / "loss.csv").is_file()

    # --resume continues from the saved step
    out = _run(cli_env, *train, "--max-steps", "10", "--resume")
    assert "at step 6" in out.stdout
    assert json.loads((model / "manifest.json").read_text())["step"] == 10

    # sample: a grid and the tensor dict, ordered digit by digit
    grid, tensor = tmp_path / "g.png", tmp_path / "s.pt"
    _run(cli_env, "fastflow.sample", "--checkpoint", str(model), "--digits", "3,7", "--per-digit", "4",
         "--steps", "3", "--seed", "1", "--out", str(grid), "--save-tensor", str(tensor))  # fmt: skip
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = torch.load(tensor, weights_only=True)
    assert d["images"].dtype == torch.float32 and d["images"].shape == (8, 1, 28, 28)
    assert d["images"].min() >= 0 and d["images"].max() <= 1
    assert d["labels"].tolist() == [3] * 4 + [7] * 4

    # evaluate: with a stand-in classifier in a private cache (the real one takes a minute to train)
    cache = tmp_path / "clf"
    cache.mkdir()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Classifier().state_dict().items()}, str(cache / "classifier.safetensors"))
    (cache / "classifier.json").write_text(json.dumps({"test_accuracy": 0.1}))
    report = tmp_path / "eval.json"
    _run(cli_env, "fastflow.evaluate", "--checkpoint", str(model), "--num-samples", "20", "--steps", "2",
         "--data-root", str(mnist_root), "--classifier", str(cache), "--out", str(report))  # fmt: skip
    r = json.loads(report.read_text())
    assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_digit"]) == {str(k) for k in range(10)}
    assert r["num_samples"] == 20 and r["nfe"] == 2
