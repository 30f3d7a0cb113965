"""The built site, as a reader's browser shows it: every page of the table of contents loads from
localhost with no request leaving it and no console error, its figures decode, its math is
typeset, its results fit the column, search finds the chapters, the knobs turn without a kernel,
and the book's model continues a story in the page with the tokens `slmlab` chooses.

The site is the one `python3 run.py test` builds (it sets ``SLMLAB_BUILT_SITE``), or the
reader's `_build/html`. A screenshot of each page is kept beside the site, under
``_build/screenshots``, with ``story.json`` (the in-page model's speed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.browser import chromium, keep_local, served, skip_reason

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little girl named"
STORY_TOKENS = 30


def built_site() -> Path | None:
    named = os.environ.get("SLMLAB_BUILT_SITE")
    site = Path(named) if named else ROOT / "_build" / "html"
    return site if (site / "index.html").is_file() else None


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return [f"{file}.html" for file in files]


@pytest.fixture(scope="module")
def browser():
    if (reason := skip_reason(wllama=False)) is not None:
        pytest.skip(reason)
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def site() -> Path:
    found = built_site()
    if found is None:
        pytest.skip("no built site: python3 run.py book (or run.py test) builds it")
    return found


@pytest.fixture(scope="module")
def origin(site: Path):
    with served(site) as origin:
        yield origin


# What a page must show once loaded, as a list of problems (empty when the page is right).
PAGE_PROBLEMS = """async () => {
  const problems = [];
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  for (const img of document.images) {
    try { await img.decode(); } catch (e) { /* reported below */ }
    if (!(img.complete && img.naturalWidth > 0)) problems.push(`image not decoded: ${img.src.slice(0, 80)}`);
  }
  for (const math of document.querySelectorAll('.math')) {
    if (!math.querySelector('mjx-container')) problems.push(`math not typeset: ${math.textContent.slice(0, 60)}`);
  }
  for (const out of document.querySelectorAll('div.cell_output, div.cell_input')) {
    for (const el of [out, ...out.querySelectorAll('pre, table')]) {
      if (el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0)
        problems.push(`wider than the column (${el.scrollWidth} > ${el.clientWidth} px): ${el.textContent.trim().slice(0, 60)}`);
    }
  }
  if (document.body.innerText.includes('NBVAL_')) problems.push('a testing marker shows on the page');
  return problems;
}"""


def page_problems(
    browser, origin: str, page_path: str, screenshot: Path | None = None
) -> list[str]:
    """Everything wrong with one page of the site served at `origin`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = keep_local(page, origin)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{origin}/{page_path}", wait_until="load")
    problems = page.evaluate(PAGE_PROBLEMS)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True, type="jpeg", quality=60)
    page.close()
    problems += [f"request left localhost: {url}" for url in outside]
    problems += [f"console error: {text[:200]}" for text in errors]
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("page_path", toc_pages())
def test_page_loads_offline_and_whole(site: Path, browser, origin: str, page_path: str) -> None:
    shot = site.parent / "screenshots" / f"{Path(page_path).stem}.jpg"
    problems = page_problems(browser, origin, page_path, shot)
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def test_a_cdn_script_is_caught(browser, tmp_path: Path) -> None:
    """The check itself: a page that loads a script from a CDN, or whose image is missing,
    fails it with the address named."""
    cdn = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"
    (tmp_path / "page.html").write_text(
        f'<!doctype html><html><head><script src="{cdn}"></script></head>'
        '<body><p>text</p><img src="missing.png"></body></html>'
    )
    with served(tmp_path) as origin:
        problems = page_problems(browser, origin, "page.html")
    assert f"request left localhost: {cdn}" in problems
    assert any(p.startswith("image not decoded") and "missing.png" in p for p in problems)


def test_search_finds_a_chapter(site: Path, browser, origin: str) -> None:
    page = browser.new_page()
    outside = keep_local(page, origin)
    page.goto(f"{origin}/search.html?q=quantization")
    page.wait_for_selector("#search-results ul.search li", timeout=20_000)
    found = page.eval_on_selector_all("#search-results ul.search li a", "as => as.map(a => a.href)")
    page.close()
    assert any("08_quantization" in href for href in found), found
    assert not outside


@pytest.mark.parametrize(
    ("chapter", "control"),
    [("08_quantization", 'input[data-knob="bits"]'), ("09_pruning", 'select[data-knob="method"]')],
)
def test_a_knob_turns_on_the_static_page(
    site: Path, browser, origin: str, chapter, control
) -> None:
    """Chapter 08's quantization knob and chapter 09's pruning knob, with no kernel: one view
    shows at a time, and moving a slider or choosing another method shows another, with its
    figure decoded."""
    page = browser.new_page()
    keep_local(page, origin)
    page.goto(f"{origin}/book/{chapter}.html")
    knobs = page.locator(".slmlab-knobs").first
    visible = "k => Array.from(k.querySelectorAll('[data-view]')).filter(v => !v.hidden)"
    shown = knobs.evaluate(f"k => ({visible})(k).map(v => v.dataset.view)")
    assert len(shown) == 1
    if control.startswith("select"):
        knobs.locator(control).select_option("0")
    else:
        knobs.locator(control).fill("0")
    after = knobs.evaluate(f"k => ({visible})(k).map(v => v.dataset.view)")
    assert len(after) == 1 and after != shown
    decoded = knobs.evaluate(f"k => ({visible})(k)[0].querySelector('img').naturalWidth")
    page.close()
    assert decoded > 0


def test_the_book_model_runs_in_the_page(site: Path, browser, origin: str) -> None:
    """Chapter 10b's story box: the reader's prompt continued by llama.cpp in WebAssembly, from
    the GGUF file the site carries, greedily: the same tokens as `slmlab.generate` over the
    same file."""
    import torch

    import slmlab
    from slmlab.infer import generate
    from slmlab.tokenizers import END_OF_TEXT

    gguf = site / "_static" / "models" / "stories-8m-q8_0.gguf"
    assert gguf.is_file(), f"the site lacks {gguf.name}: the story box has no model"
    page = browser.new_page()
    outside = keep_local(page, origin)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{origin}/book/10_device_targets.html")
    box = page.locator(".slmlab-story")
    page.wait_for_selector(".slmlab-story[data-ready=true]", timeout=60_000)
    box.locator("textarea").fill(PROMPT)
    box.locator("input").fill(str(STORY_TOKENS))
    box.locator("button").click()
    page.wait_for_selector(".slmlab-story-out[data-ids]", timeout=60_000)
    ids = json.loads(box.locator(".slmlab-story-out").get_attribute("data-ids"))
    speed = box.locator(".slmlab-story-speed").inner_text()
    page.close()
    assert not outside and not errors, (outside, errors)

    tokenizer = slmlab.load_tokenizer(gguf)
    prompt = tokenizer.encode(PROMPT).ids
    out = generate(slmlab.load(gguf), torch.tensor([prompt]), STORY_TOKENS)[0, len(prompt) :]
    end = tokenizer.token_to_id(END_OF_TEXT)  # both stop there; llama.cpp does not return it
    assert ids == [t for t in out.tolist() if t != end]
    report = site.parent / "screenshots" / "story.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"prompt": PROMPT, "tokens": len(ids), "speed": speed}) + "\n")
    print(f"in-page stories-8m (q8_0): {speed}")


@pytest.mark.slow
def test_a_broken_page_fails_the_build(tmp_path: Path) -> None:
    """The book's build flags (run.py's STRICT): a reference to nothing and a missing image
    fail the build, each named with its page."""
    import shutil
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT))
    from run import STRICT

    (tmp_path / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: 'off'\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: broken\n")
    (tmp_path / "intro.md").write_text("# Intro\n\nFine.\n")
    (tmp_path / "broken.md").write_text(
        "# Broken\n\nSee {ref}`a-label-nobody-wrote`.\n\n![a figure](missing.png)\n"
    )
    book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    run = subprocess.run(
        [book, "build", str(tmp_path), "--builder", "html", *STRICT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert "broken.md" in log and "a-label-nobody-wrote" in log
    assert "missing.png" in log
