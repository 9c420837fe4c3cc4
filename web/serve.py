"""Serve the demo page on localhost: ``python web/serve.py [--model FILE] [--port 8000]``.

Plain files from this folder (index.html, app.js, vendor/ from ``make web``), and ``/model.onnx`` from ``--model``
(default: web/model.onnx, written by ``make demo``). Standard library only; binds 127.0.0.1, never another
interface. Port 0 picks a free port. The first line on stdout is the page's address (the tests read it).

No cross-origin-isolation headers: the page runs onnxruntime-web's wasm on one thread, which needs none.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "vendor"
TYPES = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".onnx": "application/octet-stream",
}


class Handler(http.server.SimpleHTTPRequestHandler):
    model: Path = HERE / "model.onnx"
    quiet = True

    def translate_path(self, path: str) -> str:
        if path.split("?", 1)[0].split("#", 1)[0] == "/model.onnx":
            return str(self.model)
        return super().translate_path(path)

    def guess_type(self, path) -> str:
        return TYPES.get(Path(str(path)).suffix, None) or super().guess_type(path)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a new export shows on reload
        super().end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python web/serve.py", description="Serve fastflow's demo page on 127.0.0.1.")
    p.add_argument("--model", default=str(HERE / "model.onnx"), help="the ONNX sampler to serve as /model.onnx")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default: 8000)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if not (VENDOR / "ort.wasm.min.js").exists():
        print(f"error: {VENDOR} has no onnxruntime-web; run `make web` first", file=sys.stderr)
        return 2
    model = Path(args.model)
    if not model.is_file():
        print(f"error: --model {model}: no such file; export one with python -m fastflow.export", file=sys.stderr)
        return 2
    handler = type("Handler", (Handler,), {"model": model.resolve(), "quiet": not args.verbose})
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), functools.partial(handler, directory=HERE))
    except OSError as e:
        print(f"error: cannot listen on 127.0.0.1:{args.port} ({e.strerror})", file=sys.stderr)
        return 1
    print(f"http://127.0.0.1:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
