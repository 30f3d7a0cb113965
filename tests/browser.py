"""The browser, for the tests: Debian's Chromium driven by Playwright, pages served from
localhost only (the built site; llama.cpp's WebAssembly build, wllama, from web/node_modules).
`skip_reason` says what is missing where the machine lacks a piece."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WEB = Path(__file__).resolve().parents[1] / "web"
CHROMIUM = Path("/usr/bin/chromium")


def skip_reason(*, wllama: bool = True) -> str | None:
    """Why the browser tests cannot run here, or None: Chromium, Playwright, and (for llama.cpp)
    the npm packages of web/package.json."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (Debian: apt-get install chromium)"
    if wllama and not (WEB / "node_modules" / "@wllama" / "wllama").is_dir():
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
def served(root: Path) -> Iterator[str]:
    """Folder `root` served over HTTP on 127.0.0.1 while the block runs: its origin."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (a `Browser`), never a downloaded one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def keep_local(page: Any, origin: str) -> list[str]:
    """Every request of `page` that would leave `origin`, refused and listed (the list fills
    as the page runs). blob: and data: URLs are the page's own memory, not requests."""
    local = (origin, f"blob:{origin}", "data:")
    outside: list[str] = []

    def route(route: Any) -> None:
        if route.request.url.startswith(local):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    return outside


def llama_cpp_complete(gguf: Path, prompt: str, max_tokens: int, logprobs: int = 0) -> dict:
    """llama.cpp's greedy continuation of `prompt` by GGUF file `gguf`, in the browser: the
    OpenAI-style choice (``text``, and ``logprobs`` of the `logprobs` likeliest tokens a step).
    Every request the page makes must stay on localhost."""
    models = WEB / "llama" / "models"
    models.mkdir(exist_ok=True)
    copy = models / gguf.name
    shutil.copyfile(gguf, copy)
    try:
        with served(WEB) as origin, chromium() as browser:
            page = browser.new_page()
            outside = keep_local(page, origin)
            page.goto(f"{origin}/llama/index.html")
            page.wait_for_function("window.ready === true")
            choice = page.evaluate(
                "([m, p, n, k]) => window.complete(m, p, n, k)",
                [f"models/{gguf.name}", prompt, max_tokens, logprobs],
            )
    finally:
        copy.unlink(missing_ok=True)
    assert not outside, f"the page reached outside localhost: {outside}"
    return choice
