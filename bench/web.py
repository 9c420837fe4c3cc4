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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Page:
    """The demo page serving ``model`` (an exported ONNX sampler), open in headless Chromium; a context manager.

    ``query``: the page's URL query (``?seed=0`` makes its own noise repeatable). ``timeout_s``: for the model to
    load and for each generation."""

    def __init__(self, model: str | Path, query: str = "", timeout_s: float = 120.0, viewport=(760, 900)):
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


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first-call set-up (oneDNN primitives, wasm memory growth) is not generation time
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(runs), runs


def _torch_threads(n: int | None):
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_num_threads()
            if n:
                torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Ctx()


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
    p.add_argument("--table", nargs="+", default=None, metavar="FILE", help="print docs/export.md's table; no run")
    return p


def markdown_table(results: list[dict]) -> str:
    out = ["| model, sampler | runtime | 100 digits, median ms | CPU (ISA) |", "|---|---|--:|---|"]
    for r in results:
        what = f"{r['checkpoint']['objective']}: {r['sampler']}"
        for row in r["rows"]:
            out.append(f"| {what} | {row['runtime']} | {row['median_ms']:.0f} | {r['cpu']} ({r['isa']}) |")
    return "\n".join(out)


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
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastflow-web-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        info = export_onnx(build_graph(model, spec), onnx_path, args.opset)
        print(f"exported: {spec.describe()}, opset {info['opset']}, {info['bytes'] / 1e6:.2f} MB")

        with Page(onnx_path, "?seed=0") as page:
            page.generate("all", n, w)  # warm-up
            runs = [page.generate("all", n, w)["ms"] for _ in range(args.repeats)]
            rows.append(
                {
                    "runtime": "browser: onnxruntime-web wasm, 1 thread",
                    "median_ms": statistics.median(runs),
                    "runs_ms": runs,
                    "chromium": page.version,
                    "onnxruntime_web": page.ready["version"],
                }
            )
            print(f"browser: {rows[-1]['median_ms']:.0f} ms for {n} digits (median of {args.repeats})")
            if args.screenshot:
                page.screenshot(args.screenshot)
                print(f"screenshot -> {args.screenshot}")

        noise = seeded_noise(n, 0)
        feed = {"noise": noise.numpy(), "labels": labels.numpy()}
        if w is not None:
            feed["w"] = torch.tensor([w]).numpy()
        for threads in (1, None):
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            med, runs = _median_ms(lambda s=sess: s.run(None, feed), args.repeats)
            label = f"onnxruntime {ort.__version__} CPU (Python), {threads or 'default'} thread{'s' * (threads != 1)}"
            rows.append({"runtime": label, "median_ms": med, "runs_ms": runs})
            print(f"{label}: {med:.0f} ms")

    for threads in (1, None):
        with _torch_threads(threads), torch.no_grad():
            used = torch.get_num_threads()
            med, runs = _median_ms(
                lambda: fastflow_sample(
                    model, labels, spec.solver, spec.steps, guidance=w or 1.0, interval=spec.interval, grid=spec.grid
                ),
                args.repeats,
            )
        label = f"fastflow.sample, torch fp32 eager, {used} thread{'s' * (used != 1)}"
        rows.append({"runtime": label, "median_ms": med, "runs_ms": runs})
        print(f"{label}: {med:.0f} ms")

    result = {
        "format": "fastflow-bench-1",
        "suite": "web",
        "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
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
    }
    name = f"web-cpu-{args.tag}.json" if args.tag else "web-cpu.json"
    out = atomic_write_json(Path(args.results) / name, result)
    print(f"-> {out}")
    print(markdown_table([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
