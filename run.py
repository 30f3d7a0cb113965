#!/usr/bin/env python3
"""Set up and run slmlab's jobs with nothing but Python 3.11+ and git.

    python3 run.py book    # make .venv, train the zoo models, build the book with every chapter run
    python3 run.py test    # make .venv, lint, check notebook pairs, build the book in quick mode,
                           # run the unit tests and check the chapters' outputs
    python3 run.py lab     # JupyterLab on notebooks/, in the same environment
    python3 run.py sync    # authors: regenerate notebooks/*.ipynb from book/*.md
    python3 run.py freeze  # maintainers: re-pin constraints.txt from the current .venv

The environment is `.venv/`, installed from pyproject.toml with the exact pins of
constraints.txt, and re-installed only when one of those two files changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".slmlab-installed"


# Like activating the environment: chapters may call `!slmlab ...`, and it must be this one.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ["VIRTUAL_ENV"] = str(VENV)
# The book downloads nothing from a model hub. Said once here, a library that would try
# (transformers or bitsandbytes looking for a kernel on the hub) fails at once instead of
# waiting on a connection that a machine without the internet never answers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py itself must say so on old Pythons
        sys.exit(f"slmlab needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    t0 = time.time()
    if not PY.exists():
        print(f"creating {VENV.relative_to(ROOT)}/", flush=True)
        venv.create(VENV, with_pip=True)
    sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # torch first and alone, pinned: left to the resolver, a range pulls the CUDA build (GBs).
    sh(PY, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "torch")
    sh(PY, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".[dev]")
    STAMP.write_text(wanted)
    print(f"environment ready in {time.time() - t0:.0f} s", flush=True)


WEB = ROOT / "web"
WEB_STAMP = WEB / "node_modules" / ".slmlab-installed"
CHROMIUM = Path("/usr/bin/chromium")


def ensure_web() -> None:
    """web/node_modules from web/package-lock.json (MathJax and llama.cpp in WebAssembly, which
    the site serves itself), where npm is installed; otherwise one line on what is missing."""
    if shutil.which("npm") is None:
        print(
            "npm not found (Debian: apt-get install npm): the site will load MathJax from its CDN, "
            "chapter 10b's story box has no model, and the browser tests will skip",
            flush=True,
        )
        return
    wanted = hashlib.sha256((WEB / "package-lock.json").read_bytes()).hexdigest()
    if not (WEB_STAMP.exists() and WEB_STAMP.read_text() == wanted):
        sh("npm", "ci", "--prefix", WEB, "--no-audit", "--no-fund")
        WEB_STAMP.write_text(wanted)
    if not CHROMIUM.exists():
        print(
            f"{CHROMIUM} not found (Debian: apt-get install chromium): the browser tests will skip",
            flush=True,
        )


# A broken cross-reference or a missing image fails the build, every page's warnings listed
# first: -n reports references to nothing, -W makes each warning an error.
STRICT = ("-n", "-W", "--keep-going")


def book(output: Path = ROOT) -> None:
    """Train the zoo models the chapters name, then build the site with every chapter executed.

    The chapters then run with training off (SLMLAB_ZOO_TRAIN=0): a chapter that asks for a
    model its front matter does not name fails at once instead of training inside a cell."""
    t0 = time.time()
    ensure_web()  # the site serves MathJax and llama.cpp's WebAssembly build itself
    sh(PY, "tools/notebooks.py", "zoo")
    t1 = time.time()
    sh(
        BIN / "jupyter-book",
        "build",
        ".",
        "--builder",
        "html",
        "--path-output",
        output,
        *STRICT,
        env={**os.environ, "SLMLAB_ZOO_TRAIN": "0"},
    )
    sh(PY, "tools/notebooks.py", "times", output / "_build" / ".jupyter_cache")
    index = output / "_build" / "html" / "index.html"
    print(
        f"\nbook built in {(time.time() - t0) / 60:.1f} minutes "
        f"(zoo {(t1 - t0) / 60:.1f}, chapters and site {(time.time() - t1) / 60:.1f}): open {index}"
    )


def test(extra: list[str]) -> None:
    # Chapters that train zoo models use their quick variants here (minutes, not the book's
    # numbers); `python3 run.py book` trains the full recipes once and caches them.
    os.environ.setdefault("SLMLAB_QUICK", "1")
    sh(BIN / "ruff", "check", ".")
    sh(BIN / "lint-imports")  # the layers contract in pyproject.toml
    sh(PY, "tools/notebooks.py", "check")
    # The book itself, in quick mode and apart from the reader's build: a chapter that raises,
    # or that needs a zoo model its front matter does not name, fails the test command. It
    # starts from nothing, so every chapter runs against the library as it is now (Sphinx
    # re-reads only changed pages and jupyter-cache keys on a chapter's code alone), and runs
    # once: the chapter tests compare the checked cells this build executed.
    quick = ROOT / "_build" / "quick"
    shutil.rmtree(quick, ignore_errors=True)
    book(quick)
    executed = quick / "_build" / ".jupyter_cache"
    sh(
        PY,
        "-m",
        "pytest",
        "tests",
        "-p",
        "no:cacheprovider",
        *extra,
        env={
            **os.environ,
            "SLMLAB_EXECUTED_BOOK": str(executed),
            "SLMLAB_BUILT_SITE": str(quick / "_build" / "html"),  # the browser tests open it
        },
    )


def freeze() -> None:
    pins = subprocess.run(
        [str(PY), "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    # The local label (+cpu) would not match the wheels of other platforms.
    pins = [
        p.split("+")[0] if p.startswith("torch==") else p
        for p in pins
        if not p.lower().startswith("slmlab")
    ]
    header = [
        "# The book's exact environment (pip install -c constraints.txt -e '.[dev]').",
        "# Regenerate with: python3 run.py freeze",
    ]
    (ROOT / "constraints.txt").write_text("\n".join(header + pins) + "\n")


def main(argv: list[str]) -> None:
    job, extra = (argv[0], argv[1:]) if argv else ("", [])
    if job not in {"book", "test", "lab", "sync", "freeze"}:
        sys.exit(__doc__)
    ensure_env()
    if job in {"book", "test", "sync"}:
        # The chapters run headless: their knobs give the static copy alone (`slmlab.widgets`).
        os.environ.setdefault("SLMLAB_STATIC_WIDGETS", "1")
    if job == "book":
        book()
    elif job == "test":
        test(extra)
    elif job == "lab":
        sh(BIN / "jupyter", "lab", "notebooks")
    elif job == "sync":
        sh(PY, "tools/notebooks.py", "sync", *extra)
    elif job == "freeze":
        freeze()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
    except KeyboardInterrupt:
        sys.exit(130)
