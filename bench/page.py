"""The demo page (web/) in headless Chromium, driven from Python: what the browser test (tests/web/test_page.py)
and ``python -m bench web`` share. :class:`Page` starts ``web/serve.py`` on 127.0.0.1 with a model, opens the page
in Debian's Chromium through playwright (never a browser playwright downloads), and drives it through its JS API
(``window.fastflowGenerate``) or its controls; :meth:`Page.drawn` reads back the pixels the page drew."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import torch

from fastflow.io import atomic_save

__all__ = ["WEB", "CHROMIUM", "CHROMIUM_FLAGS", "browser_missing", "seeded_noise", "Page"]

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
