"""``python -m bench kernels``: every kernels op over N elements, per provider, in GB/s.

Providers: ``reference-eager`` (kernels.reference as written), ``reference-compiled`` (torch.compile of the same
function, dynamic shapes: one compile per op) and ``triton`` (the public op with the Triton backend forced; CUDA
only: on CPU the kernels exist only in Triton's interpreter, which is a test tool, not a provider). A ``copy``
row (``y.copy_(x)``, 8 B per fp32 element) is the device's bandwidth yardstick.

Timing: ``triton.testing.do_bench`` on CUDA (its median and 20th/80th percentiles, L2 flushed between runs); on
CPU a timer loop (2 warm-up calls, then calls until 0.25 s or 50 calls, at least 5). Bandwidth is
``BYTES[op](dtype) · N / median`` with the per-element bytes of :data:`OPS` (kernels/README.md has the table).

Rows go to ``bench/results/kernels-<device>.json`` and ``.csv``, each tagged with the device name and the torch
and triton versions; a markdown table is printed. ``--max-log2`` narrows the range (CPU default 20, step 2).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from fastflow.errors import ArgumentParser
from fastflow.settings import add_settings, setting
from kernels import reference

from .harness import RESULTS, machine, quantile, slug, versions, write_rows

__all__ = ["OPS", "PROVIDERS", "bytes_per_element", "measure", "run", "markdown_table", "main"]

PROVIDERS = ("reference-eager", "reference-compiled", "triton")
MNIST = 28 * 28


@dataclass(frozen=True)
class Op:
    """One benchmarked op: the tensors it reads and writes per element (``d`` = the storage dtype of z/eps/v,
    ``f`` = fp32: the ODE state x), and how to build a call from fp32/``d`` inputs."""

    reads: str
    writes: str
    note: str


# Per element; t (one float per sample) and the loss's partial sums (one float per 4096 elements) are left out.
OPS: dict[str, Op] = {
    "copy": Op("d", "d", "y.copy_(x): the bandwidth yardstick"),
    "flow_path": Op("dd", "dd", "reads z, eps; writes x_t, u"),
    "flow_path_xt": Op("dd", "d", "flow_path(with_target=False): reads z, eps; writes x_t"),
    "loss_fwd": Op("ddd", "", "reads v, z, eps; writes one float per block"),
    "loss_fwd_bwd": Op("dddddd", "d", "forward, then backward re-reads v, z, eps and writes dv"),
    "euler_step_": Op("fd", "f", "reads x (fp32), v; writes x"),
    "guided_euler_step_": Op("fdd", "f", "reads x, v_cond, v_uncond; writes x"),
}


def bytes_per_element(op: str, dtype: torch.dtype) -> int:
    size = {"d": torch.empty((), dtype=dtype).element_size(), "f": 4}
    spec = OPS[op]
    return sum(size[c] for c in spec.reads + spec.writes)


def _fresh(v: torch.Tensor) -> None:
    """Drop v.grad: the backward then stores dv instead of accumulating into it (no extra read-modify-write)."""
    v.grad = None


def _ref_flow_path_xt(z, eps, t):
    return reference.flow_path(z, eps, t, with_target=False)


def _ref_loss_fwd_bwd(v, z, eps):
    reference.flow_matching_loss(v, z, eps).backward()


def _calls(op: str, n: int, dtype: torch.dtype, device: torch.device, provider: str) -> Callable[[], object]:
    """A zero-argument callable that runs ``op`` once on fresh inputs of ``n`` elements (n = B·784)."""
    gen = torch.Generator(device=device).manual_seed(0)
    # Samples of 784 (MNIST) or 1024 elements, so that t (one float per sample) stays a rounding error in the bytes.
    per = next((s for s in (MNIST, 1024) if n % s == 0), 1)
    shape = (n // per, per)

    def rnd(dt=dtype):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    z, eps, v = rnd(), rnd(), rnd()
    t = torch.rand(shape[0], generator=gen, device=device)
    x = rnd(torch.float32)
    h, w = torch.tensor(1e-3, device=device), torch.tensor(1.5, device=device)
    if op == "copy":
        y = torch.empty_like(z)
        return lambda: y.copy_(z)

    if provider == "triton":
        fns = {
            "flow_path": lambda: kernels.flow_path(z, eps, t),
            "flow_path_xt": lambda: kernels.flow_path(z, eps, t, with_target=False),
            "loss_fwd": lambda: kernels.flow_matching_loss(v, z, eps),
            "loss_fwd_bwd": lambda: _fresh(vg) or kernels.flow_matching_loss(vg, z, eps).backward(),
            "euler_step_": lambda: kernels.euler_step_(x, v, h),
            "guided_euler_step_": lambda: kernels.guided_euler_step_(x, v, z, h, w),
        }
        vg = v.detach().requires_grad_()
        fn = fns[op]

        def forced():
            with kernels.use_backend("triton"):
                return fn()

        return forced

    ref = {
        "flow_path": (reference.flow_path, (z, eps, t)),
        "flow_path_xt": (_ref_flow_path_xt, (z, eps, t)),
        "loss_fwd": (reference.flow_matching_loss, (v, z, eps)),
        "loss_fwd_bwd": (_ref_loss_fwd_bwd, (v.detach().requires_grad_(), z, eps)),
        "euler_step_": (reference.euler_step_, (x, v, h)),
        "guided_euler_step_": (reference.guided_euler_step_, (x, v, z, h, w)),
    }
    fn, args = ref[op]
    if provider == "reference-compiled":
        fn = _compiled(op, fn)
    if op.endswith("fwd_bwd"):  # backward() runs outside the compiled forward, as in a train step
        return lambda: _fresh(args[0]) or fn(*args)
    return lambda: fn(*args)


_COMPILED: dict[str, Callable] = {}


def _compiled(op: str, fn: Callable) -> Callable:
    """One torch.compile per op, with dynamic shapes so that every N reuses it."""
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(fn, dynamic=True)
    return _COMPILED[op]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, budget_s: float = 0.25) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of one call, in ms."""
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(lo), float(hi)
    for _ in range(2):  # warm-up: compiles, allocator
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), quantile(times, 0.2), quantile(times, 0.8)


def run(
    ops: list[str],
    providers: list[str],
    sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Measure every (op, provider, N); providers that cannot run on ``device`` are skipped with a note."""
    meta = {**machine(device), **versions()}
    rows = []
    for op in ops:
        for provider in ["torch"] if op == "copy" else providers:
            if provider == "triton" and device.type != "cuda":
                print(f"skip {op}/triton: Triton runs natively only on CUDA", file=sys.stderr)
                continue
            for n in sizes:
                fn = _calls(op, n, dtype, device, provider)
                med, lo, hi = measure(fn, device)
                bpe = bytes_per_element(op, dtype)
                row = {
                    "op": op,
                    "provider": provider,
                    "n": n,
                    "dtype": str(dtype).removeprefix("torch."),
                    "bytes_per_element": bpe,
                    "median_ms": med,
                    "p20_ms": lo,
                    "p80_ms": hi,
                    "gb_per_s": bpe * n / (med * 1e-3) / 1e9,
                    **meta,
                    "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                }
                rows.append(row)
                if on_row:
                    on_row(row)
                del fn
    return rows


COLUMNS = [
    "op", "provider", "n", "dtype", "bytes_per_element", "median_ms", "p20_ms", "p80_ms", "gb_per_s",
    "device", "device_name", "isa", "threads", "torch", "triton", "loadavg_1m",
]  # fmt: skip


def write(rows: list[dict], out_dir: Path, tag: str) -> Path:
    """bench/results/kernels-<tag>.json and .csv, rewritten atomically after every row."""
    return write_rows(rows, {"suite": "kernels"}, out_dir / f"kernels-{tag}", COLUMNS)


def markdown_table(rows: list[dict]) -> str:
    """One line per (op, N): GB/s per provider, and the speedup of the fastest provider over reference-eager."""
    provs = [p for p in ("torch", *PROVIDERS) if any(r["provider"] == p for r in rows)]
    head = ["op", "N", "B/elem", *[f"{p} GB/s" for p in provs], *[f"{p} ms" for p in provs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["op"], r["n"]) for r in rows))
    for op, n in keys:
        cell = {r["provider"]: r for r in rows if r["op"] == op and r["n"] == n}
        some = next(iter(cell.values()))
        gbs = [f"{cell[p]['gb_per_s']:.1f}" if p in cell else "–" for p in provs]
        ms = [f"{cell[p]['median_ms']:.3f}" if p in cell else "–" for p in provs]
        lines.append(f"| {op} | {n} | {some['bytes_per_element']} | " + " | ".join(gbs + ms) + " |")
    return "\n".join(lines)


def speedups(rows: list[dict], n: int) -> list[str]:
    """Lines 'op: triton x.xx× reference-eager, y.yy× reference-compiled' at N = n."""
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        cell = {r["provider"]: r["median_ms"] for r in rows if r["op"] == op and r["n"] == n}
        if "triton" in cell:
            vs = [f"{cell[p] / cell['triton']:.2f}x over {p}" for p in PROVIDERS[:2] if p in cell]
            out.append(f"{op}: triton " + ", ".join(vs))
    return out


@dataclass(frozen=True)
class KernelSettings:
    """Which ops, providers and sizes."""

    device: str = setting("auto", "where to measure: auto = cuda if available", choices=("auto", "cpu", "cuda"))
    min_log2: int = setting(12, "smallest N = 2^k", metavar="K")
    max_log2: int | None = setting(None, "largest N = 2^k", metavar="K", shown="26 on CUDA, 20 on CPU")
    step: int | None = setting(None, "log2 step between sizes", metavar="K", shown="1 on CUDA, 2 on CPU")
    batch: tuple[int, ...] = setting((128,), "also N = B·784 for each B")
    ops: str = setting(",".join(OPS), "comma-separated subset of: " + ", ".join(OPS), metavar="OP,...", shown="all")
    providers: str = setting(
        ",".join(PROVIDERS), "comma-separated subset of: " + ", ".join(PROVIDERS), metavar="P,...", shown="all"
    )
    dtype: str = setting("float32", "z, eps, v storage", choices=("float32", "bfloat16", "float16"))
    threads: int | None = setting(None, "torch CPU threads; 1 is steadier on a shared box", shown="torch's")
    out: str = setting(str(RESULTS), "results folder", shown="bench/results")
    tag: str = setting("", "appended to the results file name", shown="none")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench kernels", description=__doc__.split("\n\n")[0])
    add_settings(p.add_argument_group("kernels"), KernelSettings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from fastflow.device import device_name, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    ops = [o for o in args.ops.split(",") if o]
    providers = [p for p in args.providers.split(",") if p]
    for name, given, known in (("op", ops, OPS), ("provider", providers, PROVIDERS)):
        bad = [g for g in given if g not in known]
        if bad:
            print(f"error: unknown {name} {', '.join(bad)}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    top = args.max_log2 if args.max_log2 is not None else (26 if cuda else 20)
    step = args.step or (1 if cuda else 2)
    sizes = sorted({2**k for k in range(args.min_log2, top + 1, step)} | {b * MNIST for b in args.batch})
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(device)
    tag = slug(device, args.tag)
    print(f"kernels bench on {name}, torch {torch.__version__}; N in {sizes}; {args.dtype}", file=sys.stderr)

    rows: list[dict] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        write(rows, Path(args.out), tag)
        print(
            f"{row['op']:>20} {row['provider']:>18} N={row['n']:>9}: {row['median_ms']:9.3f} ms {row['gb_per_s']:8.2f} GB/s",
            file=sys.stderr,
        )

    run(ops, providers, sizes, dtype, device, on_row)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    path = write(rows, Path(args.out), tag)
    print(f"\nkernels on {name}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, {args.dtype}:\n")
    print(markdown_table(rows))
    batch_n = args.batch[0] * MNIST
    lines = speedups(rows, batch_n)
    if lines:
        print(f"\nspeedup at N = {batch_n} (batch {batch_n // MNIST}):")
        print("\n".join(lines))
    print(f"\nrows: {path} and {path.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
