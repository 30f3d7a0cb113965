"""llama.cpp itself, for the tests: its WebAssembly build (wllama, from web/node_modules) in
Debian's Chromium, driven by Playwright, served from localhost only. `skip_reason` says what
is missing where the machine lacks a piece."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WEB = Path(__file__).resolve().parents[1] / "web"
CHROMIUM = Path("/usr/bin/chromium")


def skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (Debian: apt-get install chromium)"
    if not (WEB / "node_modules" / "@wllama" / "wllama").is_dir():
        return "web/node_modules lacks @wllama/wllama (run: npm ci --prefix web)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download)"
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _served(root: Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def llama_cpp_complete(gguf: Path, prompt: str, max_tokens: int, logprobs: int = 0) -> dict:
    """llama.cpp's greedy continuation of `prompt` by GGUF file `gguf`, in the browser: the
    OpenAI-style choice (``text``, and ``logprobs`` of the `logprobs` likeliest tokens a step).
    Every request the page makes must stay on localhost."""
    from playwright.sync_api import sync_playwright

    models = WEB / "llama" / "models"
    models.mkdir(exist_ok=True)
    served = models / gguf.name
    shutil.copyfile(gguf, served)
    outside: list[str] = []
    try:
        with _served(WEB) as origin, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            # blob: and data: URLs are the page's own memory (wllama's worker), not a request.
            local = (origin, f"blob:{origin}", "data:")
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(f"{origin}/llama/index.html")
            page.wait_for_function("window.ready === true")
            choice = page.evaluate(
                "([m, p, n, k]) => window.complete(m, p, n, k)",
                [f"models/{gguf.name}", prompt, max_tokens, logprobs],
            )
            browser.close()
    finally:
        served.unlink(missing_ok=True)
    assert not outside, f"the page reached outside localhost: {outside}"
    return choice
