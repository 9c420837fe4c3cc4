"""``python -m bench <suite> [flags]``: throughput and memory grids, written to bench/results/."""

from __future__ import annotations

import importlib
import os
import sys

SUITES = {
    "kernels": "bench.kernels",  # each Triton op vs the reference, GB/s
    "train": "bench.grid",  # train-step images/s and memory across batch sizes and modes
    "sample": "bench.grid",  # sampler images/s at 10, 20 and 50 NFE
    "tables": "bench.tables",  # the compact tables of result files: python -m bench tables FILE.json ...
    "recipe": "bench.recipe",  # time to quality: the training command, then the judge
    "report": "bench.report",  # docs/results.md, the README's glance table and docs/cli.md from the files
    "aot": "bench.aot",  # every Triton kernel compiled for sm_80 / sm_90 without a GPU: registers, spills, smem
    "roofline": "bench.roofline",  # the bound on images/s from FLOPs, bytes and launches against device peaks
    "web": "bench.web",  # the demo page in headless Chromium against fastflow.sample (docs/export.md)
}


INTERRUPTED = 130  # bench.grid.main's status after Ctrl-C / SIGINT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench {{{','.join(SUITES)},all}} [flags]   (python -m bench SUITE --help)")
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if suite == "all":
        rc = 0
        for name in ("kernels", "train", "sample"):
            one = importlib.import_module(SUITES[name]).main([name, *rest] if name != "kernels" else rest)
            if one == INTERRUPTED:
                return one
            rc |= one
        return rc
    if suite not in SUITES:
        print(f"error: unknown suite {suite!r}; choose one of {', '.join(SUITES)}, all", file=sys.stderr)
        return 2
    mod = importlib.import_module(SUITES[suite])
    return mod.main([suite, *rest] if suite in ("train", "sample") else rest)


if __name__ == "__main__":
    rc = main()
    if rc == INTERRUPTED:  # the grid wrote its rows and tables; don't wait at exit for compile workers or
        sys.stdout.flush()  # DataLoader processes that got the same SIGINT (gpu_check.sh's budget)
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
