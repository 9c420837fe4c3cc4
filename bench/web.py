"""``python -m bench web``: the demo page (web/) in headless Chromium, timed against fastflow's own sampler.

``python -m bench web --checkpoint DIR [export flags]`` exports the checkpoint's sampler (as ``fastflow.export``
does), times 100 digits in the page (:class:`bench.page.Page`: a warm-up, then the median of ``--repeats``), the
same 100 digits through fastflow's sampler in this process (fp32, one thread and all of them) and through
onnxruntime's Python CPU runtime, in interleaved rounds, writes the rows to ``bench/results/web-cpu[-TAG].json``
tagged with the CPU and its ISA, and a screenshot of the page to ``--screenshot``. ``--table FILE...`` prints the
docs' table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastflow.errors import ArgumentParser, UserError, cli
from fastflow.io import atomic_write_json
from fastflow.settings import add_settings, setting

from .harness import RESULTS, machine
from .page import Page, browser_missing, seeded_noise

__all__ = ["WebSettings", "fastflow_sample", "cpu_vector_flags", "markdown_table", "build_parser", "main"]


def fastflow_sample(model: torch.nn.Module, labels: torch.Tensor, spec, *, seed: int = 0) -> torch.Tensor:
    """fastflow's own sampler (:func:`fastflow.solvers.sample` with the :class:`~fastflow.solvers.SamplerSpec`
    ``spec``) on ``labels`` [N] from :func:`bench.page.seeded_noise` (N, ``seed``): images [N, 1, 28, 28] in
    [0, 1], the exported graph's reference."""
    from fastflow.solvers import sample

    return sample(model, labels, spec, generator=torch.Generator().manual_seed(seed))[0]


def cpu_vector_flags() -> list[str]:
    """The vector extensions this CPU reports that decide these timings (torch's kernels use the widest; the
    browser's wasm has 128-bit SIMD whatever the CPU)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]


# -- the benchmark -----------------------------------------------------------------------------------------------


def _timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def _interleaved(runners: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``runners``: name -> a callable that generates once and returns its time in ms. One first call each (with
    its one-time set-up: oneDNN primitives, wasm memory growth; returned apart), then ``repeats`` rounds, each
    runner once a round: on a machine shared with other jobs a change of load then hits every runtime alike."""
    first = {name: run() for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return first, times


def judge_page(page: Page, cache: str, data_root: str, w: float | None, per_digit: int = 10) -> dict:
    """Ask ``page`` for ``per_digit`` of each digit (its own noise) and judge the pixels it drew with the
    project's classifier: ``{"agree", "of", "per_digit", "classifier_test_accuracy"}``."""
    from fastflow.classifier import load_or_train_classifier

    clf, acc = load_or_train_classifier(data_root, cache, verbose=False)
    per = {}
    for digit in range(10):
        page.generate(digit, per_digit, w)
        images, _ = page.drawn()
        with torch.no_grad():
            per[digit] = int((clf(images).argmax(1) == digit).sum())
    return {"agree": sum(per.values()), "of": 10 * per_digit, "per_digit": per, "classifier_test_accuracy": acc}


class _Threads:
    """torch's intra-op threads set to ``n`` (None: as they are) inside the block."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@dataclass(frozen=True)
class WebSettings:
    """What to time, and where the rows go."""

    w: float = setting(1.5, "guidance w fed to a --guided graph")
    count: int = setting(100, "digits per generation", metavar="N")
    repeats: int = setting(5, "timed generations after a warm-up", metavar="N")
    tag: str = setting("", "result file web-cpu-TAG.json", shown="none: web-cpu.json")
    results: str = setting(str(RESULTS), "folder for the result file", shown="bench/results")
    screenshot: str | None = setting(None, "also write a PNG of the page with its 100 digits here", shown="none")
    judge: str | None = setting(
        None,
        "also ask the page for 10 of each digit and judge the pixels it drew with the classifier cached in DIR "
        "(fastflow.evaluate's --classifier; trained there from --data-root's MNIST if missing)",
        metavar="DIR", shown="none",
    )  # fmt: skip
    data_root: str = setting("data", "MNIST for --judge's classifier")
    table: str | None = setting(
        None, "print the docs' table of these result files (comma-separated); no run", metavar="FILE,...", shown="none"
    )


def build_parser() -> ArgumentParser:
    from fastflow.export import ExportSettings

    p = ArgumentParser(
        prog="python -m bench web",
        description="Time the demo page (headless Chromium) against fastflow's sampler on the same 100 digits.",
    )
    add_settings(p.add_argument_group("export"), ExportSettings, skip=("out",))
    add_settings(p.add_argument_group("timing"), WebSettings)
    return p


def markdown_table(results: list[dict]) -> str:
    """One row a runtime: the median time for ``count`` digits over the timed rounds, and the first call's."""
    out = ["| sampler | runtime | digits | median ms | first call ms |", "|---|---|--:|--:|--:|"]
    for r in results:
        what = f"{r['checkpoint']['objective']} model: {r['sampler']}"
        for row in r["rows"]:
            out.append(f"| {what} | {row['runtime']} | {r['count']} | {row['median_ms']:.0f} | {row['first_ms']:.0f} |")
    cpus = sorted(
        {f"{r['cpu']}, {r['host_cpus']} CPUs, torch ISA {r['isa']} ({' '.join(r['cpu_flags'])})" for r in results}
    )
    return "\n".join(out + [""] + [f"Measured on {c}." for c in cpus])


@cli
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["web"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(Path(f).read_text()) for f in args.table.split(",") if f]))
        return 0
    why = browser_missing()
    if why:
        raise UserError(f"bench web needs a browser: {why}")
    if args.count <= 0 or args.repeats <= 0:
        raise UserError("--count and --repeats must be > 0")

    import onnxruntime as ort

    from fastflow.checkpoint import build_model, load_checkpoint
    from fastflow.export import build_graph, export_onnx, resolve_spec

    ckpt = load_checkpoint(args.checkpoint, with_state=False)
    spec = resolve_spec(ckpt, args.solver, args.steps, args.grid, args.guided, args.guidance_interval)
    model = build_model(ckpt, use_ema=not args.no_ema).float().eval()
    w = args.w if spec.guided else None
    reference = spec.sampler if w is None else dataclasses.replace(spec.sampler, guidance=w)
    n = args.count
    labels = torch.arange(n) % 10  # as the page's "all": 0-9 in turn
    load0 = os.getloadavg()
    noise = seeded_noise(n, 0)
    feed = {"noise": noise.numpy(), "labels": labels.numpy()}
    if w is not None:
        feed["w"] = torch.tensor([w]).numpy()
    all_threads = torch.get_num_threads()
    runners: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastflow-web-") as tmp, contextlib.ExitStack() as stack:
        onnx_path = Path(tmp) / "model.onnx"
        info = export_onnx(build_graph(model, spec), onnx_path, args.opset)
        print(f"exported: {spec.describe()}, opset {info['opset']}, {info['bytes'] / 1e6:.2f} MB")
        page = stack.enter_context(Page(onnx_path, "?seed=0"))
        browser = "browser: onnxruntime-web wasm, 1 thread"
        runners[browser] = lambda: page.generate("all", n, w)["ms"]  # the page's clock, session.run alone
        for threads in (1, all_threads):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            name = f"onnxruntime {ort.__version__} CPU (Python), {threads} thread{'s' * (threads != 1)}"
            runners[name] = lambda s=sess: _timed_ms(lambda: s.run(None, feed))
        for threads in (1, all_threads):

            def draw(threads=threads) -> float:
                with _Threads(threads), torch.no_grad():
                    return _timed_ms(lambda: fastflow_sample(model, labels, reference))

            runners[f"fastflow.sample, torch fp32 eager, {threads} thread{'s' * (threads != 1)}"] = draw
        first, times = _interleaved(runners, args.repeats)
        if args.screenshot:
            page.screenshot(args.screenshot)  # after the last round: the page shows 100 digits
            print(f"screenshot -> {args.screenshot}")
        if args.judge:
            judged = judge_page(page, args.judge, args.data_root, w)
            print(f"the judge agrees with the asked digit for {judged['agree']}/{judged['of']} of the page's digits")
        versions = {"chromium": page.version, "onnxruntime_web": page.ready["version"]}
    rows = []
    for name, runs in times.items():
        rows.append({"runtime": name, "median_ms": statistics.median(runs), "runs_ms": runs, "first_ms": first[name]})
        if name == browser:
            rows[-1].update(versions)
        print(f"{name}: {rows[-1]['median_ms']:.0f} ms for {n} digits (median of {args.repeats})")

    result = {
        "format": "fastflow-bench-1",
        "suite": "web",
        "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": machine(torch.device("cpu"))["device_name"],
        "isa": machine(torch.device("cpu"))["isa"],
        "cpu_flags": cpu_vector_flags(),
        "host_cpus": os.cpu_count(),
        "loadavg_1min": [load0[0], os.getloadavg()[0]],  # before and after: other jobs on the machine
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "checkpoint": {"path": str(ckpt.path), "objective": ckpt.objective, "step": ckpt.step},
        "sampler": spec.describe() + (f", w = {w:g}" if w is not None else ""),
        "opset": info["opset"],
        "count": n,
        "repeats": args.repeats,
        "rows": rows,
        "screenshot": args.screenshot,
        "page_judged": judged if args.judge else None,
    }
    name = f"web-cpu-{args.tag}.json" if args.tag else "web-cpu.json"
    out = atomic_write_json(Path(args.results) / name, result)
    print(f"-> {out}")
    print(markdown_table([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
