"""``python -m bench recipe``: time to quality, as ``make train`` gives it: the training command for a time budget,
then the project's judge on what it trained.

For each seed: ``python -m fastflow.train`` (the CPU default unless ``--train-args`` says otherwise) in a fresh
folder, timed from start to exit; then ``python -m fastflow.evaluate`` on its checkpoint, the judge of the docs:
1000 digits, 10 Euler steps, no guidance, noise seed 0, fp32, the project's classifier. One row per seed (steps,
images, images/s of training, seconds, accuracy, FID and its floor, the machine and the ISA it ran with) is
appended to ``bench/results/recipe-<label>.json``.

``--isa avx2`` holds the CPU to AVX2 for both commands (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``,
with its own Inductor cache: Inductor's cache is not keyed on them); ``native`` runs as the machine is.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastflow.errors import ArgumentParser
from fastflow.settings import add_settings, setting

from .harness import RESULTS, ROOT, git_commit, versions, write_rows

__all__ = ["RecipeSettings", "build_parser", "main", "ISA_ENV"]

ISA_ENV = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
COLUMNS = [
    "label", "seed", "isa", "device_name", "steps", "images", "images_per_s", "train_s", "command_s", "accuracy",
    "fid", "fid_floor", "fid_over_floor", "train_args", "commit",
]  # fmt: skip


@dataclass(frozen=True)
class RecipeSettings:
    """Which runs, on what, and where the rows go."""

    label: str = setting("default", "the runs' name: their rows go to bench/results/recipe-<label>.json")
    seeds: tuple[int, ...] = setting((42,), "training seeds, one run each")
    train_args: str = setting("", "more flags for fastflow.train (e.g. '--channels 16,32')", shown="none")
    isa: str = setting("native", "native, or avx2: hold the CPU to AVX2 (both commands)", choices=tuple(ISA_ENV))
    data_root: str = setting("data", "MNIST folder, also the classifier cache")
    num_samples: int = setting(1000, "digits the judge draws per model", metavar="N")
    keep: str = setting("", "keep each model in <KEEP>/<label>-s<seed> (else a temporary folder)", shown="none")
    out: str = setting(str(RESULTS), "results folder", shown="bench/results")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench recipe", description=__doc__.split("\n\n")[0])
    add_settings(p.add_argument_group("recipe"), RecipeSettings)
    return p


def _isa_env(isa: str, cache: Path) -> dict:
    env = {**os.environ, **ISA_ENV[isa], "PYTHONUNBUFFERED": "1"}
    if isa != "native":
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return env


def _last_row(csv_path: Path) -> list[str]:
    return csv_path.read_text().strip().splitlines()[-1].split(",")


def run_seed(args, seed: int, work: Path, env: dict) -> dict:
    """One training run and its judgement: the row."""
    model, result = work / "model", work / "result"
    train = [sys.executable, "-m", "fastflow.train", "--seed", str(seed), "--data-root", args.data_root]
    train += ["--model-dir", str(model), "--result-dir", str(result), *shlex.split(args.train_args)]
    t0 = time.perf_counter()
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True)
    command_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fastflow.train failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    lines = proc.stdout.splitlines()
    start = next(ln for ln in lines if ln.startswith("fastflow: preset"))
    manifest = json.loads((model / "manifest.json").read_text())
    history = [r.split(",") for r in (result / "loss.csv").read_text().strip().splitlines()[1:]]
    config = json.loads((model / "config.json").read_text())
    report = work / "eval.json"
    judge = [sys.executable, "-m", "fastflow.evaluate", "--checkpoint", str(model), "--steps", "10", "--guidance", "1"]
    judge += ["--num-samples", str(args.num_samples), "--data-root", args.data_root, "--out", str(report)]
    ev = subprocess.run(judge, cwd=ROOT, env=env, capture_output=True, text=True)
    if ev.returncode != 0:
        raise RuntimeError(f"fastflow.evaluate failed ({ev.returncode}): {ev.stderr.strip().splitlines()[-1:]}")
    r = json.loads(report.read_text())
    steps, batch = int(manifest["step"]), int(config["train"]["batch_size"])
    timed = [float(row[4]) for row in history]  # images/s per log window
    return {
        "label": args.label,
        "seed": seed,
        "isa": r.get("isa"),
        "device_name": r.get("device_name"),
        "start_line": start,
        "steps": steps,
        "images": steps * batch,
        "images_per_s": sum(timed) / len(timed) if timed else None,
        "train_s": float(config["train"]["time_budget"]) or None,
        "command_s": round(command_s, 1),
        "accuracy": r["accuracy"],
        "fid": r["fid"],
        "fid_floor": r["floor"]["fid"],
        "fid_over_floor": r["fid_over_floor"],
        "train_args": args.train_args,
        "model": {k: config["model"][k] for k in ("channels", "emb_dim", "patch", "blocks_per_level")},
        "preset": config["train"]["preset"],
        "commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stem = Path(args.out) / f"recipe-{args.label}"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"] if stem.with_suffix(".json").exists() else []
    with tempfile.TemporaryDirectory(prefix="fastflow-recipe-") as tmp:
        env = _isa_env(args.isa, Path(tmp) / "inductor")
        for seed in args.seeds:
            work = Path(args.keep) / f"{args.label}-s{seed}" if args.keep else Path(tmp) / f"s{seed}"
            row = run_seed(args, seed, work, env)
            rows = [r for r in rows if r["seed"] != seed] + [row]  # a seed measured again replaces its row
            meta = {"suite": "recipe", "label": args.label, "isa_env": ISA_ENV[args.isa], **versions()}
            write_rows(rows, meta, stem, COLUMNS)
            print(
                f"[recipe {args.label}] seed {seed}: {row['steps']} steps, {row['images_per_s']:.0f} img/s, "
                f"{row['command_s']:.0f} s, accuracy {row['accuracy']:.1%}, FID {row['fid']:.2f} "
                f"({row['fid_over_floor']:.2f}x the floor) [{row['isa']}]",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
