"""``python -m bench web``: the demo page (web/) in headless Chromium, timed against fastflow's own sampler.

The driver here is shared with the browser test (tests/web/test_page.py): :class:`Page` starts ``web/serve.py``
on 127.0.0.1 with a model, opens the page in Debian's Chromium through playwright (never a browser playwright
downloads), and drives it through its JS API (``window.fastflowGenerate``) or its controls; :meth:`Page.drawn`
reads back the pixels the page drew.

``python -m bench web --checkpoint DIR [export flags]`` exports the checkpoint's sampler (as ``fastflow.export``
does), times 100 digits in the page (a warm-up, then the median of ``--repeats``), the same 100 digits through
fastflow's sampler in this process (fp32, one thread and all of them) and through onnxruntime's Python CPU
runtime, writes the rows to ``bench/results/web-cpu[-TAG].json`` tagged with the CPU and its ISA, and a
screenshot of the page to ``--screenshot``. ``python -m bench web --table FILE...`` prints docs/export.md's table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastflow.errors import ArgumentParser, UserError, cli
from fastflow.io import atomic_save, atomic_write_json

__all__ = [
    "WEB",
    "CHROMIUM",
    "CHROMIUM_FLAGS",
    "browser_missing",
    "fastflow_sample",
    "seeded_noise",
    "Page",
    "cpu_name",
    "cpu_vector_flags",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
CHROMIUM = Path(os.environ.get("FASTFLOW_CHROMIUM", "/usr/bin/chromium"))  # Debian's package `chromium`
# Headless on a closed network: without these Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PIXELS = 28 * 28


def browser_missing() -> str | None:
    """Why the page cannot be opened here (None: it can): playwright, Chromium, or ``make web``'s files missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set FASTFLOW_CHROMIUM)"
    if not (WEB / "vendor" / "ort.wasm.min.js").exists():
        return f"{WEB / 'vendor'} has no onnxruntime-web (make web: npm ci)"
    return None


def seeded_noise(n: int, seed: int) -> torch.Tensor:
    """x at t = 0 for ``n`` images, [n, 1, 28, 28] fp32: what fastflow's sampler draws from a generator seeded
    ``seed`` on the CPU (fastflow.solvers.initial_noise)."""
    return torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def fastflow_sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    solver: str,
    steps: int,
    *,
    guidance: float = 1.0,
    interval: tuple[float, float] | None = None,
    grid: str = "uniform",
    seed: int = 0,
) -> torch.Tensor:
    """fastflow's own sampler on ``labels`` [N] from :func:`seeded_noise` (N, ``seed``): images [N, 1, 28, 28] in
    [0, 1]. The one call of :func:`fastflow.solvers.sample` in bench/ and tests/ (the exported graph's reference)."""
    from fastflow.solvers import sample

    g = torch.Generator().manual_seed(seed)
    images, _ = sample(
        model, labels, steps, solver=solver, guidance=guidance, grid=grid, interval=interval, generator=g
    )
    return images


def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_vector_flags() -> list[str]:
    """The vector extensions this CPU reports that decide these timings (torch's kernels use the widest; the
    browser's wasm has 128-bit SIMD whatever the CPU)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]


class Page:
    """The demo page serving ``model`` (an exported ONNX sampler), open in headless Chromium; a context manager.

    ``query``: the page's URL query (``?seed=0`` makes its own noise repeatable). ``timeout_s``: for the model to
    load and for each generation."""

    def __init__(self, model: str | Path, query: str = "", timeout_s: float = 120.0, viewport=(760, 600)):
        self.model, self.query, self.timeout_s, self.viewport = Path(model), query, timeout_s, viewport
        self.server: subprocess.Popen | None = None
        self._pw = self.browser = self.page = None
        self.console: list[str] = []  # the page's console messages and errors, for a failing test's message

    # -- start and stop ------------------------------------------------------------------------------------------

    def __enter__(self) -> Page:
        why = browser_missing()
        if why:
            raise RuntimeError(why)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        cmd = [sys.executable, str(WEB / "serve.py"), "--model", str(self.model), "--port", "0"]
        self.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.server.stdout], [], [], 30)
        line = self.server.stdout.readline().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.server.kill()
            raise RuntimeError(f"web/serve.py did not start: {line or self.server.stderr.read().strip()}")
        self.url = line + self.query
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        self.version = self.browser.version
        w, h = self.viewport
        self.page = self.browser.new_page(viewport={"width": w, "height": h})
        self.page.set_default_timeout(self.timeout_s * 1000)
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(self.url)
        self.page.wait_for_function("window.fastflowReady || window.fastflowError")
        err = self.page.evaluate("window.fastflowError || null")
        if err:
            raise RuntimeError(f"the page could not load the model: {err}")
        self.ready = self.page.evaluate("window.fastflowReady")

    def close(self) -> None:
        for step in (
            lambda: self.browser and self.browser.close(),
            lambda: self._pw and self._pw.stop(),
        ):
            try:
                step()
            except Exception:
                pass
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.browser = self._pw = self.server = None

    # -- driving ---------------------------------------------------------------------------------------------------

    def generate(
        self,
        digit: int | str,
        count: int,
        w: float | None = None,
        noise: torch.Tensor | None = None,
        raw: bool = False,
    ) -> dict:
        """``window.fastflowGenerate(digit, count, {w, noise, raw})``: draws ``count`` digits (``"all"``: 0-9 in
        turn); returns the page's ``{ms, drawMs, count, labels}`` (``ms``: session.run alone, in the page's clock),
        with ``raw`` also ``images``: the graph's output as a tensor [count, 1, 28, 28]."""
        opts: dict = {"raw": raw}
        if w is not None:
            opts["w"] = float(w)
        if noise is not None:
            opts["noise"] = noise.detach().to(torch.float32).reshape(-1).tolist()  # exact: fp32 -> double -> fp32
        r = self.page.evaluate("([d, c, o]) => window.fastflowGenerate(d, c, o)", [digit, count, opts])
        if raw:
            r["images"] = torch.tensor(r["images"], dtype=torch.float32).reshape(count, 1, 28, 28)
        return r

    def click(self, digit: int | str, count: int, w: float | None = None) -> str:
        """The visible controls: pick ``digit`` and ``count`` (and ``w`` where the model takes it), press Generate,
        wait for ``count`` new canvases; returns the status line the page shows."""
        p = self.page
        p.evaluate("window.__fastflowOld = document.querySelector('#grid').firstChild")
        p.select_option("#digit", str(digit))
        p.fill("#count", str(count))
        if w is not None:
            p.fill("#w", str(w))
        p.click("#go")
        p.wait_for_function(
            "([n]) => { const g = document.querySelector('#grid'); return g.children.length === n"
            " && g.firstChild !== window.__fastflowOld && !document.querySelector('#go').disabled; }",
            arg=[count],
        )
        return p.inner_text("#status")

    def drawn(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the page drew: (images [N, 1, 28, 28] fp32 in [0, 1] from each canvas's pixels, labels [N])."""
        rows = self.page.evaluate(
            """() => Array.from(document.querySelectorAll('#grid canvas'), (c) => {
                const d = c.getContext('2d').getImageData(0, 0, 28, 28).data;
                const px = new Array(784);
                for (let i = 0; i < 784; i++) px[i] = d[4 * i];
                return [Number(c.dataset.label), px];
            })"""
        )
        if not rows:
            return torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64)
        labels = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        images = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return images, labels

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the whole page, written atomically."""
        return atomic_save(path, lambda tmp: self.page.screenshot(path=tmp, type="png", full_page=True))


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


def build_parser() -> argparse.ArgumentParser:
    from fastflow.export import build_parser as export_parser

    p = ArgumentParser(
        prog="python -m bench web",
        description="Time the demo page (headless Chromium) against fastflow's sampler on the same 100 digits.",
        parents=[export_parser()],
        conflict_handler="resolve",
    )
    p.add_argument("--w", type=float, default=1.5, help="guidance w fed to a --guided graph (default: 1.5)")
    p.add_argument("--count", type=int, default=100, help="digits per generation (default: 100)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations after a warm-up (default: 5)")
    p.add_argument("--tag", default="", help="result file web-cpu-TAG.json (default: web-cpu.json)")
    p.add_argument("--results", default=str(REPO / "bench" / "results"), help="folder for the result file")
    p.add_argument("--screenshot", default=None, help="also write a PNG of the page with its 100 digits here")
    p.add_argument(
        "--judge",
        default=None,
        metavar="DIR",
        help="also ask the page for 10 of each digit and judge the pixels it drew with the classifier cached in DIR "
        "(fastflow.evaluate's --classifier; trained there from --data-root's MNIST if missing)",
    )
    p.add_argument("--data-root", default="data", help="MNIST for --judge's classifier (default: data)")
    p.add_argument("--table", nargs="+", default=None, metavar="FILE", help="print docs/export.md's table; no run")
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
        print(markdown_table([json.loads(Path(f).read_text()) for f in args.table]))
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
    spec = resolve_spec(
        ckpt.objective, args.solver, args.steps, args.grid, args.guided, args.guidance_interval, str(ckpt.path)
    )
    model = build_model(ckpt, use_ema=not args.no_ema).float().eval()
    w = args.w if spec.guided else None
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
                    return _timed_ms(
                        lambda: fastflow_sample(
                            model, labels, spec.solver, spec.steps, guidance=w or 1.0, interval=spec.interval,
                            grid=spec.grid,
                        )
                    )  # fmt: skip

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
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
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
