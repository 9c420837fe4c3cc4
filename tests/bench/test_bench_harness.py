"""The bench driver around the measured functions: data without MNIST, CUDA timing windows, a failing or
interrupted row, the compact tables. Cheap: the tiny preset, two iterations, fakes where a GPU would be needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import grid, harness, tables, train_rows
from bench.baseline import _SyntheticImages
from fastflow.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_train_cli_runs_without_mnist(tmp_path, cli):
    """`python -m bench train --device cpu` with no MNIST on disk and downloads forbidden: synthetic data, said
    so in one line, and nothing written under the data root."""
    empty, out = tmp_path / "data", tmp_path / "out"
    empty.mkdir()
    cmd = [sys.executable, "-m", "bench", "train", "--device", "cpu", "--preset", "tiny", "--batch-sizes", "16"]
    cmd += ["--modes", "eager-fp32", "--iters", "2", "--warmup", "1", "--data-root", str(empty), "--out", str(out)]
    p = cli.run(cmd, cwd=REPO, env={**cli.env, "FASTFLOW_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"data: no MNIST in {empty / 'MNIST' / 'raw'}: training on synthetic" in p.stdout
    assert list(empty.iterdir()) == []  # no download, no offline rebuild
    rows = json.loads((out / "train-cpu.json").read_text())["rows"]
    assert [(r["mode"], r["batch"], r["status"], r["data"]) for r in rows] == [("eager-fp32", 16, "ok", "synthetic")]
    assert rows[0]["images_per_s"] > 0 and rows[0]["timing"] == "per call: 2 calls"
    assert "| train images/s (peak RSS MiB) | 16 |" in p.stdout  # the compact table


def test_resolve_data(tmp_path, mnist_root):
    assert train_rows.resolve_data("auto", str(mnist_root)) == ("mnist", None)
    kind, line = train_rows.resolve_data("auto", str(tmp_path))
    assert kind == "synthetic" and "synthetic" in line
    assert train_rows.resolve_data("synthetic", str(mnist_root)) == ("synthetic", None)
    with pytest.raises(UserError, match="--data"):
        train_rows.resolve_data("imagenet", str(tmp_path))
    d = train_rows.synthetic_mnist(n=50, seed=1)
    assert d.images.shape == (50, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and 0 <= int(d.labels.min()) and int(d.labels.max()) <= 9


def test_seed_baseline_on_synthetic_data(tmp_path):
    """The seed loop on synthetic pixels: a DataLoader worker converting each image as torchvision's MNIST does
    (uint8 -> [-1, 1]), and a train step on what it yields."""
    run, info = train_rows.train_runner(
        "seed-baseline",
        32,
        preset="tiny",
        device="cpu",
        data="synthetic",
        data_root=str(tmp_path),
        workdir=str(tmp_path),
    )
    assert info["data"] == "synthetic" and "synthetic pixels" in info["loader"]
    trainer = info["trainer"]
    losses = [float(run()) for _ in range(2)]
    assert all(0.2 < v < 5.0 for v in losses), losses
    assert trainer.step == 2  # train_step advances the step; bench never touches it
    import torchvision

    tf = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.5,), (0.5,))]
    )
    ds = _SyntheticImages(train_rows.synthetic_mnist(n=4, seed=3), tf)
    img, label = ds[2]
    want = ds.images[2].float().div(255).sub(0.5).div(0.5).unsqueeze(0)  # [1, 28, 28]
    torch.testing.assert_close(img, want, rtol=0, atol=1e-6)
    assert label == int(ds.labels[2])


class _FakeEvent:
    """torch.cuda.Event stand-in on a fake GPU clock that advances 2 ms per call of the timed function."""

    clock = 0.0

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = _FakeEvent.clock

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


def test_cuda_timing_queues_a_window_without_synchronising(monkeypatch):
    """On CUDA the timed calls run back to back between two events: one synchronisation per window, not per
    call, and the per-call time is the window's time / iters."""
    syncs = []
    calls = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(len(calls)))

    def fn():
        calls.append(1)
        _FakeEvent.clock += 2.0
        return torch.zeros(())

    r = harness.measure(fn, torch.device("cuda"), warmup=2, iters=4, repeats=3)
    assert len(calls) == 2 + 4 * 3
    # one sync after the first call, one after the warm-up, then one before each window; none inside one
    assert syncs == [1, 2, 2, 6, 10]
    assert r["median_s"] == pytest.approx(2e-3) and r["q20_s"] == pytest.approx(2e-3)
    assert r["timing"] == "cuda events: 3 windows of 4 calls"


def _fake_row(spec: dict) -> list[dict]:
    if spec["mode"] == "eager-bf16":
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
    if spec["mode"] == "compile":
        raise KeyboardInterrupt
    ips = 100.0 * spec["batch"]
    return [
        {
            **{k: spec[k] for k in ("suite", "mode", "batch")},
            "nfe": None,
            "status": "ok",
            "images_per_s": ips,
            "images_per_s_q20": ips,
            "images_per_s_q80": ips,
            "ms_per_step": 10.0,
            "compile_s": 0.0,
            "device": "cpu",
            "peak_rss_mb": 900.0,
        }
    ]


def test_a_failing_row_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid, "run_row", _fake_row)
    argv = ["train", "--device", "cpu", "--in-process", "--data", "synthetic", "--batch-sizes", "32,64"]
    rc = grid.main([*argv, "--modes", "eager-bf16,eager-fp32", "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "train-cpu.json").read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("eager-bf16", 32), ("eager-bf16", 64)] + [
        ("eager-fp32", 32),
        ("eager-fp32", 64),
    ]
    assert rows[0]["status"] == "error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"  # one line
    assert rows[2]["status"] == rows[3]["status"] == "ok"
    out = capsys.readouterr().out
    assert "| eager-bf16 | failed | failed |" in out and "- eager-bf16, batch 32: error: RuntimeError" in out


def test_an_interrupted_grid_keeps_its_rows(tmp_path, monkeypatch, capsys):
    """Ctrl-C or gpu_check.sh's SIGINT at the end of a stage: the rows so far are written, the interrupted one
    is marked, nothing more runs, and the status is 130."""
    monkeypatch.setattr(grid, "run_row", _fake_row)
    argv = ["train", "--device", "cpu", "--in-process", "--data", "synthetic", "--batch-sizes", "32"]
    rc = grid.main([*argv, "--modes", "eager-fp32,compile,eager-bf16", "--out", str(tmp_path)])
    assert rc == 130
    rows = json.loads((tmp_path / "train-cpu.json").read_text())["rows"]
    assert [(r["mode"], r["status"].split(" ")[0]) for r in rows] == [("eager-fp32", "ok"), ("compile", "interrupted")]
    assert "| compile | not finished |" in capsys.readouterr().out
    # --append keeps the rows in the file; a row measured again replaces its old one
    monkeypatch.setattr(
        grid, "run_row", lambda spec: [{**_fake_row({**spec, "mode": "eager-fp32"})[0], "mode": "compile"}]
    )
    assert grid.main([*argv, "--modes", "compile", "--append", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train-cpu.json").read_text())["rows"]
    assert [(r["mode"], r["status"]) for r in rows] == [("eager-fp32", "ok"), ("compile", "ok")]


def _row(suite, mode, batch, ips, nfe=None, **kw):
    return {"suite": suite, "mode": mode, "batch": batch, "nfe": nfe, "status": "ok", "images_per_s": ips, **kw}


def test_readme_tables():
    cuda = dict(device="cuda", torch_peak_mb=812.4)
    train = [
        _row("train", "compile-bf16-cudagraphs", 32, 9000.0, **cuda),
        _row("train", "compile-bf16-cudagraphs", 128, 31000.04, **{**cuda, "start_allocated_mb": 3.0}),
        _row("train", "seed-baseline", 32, 1500.0, **cuda),
        {"suite": "train", "mode": "seed-baseline", "batch": 128, "nfe": None, "status": "skipped: batch 32 only"},
        {"suite": "train", "mode": "eager-fp32", "batch": 32, "nfe": None, "status": "error: OOM"},
    ]
    assert tables.readme_table(train) == "\n".join(
        [
            "| train images/s (peak MiB, torch.cuda) | 32 | 128 |",
            "|---|--:|--:|",
            "| seed-baseline | 1500.0 (812) | |",
            "| eager-fp32 | failed | |",
            "| compile-bf16-cudagraphs | 9000.0 (812) | 31000.0 (812) |",
            "",
            "- eager-fp32, batch 32: error: OOM",
            "- compile-bf16-cudagraphs, batch 128: 3 MiB of earlier rows still allocated (in the peak)",
        ]
    )
    cpu = dict(device="cpu", peak_rss_mb=700.0)
    sample = [_row("sample", "eager-bf16", 64, ips, nfe=n, **cpu) for n, ips in ((10, 91.25), (20, 57.6), (50, 21.4))]
    sample.append({"suite": "sample", "mode": "compile-bf16-cudagraphs", "batch": 64, "status": "skipped: CUDA"})
    assert tables.readme_table(sample) == "\n".join(
        [
            "| sample images/s at 10 / 20 / 50 NFE (peak RSS MiB) | 64 |",
            "|---|--:|",
            "| eager-bf16 | 91.2 / 57.6 / 21.4 (700) |",
        ]
    )


def test_tables_command_reads_result_files(tmp_path, capsys):
    rows = [_row("train", "eager-fp32", 32, 280.5, device="cpu", peak_rss_mb=914.0, device_name="EPYC",
                 torch="2.14", triton="3.8", preset="cpu", channels=[16, 32, 64], data="mnist")]  # fmt: skip
    (tmp_path / "train-cpu.json").write_text(json.dumps({"suite": "train", "rows": rows}))
    assert tables.main([str(tmp_path / "train-cpu.json")]) == 0
    out = capsys.readouterr().out
    assert "train on EPYC, torch 2.14, triton 3.8, preset cpu (16/32/64), data mnist" in out
    assert "| eager-fp32 | 280.5 (914) |" in out
    (tmp_path / "junk.json").write_text("[]")
    assert tables.main([str(tmp_path / "junk.json")]) == 1


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_gpu_check_dry_run(cli_env):
    """The GPU check's dry run on a CPU: its stages in order with their budgets, every import with this python,
    pytest collecting what stages 1 and 2 run; exit 0."""
    env = {**cli_env, "PY": sys.executable}
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    out = p.stdout
    order = [out.index(f"  {n}.") for n in ("1", "2", "3", "4", "5a", "5b", "6", "7", "8")]
    assert order == sorted(order)
    assert "ends by  110 s" in out and "ok       train side" in out
    assert "stage 1 collects:" in out and "stage 2 collects:" in out and "cannot import" not in out
    assert out.rstrip().endswith("gpu_check --dry-run: ok")


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_gpu_check_dry_run_names_a_missing_import(tmp_path, cli_env):
    """A module the stages need that does not import: a one-line reason and a non-zero exit."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton on this machine')\n")
    env = {**cli_env, "PY": sys.executable, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert "cannot import: triton (ImportError: no triton on this machine" in p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith("gpu_check --dry-run: FAILED: an import the stages need")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_in_process_rows_report_their_own_peak_rss():
    """With --in-process a row must not inherit an earlier row's peak RSS: harness.fresh_state resets it."""
    from fastflow.device import peak_memory_mb

    cpu = torch.device("cpu")
    harness.fresh_state("cpu")  # its own imports (Dynamo) first, so that they do not count below
    big = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    high = peak_memory_mb(cpu)["peak_rss_mb"]
    del big
    harness.fresh_state("cpu")
    low = peak_memory_mb(cpu)["peak_rss_mb"]
    assert low < high - 200, (high, low)
