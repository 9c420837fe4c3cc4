"""The command line of ``python -m bench aot``: its settings (one field each, :func:`fastflow.settings.setting`),
the run (enumerate, compile, probe) as one document, and :func:`main`. Call it through :func:`bench.aot.main`,
which sets ``TRITON_INTERPRET=0`` before anything imports triton."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastflow.errors import ArgumentParser
from fastflow.io import atomic_write_text
from fastflow.settings import add_settings, setting

from ..harness import RESULTS, versions
from .calls import SHAPES
from .compiling import compile_all, spill_probe, tool, tool_version
from .gpu import check_gpu
from .table import aot_table, problems, summary_lines, to_json, variant_id, write_doc
from .targets import TARGETS, capability
from .variants import coverage, enumerate_variants, find_jit_functions

__all__ = ["AotSettings", "build_parser", "run", "main"]

DEFAULT_OUT = RESULTS / "kernels-aot.json"


def parse_targets(text: str) -> tuple[str, ...]:
    """An argparse type: ``"sm_80,sm_90"`` -> ``("sm_80", "sm_90")``, each of the form sm_XX."""
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        for t in out:
            capability(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one target")
    return out


@dataclass(frozen=True)
class AotSettings:
    """Which binaries, and where the rows and the page go."""

    targets: tuple[str, ...] = setting(
        TARGETS, "GPU targets, comma-separated", parse=parse_targets, metavar="sm_XX,..."
    )
    dtypes: str = setting(
        "default",
        "dtype cases: default (uniform, amp, each input alone in a half type), all (every combination the ops "
        "accept: 6x the compiles)",
        choices=("default", "all"),
    )
    out: str = setting(str(DEFAULT_OUT), "rows as JSON", metavar="FILE.json", shown="bench/results/kernels-aot.json")
    markdown: bool = setting(False, "print the summary and the markdown table")
    doc: str = setting("", "also write the markdown page (docs/kernels-aot.md)", metavar="FILE.md")
    jobs: int = setting(0, "compile processes; 0: one per core, at most 8", metavar="N")
    cache_dir: str = setting("", "Triton's cache", metavar="DIR", shown="$TRITON_CACHE_DIR, else ~/.triton/cache")
    check_gpu: bool = setting(
        False, "also launch every variant on this machine's CUDA GPU and compare the driver's figures"
    )


def build_parser() -> ArgumentParser:
    from . import __doc__ as doc

    p = ArgumentParser(prog="python -m bench aot", description=doc.split("\n\n")[0].replace("``", "`"))
    add_settings(p.add_argument_group("aot"), AotSettings)
    return p


def run(targets: list[str], mode: str = "default", jobs: int = 1) -> dict:
    """Enumerate, compile and probe; the document written to JSON."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the enumeration's tensor ops are tiny; no thread pool to carry into the fork
    found = find_jit_functions()
    variants, launched = enumerate_variants(mode)
    t1 = time.perf_counter()
    caps = [capability(t) for t in targets]
    rows = compile_all(variants, caps, jobs)
    probes = [spill_probe(variants, cap) for cap in caps]
    t2 = time.perf_counter()
    order = {name: i for i, name in enumerate(found)}
    rows.sort(key=lambda r: (order[r["kernel"]], *variant_id(r), capability(r["target"])))
    v = versions()
    return {
        "suite": "aot",
        "command": "python -m bench aot " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["aot"] else sys.argv[1:]),
        "triton": v["triton"],
        "torch": v["torch"],
        "ptxas": tool_version(tool("ptxas", max(caps))),
        "targets": [f"sm_{c}" for c in caps],
        "dtypes": mode,
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "kernels": coverage(variants, found),
        "launches_recorded": launched,
        "timing": {
            "enumerate_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2),
            "jobs": jobs,
            "compiled": sum(1 for r in rows if not r.get("cached", True)),
            "from_cache": sum(1 for r in rows if r.get("cached")),
        },
        "spill_probe": probes,
        "rows": rows,
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    targets = list(args.targets)
    caps = [capability(t) for t in targets]
    if args.check_gpu:
        if not torch.cuda.is_available():
            print("error: --check-gpu needs a CUDA GPU", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        if 10 * major + minor not in caps:
            targets.append(f"sm_{10 * major + minor}")
    jobs = args.jobs or min(_cores(), 8)
    t0 = time.perf_counter()
    doc = run(targets, args.dtypes, jobs)
    doc["timing"]["total_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(args.out, to_json(doc))
    if args.doc:
        write_doc(doc, Path(args.doc))
    bad = problems(doc)
    tm = doc["timing"]
    print(
        f"aot: {len(doc['rows'])} compilations ({len(doc['rows']) // max(1, len(doc['targets']))} variants x "
        f"{', '.join(doc['targets'])}), {tm['compiled']} compiled and {tm['from_cache']} from Triton's cache, "
        f"{tm['jobs']} jobs: enumerate {tm['enumerate_s']} s, compile {tm['compile_s']} s, total {tm['total_s']} s; "
        f"triton {doc['triton']}, ptxas {doc['ptxas']} -> {args.out}",
        file=sys.stderr,
    )
    if args.markdown:
        print(summary_lines(doc) + "\n\n" + aot_table(doc["rows"]))
    if args.check_gpu:
        report = check_gpu(doc["rows"], args.dtypes)
        print("\n".join(report))
        bad += [line for line in report if line.startswith(("MISMATCH", "MISSING", "FAILED"))]
    for line in bad:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if bad else 0
