"""The book's site as a reader gets it (a Sphinx extension, loaded by _config.yml).

- Nothing is fetched from outside the site: MathJax is served from ``_static/mathjax`` (the npm
  package of web/package.json), and ipywidgets' loader (require.js and the widget manager,
  from two CDNs) is not added at all; knobs are static copies instead (`slmlab.widgets`).
- ``{slmlab-story}`` puts the book's model in the page: a box where the reader types the start
  of a story and llama.cpp, compiled to WebAssembly (wllama), continues it in the tab from a GGUF
  file that this extension exports from the zoo into ``_static/models`` when the site is built.
- Launch buttons open the paired notebooks (``notebooks/NN.ipynb``) rather than the Markdown
  source, and one more opens them in the reader's own JupyterLab (``python3 run.py lab``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
MODULES = WEB / "node_modules"
MATHJAX = MODULES / "mathjax" / "es5"
# MathJax's startup file and the parts it loads on demand (TeX extensions, fonts, the menu's
# accessibility tools); the other builds in es5/ are alternatives to it.
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output", "a11y", "ui", "sre")
WLLAMA = MODULES / "@wllama" / "wllama" / "esm"
LOCAL_LAB = "http://localhost:8888/lab/tree"  # where `python3 run.py lab` serves notebooks/

logger = logging.getLogger(__name__)


def _offline(app: Sphinx, config: Any) -> None:
    config.html_static_path.append(str(WEB / "site" / "static"))
    # The theme reads the light/dark mode from this, and logs a console error when it is empty.
    config.html_context.setdefault("default_mode", "auto")
    config.nb_ipywidgets_js = {}
    overrides = list(config.nb_mime_priority_overrides or [])
    # The live widget needs a kernel; its static copy is the output's text/html.
    overrides.append(("html", "application/vnd.jupyter.widget-view+json", None))
    config.nb_mime_priority_overrides = overrides
    if (MATHJAX / MATHJAX_PARTS[0]).is_file():
        config.mathjax_path = f"mathjax/{MATHJAX_PARTS[0]}"
    else:  # run.py has said what is missing (npm); the book still builds, online only
        logger.info("%s not found: pages will load MathJax from its CDN", MATHJAX)


class StoryBox(SphinxDirective):
    """``{slmlab-story}`` with ``:model:`` (a zoo name) and ``:quant:`` (a GGUF type)."""

    option_spec: ClassVar = {"model": directives.unchanged_required, "quant": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        model = self.options.get("model", "stories-8m")
        quant = self.options.get("quant", "q8_0")
        file = f"{model}-{quant}.gguf"
        if not hasattr(self.env, "slmlab_story_models"):
            self.env.slmlab_story_models = {}
        self.env.slmlab_story_models[(model, quant)] = self.env.docname
        static = "../" * self.env.docname.count("/") + "_static"
        box = f"""<div class="slmlab-story" data-model="{static}/models/{file}">
<textarea aria-label="the start of a story" rows="2">Once upon a time, there was a little</textarea>
<div class="slmlab-story-controls"><button type="button" disabled>loading {model}…</button>
<label>tokens <input type="number" min="1" max="200" value="40"></label></div>
<p class="slmlab-story-out"></p><p class="slmlab-story-speed"></p></div>
<script type="module" src="{static}/slmlab/story.js"></script>"""
        return [nodes.raw("", box, format="html")]


def _purge(app: Sphinx, env: Any, docname: str) -> None:
    models = getattr(env, "slmlab_story_models", {})
    for key in [k for k, doc in models.items() if doc == docname]:
        del models[key]


def _merge(app: Sphinx, env: Any, docnames: set[str], other: Any) -> None:
    if not hasattr(env, "slmlab_story_models"):
        env.slmlab_story_models = {}
    env.slmlab_story_models.update(getattr(other, "slmlab_story_models", {}))


def _launch_buttons(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any
) -> None:
    """Binder opens notebooks/NN.ipynb; a local JupyterLab too."""
    source = f"{pagename}.md"
    if not pagename.startswith("book/") or not (app.srcdir / source).is_file():
        return
    notebook = f"notebooks/{Path(pagename).name}.ipynb"
    if not (ROOT / notebook).is_file():
        return
    for group in context.get("header_buttons", []):
        if group.get("label") != "launch-buttons":
            continue
        for button in group["buttons"]:
            button["url"] = button["url"].replace(source, notebook)
        group["buttons"].append(
            {
                "type": "link",
                "text": "JupyterLab",
                "tooltip": "Open in your JupyterLab (start it with: python3 run.py lab)",
                "icon": "fas fa-laptop-code",
                "url": f"{LOCAL_LAB}/{Path(notebook).name}",
                "label": "local-jupyterlab-button",
            }
        )


def _unique_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any
) -> None:
    """Each script once: sphinx-thebe adds its inline settings twice under this Sphinx, and the
    second `const` is a console error on every page."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # an inline script's file name is None or "", depending on who added it
        name = getattr(script, "filename", script) or ""
        key = (str(name), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _vendor(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    if (MATHJAX / MATHJAX_PARTS[0]).is_file():
        for part in MATHJAX_PARTS:
            _copy(MATHJAX / part, static / "mathjax" / part)
    models = getattr(app.env, "slmlab_story_models", {})
    if not models:
        return
    if not (WLLAMA / "index.js").is_file():
        logger.info("%s not found: the story box will have no model", WLLAMA)
        return
    _copy(WLLAMA / "index.js", static / "wllama" / "index.js")
    _copy(WLLAMA / "wasm" / "wllama.wasm", static / "wllama" / "wllama.wasm")
    _copy(WEB / "site" / "story.js", static / "slmlab" / "story.js")
    from slmlab import zoo
    from slmlab.export import to_gguf

    for model, quant in sorted(models):
        out = static / "models" / f"{model}-{quant}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        to_gguf(zoo.ensure(model, progress=False), out, quant=quant)
        logger.info("exported %s (%s) for the story box: %s", model, quant, out)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", _offline)
    app.add_directive("slmlab-story", StoryBox)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("html-page-context", _launch_buttons, priority=600)  # after the theme's (501)
    app.connect("html-page-context", _unique_scripts, priority=600)
    app.connect("build-finished", _vendor)
    app.add_css_file("slmlab.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
