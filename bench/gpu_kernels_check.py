"""One short run that checks every GPU path of kernels/ on a CUDA machine (none here has one: never run yet).

    python bench/gpu_kernels_check.py [--skip-tests] [--skip-compiled] [--n-log2 24] [--batch 128]

1. The kernel tests with native Triton (``TRITON_INTERPRET=0``): every op against the reference on CUDA tensors,
   determinism, and the ``cuda``-marked tests: ``torch.compile(fullgraph=True)`` with the auto dispatch (the
   reference inside the trace) and with the ``fastflow::*`` triton_ops forced, CPU scalars rejected, and launches
   on a second GPU (skipped with one). ~1-2 min, most of it compiling.
2. Bandwidth: each op's GB/s at N = 2^24 next to the measured copy bandwidth (``y.copy_(x)``), and the speedup of
   the Triton op over the reference (eager and compiled) at batch 128 (N = 128·784). Rows go to
   ``bench/results/kernels-cuda-<gpu>-check.json``. ``--skip-compiled`` drops the reference-compiled provider
   (one Inductor compile per op, ~10 s each).

Exit status: 0 when the tests pass and every op ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# Native kernels: this must be decided before kernels (and its @triton.jit) is imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the tests switch on torch's deterministic mode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def run_tests() -> bool:
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider", "-rs"]
    print("$ TRITON_INTERPRET=0 " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    print(
        f"kernel tests: {'passed' if r.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s\n", flush=True
    )
    return r.returncode == 0


def run_bench(n_log2: int, batch: int, compiled: bool) -> bool:
    from bench import kernels as kb

    device = torch.device("cuda")
    n_big, n_batch = 2**n_log2, batch * kb.MNIST
    providers = ["triton", "reference-eager"] + (["reference-compiled"] if compiled else [])
    ops = list(kb.OPS)
    t0 = time.perf_counter()
    rows = kb.run(ops, providers, [n_batch, n_big], torch.float32, device)
    from bench.harness import RESULTS, slug
    from fastflow.device import device_name

    name = device_name(device)
    path = kb.write(rows, RESULTS, slug(device, "check"))
    print(f"bench: {len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {path}\n")

    def cell(op, prov, n):
        return next((r for r in rows if r["op"] == op and r["provider"] == prov and r["n"] == n), None)

    copy = cell("copy", "torch", n_big)
    print(f"{name}, torch {torch.__version__}; copy bandwidth at N = 2^{n_log2}: {copy['gb_per_s']:.0f} GB/s\n")
    print(f"| op | B/elem | triton GB/s at 2^{n_log2} | % of copy | speedup vs eager at B={batch} | vs compiled |")
    print("|---|---|---|---|---|---|")
    ok = True
    for op in ops[1:]:
        big, tb = cell(op, "triton", n_big), cell(op, "triton", n_batch)
        if big is None or tb is None:
            print(f"| {op} | missing |")
            ok = False
            continue
        eager, comp = cell(op, "reference-eager", n_batch), cell(op, "reference-compiled", n_batch)
        vs_e = f"{eager['median_ms'] / tb['median_ms']:.2f}x" if eager else "–"
        vs_c = f"{comp['median_ms'] / tb['median_ms']:.2f}x" if comp else "–"
        pct = 100 * big["gb_per_s"] / copy["gb_per_s"]
        print(f"| {op} | {big['bytes_per_element']} | {big['gb_per_s']:.0f} | {pct:.0f}% | {vs_e} | {vs_c} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-compiled", action="store_true", help="no reference-compiled provider (saves compiles)")
    p.add_argument("--n-log2", type=int, default=24)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (the CPU suite is `make test`)", file=sys.stderr)
        return 1
    ok = True
    if not args.skip_tests:
        ok &= run_tests()
    ok &= run_bench(args.n_log2, args.batch, not args.skip_compiled)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
