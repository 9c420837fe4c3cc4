"""Every command the README shows runs, as written, with tiny settings appended (argparse keeps the last value of a
flag given twice), in one scratch folder and in the README's order, as a reader would run them: `model/` is a
tiny checkpoint there, and what one command writes (meanflow-model/) the next one reads.

The settings appended to each command are in TINY, next to the README they shrink: a command the README shows
that TINY does not know fails the test, so the README cannot drift from the programs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a training run of two tiny steps on 64 images
TRAIN = ["--preset", "tiny", "--time-budget", "0", "--max-steps", "2", "--batch-size", "16", "--subset", "64",
         "--data-root", "{mnist}", "--device", "cpu"]  # fmt: skip
# command prefix -> what to append (placeholders: {mnist}, {clf}, {tmp}); None: checked with `make -n` only
TINY: dict[str, list[str] | None] = {
    "make train": None,  # its recipe is run below, with tiny settings
    "make test": None,  # this very suite: its recipe is checked, not run again
    "python -m fastflow.sample": ["--device", "cpu"],
    "python -m fastflow.evaluate": ["--num-samples", "20", "--data-root", "{mnist}", "--classifier", "{clf}"],
    "python -m fastflow.train": [*TRAIN, "--distill-trajectories", "256", "--result-dir", "{tmp}/r"],
    "python -m fastflow.export": [],
    "python -m bench train": [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batch-sizes",
        "8",
        "--modes",
        "eager-fp32",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--in-process",
        "--data",
        "synthetic",
        "--out",
        "{tmp}/bench",
    ],  # fmt: skip
    "python -m bench roofline": [
        "--preset",
        "tiny",
        "--batch-sizes",
        "2",
        "--no-inductor-count",
        "--no-max-batch",
        "--out",
        "{tmp}/bench",
    ],
    "python -m bench report": ["--check"],
    "torchrun": [*TRAIN, "--model-dir", "{tmp}/ddp", "--result-dir", "{tmp}/ddp-r"],
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def _prefix(cmd: str) -> str:
    known = [p for p in TINY if cmd.startswith(p)]
    assert known, f"the README shows `{cmd}`: add its tiny settings to TINY in tests/test_readme.py"
    return max(known, key=len)


def test_every_readme_command_is_known():
    cmds = readme_commands((REPO / "README.md").read_text())
    assert len(cmds) >= 8, cmds
    for cmd in cmds:
        _prefix(cmd)


def _make_n(target: str) -> str:
    p = subprocess.run(["make", "-n", "-C", str(REPO), target, "ARGS=--ARGS--"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.slow
def test_readme_commands_run(tmp_path, tiny_run, mnist_root, stand_in_classifier, cli_env):
    """The README's commands in order, in one folder holding a tiny `model/` (the tiny_run fixture's)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_run / "model", work / "model")
    fill = {"{mnist}": str(mnist_root), "{clf}": str(stand_in_classifier), "{tmp}": str(tmp_path)}
    env = {**cli_env, "PATH": str(Path(sys.executable).parent) + ":" + cli_env.get("PATH", "")}
    for cmd in readme_commands((REPO / "README.md").read_text()):
        prefix = _prefix(cmd)
        if TINY[prefix] is None:
            target = prefix.split()[1]
            recipe = _make_n(target)
            if target == "train":  # run what `make train ARGS=...` runs, with tiny settings as ARGS
                for line in recipe.splitlines():
                    if "-m fastflow." in line:
                        argv = shlex.split(line.replace("--ARGS--", " ".join(TINY["python -m fastflow.train"])))
                        argv = [sys.executable, *argv[1:]]
                        argv = [fill.get(a, a).replace("{tmp}", str(tmp_path)) for a in argv]
                        _run(argv, work, env, f"make train: {line}")
            else:
                assert "pytest" in recipe, recipe
            continue
        words = shlex.split(cmd) + TINY[prefix]
        words = [w.replace("{tmp}", str(tmp_path)) if "{tmp}" in w else fill.get(w, w) for w in words]
        if words[0] == "python":
            words[0] = sys.executable
        elif words[0] == "torchrun":  # two CPU processes instead of eight GPUs
            words = [sys.executable, "-m", "torch.distributed.run", *[re.sub(r"=8$", "=2", w) for w in words[1:]]]
        _run(words, work, env, cmd)
    assert (work / "result" / "grid.png").is_file() and (work / "meanflow-model" / "manifest.json").is_file()


def _run(argv: list[str], cwd: Path, env: dict, what: str) -> None:
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"`{what}` failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-2500:]}"
