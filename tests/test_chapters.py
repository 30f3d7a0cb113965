"""Every chapter runs top to bottom, and its checked cells print what the notebook says.

A cell tagged ``nbval-check-output`` keeps its output in ``notebooks/NAME.ipynb``; the
executed chapter must print the same, after the substitutions of ``tests/nbval_sanitize.cfg``
(addresses, progress bars, timings), compared as nbval compares them in its ``--nbval-lax``
mode (stream text by stream, every other output by MIME type, images left out), except that
standard error is left out too: a first run's kernel build and warnings print there.

The executed chapters come from the book build when ``SLMLAB_EXECUTED_BOOK`` names its
jupyter-cache folder (``python3 run.py test`` builds the book first and sets it, so each chapter
runs once); otherwise each test executes its chapter itself, as nbval would.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import coalesce_streams, get_sanitize_patterns

ROOT = Path(__file__).resolve().parents[1]
CHECK = "nbval-check-output"
SANITIZE = get_sanitize_patterns((ROOT / "tests" / "nbval_sanitize.cfg").read_text())
SKIP = {
    "metadata",
    "traceback",
    "prompt_number",
    "output_type",
    "name",
    "execution_count",
    "image/png",
    "image/jpeg",
    "application/vnd.jupyter.widget-view+json",
}  # nbval's, and one more: standard error carries what depends on the machine's state rather
# than the chapter (a first run's "compiling CPU kernels" notice, warnings, progress bars).
SKIP.add("stderr")
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def comparable(outputs: list) -> dict[str, list]:
    """A cell's outputs as nbval compares them: key (stream name or MIME type) -> values."""
    table: dict[str, list] = defaultdict(list)
    for output in coalesce_streams([nbformat.from_dict(o) for o in outputs]):
        if output.output_type == "stream":
            fields = {output.name: output.text}
        else:
            fields = {k: v for k, v in output.items() if k != "data"} | dict(output.get("data", {}))
        for key, value in fields.items():
            if key in SKIP:
                continue
            if isinstance(value, str):
                for pattern, replacement in SANITIZE:
                    value = re.sub(pattern, replacement, value)
            table[key].append(value)
    return dict(table)


def differences(expected: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> list[str]:
    """Where the executed chapter's checked cells disagree with the stored outputs."""
    want = [c for c in expected.cells if c.cell_type == "code"]
    have = [c for c in executed.cells if c.cell_type == "code"]
    if [c.source for c in want] != [c.source for c in have]:
        return ["the executed chapter's code is not the notebook's (a stale build?)"]
    found = []
    for number, (stored, ran) in enumerate(zip(want, have, strict=True)):
        if CHECK not in stored.metadata.get("tags", []):
            continue
        a, b = comparable(stored.outputs), comparable(ran.outputs)
        if a != b:
            first = stored.source.splitlines()[0] if stored.source else ""
            found.append(f"code cell {number} ({first[:60]!r}):\n  stored:   {a}\n  executed: {b}")
    return found


def executed_chapter(name: str) -> nbformat.NotebookNode:
    built = os.environ.get("SLMLAB_EXECUTED_BOOK")
    if built:
        from jupyter_cache import get_cache

        cache = get_cache(built)
        records = [r for r in cache.list_cache_records() if Path(r.uri).stem == name]
        if not records:
            pytest.fail(f"the book build in {built} did not execute book/{name}.md")
        newest = max(records, key=lambda r: r.created)
        return cache.get_cache_bundle(newest.pk).nb
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=1200,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_prints_its_checked_outputs(name: str) -> None:
    expected = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    problems = differences(expected, executed_chapter(name))
    assert not problems, f"notebooks/{name}.ipynb:\n" + "\n".join(problems)


def test_a_changed_checked_output_is_reported() -> None:
    """The comparison itself: a changed number fails, sanitized noise and images do not."""

    def notebook(text: str, image: str) -> nbformat.NotebookNode:
        cell = nbformat.v4.new_code_cell("print(x)", metadata={"tags": [CHECK]})
        cell.outputs = [
            nbformat.v4.new_output("stream", name="stdout", text=text),
            nbformat.v4.new_output(
                "display_data", data={"image/png": image, "text/plain": "<Figure>"}
            ),
        ]
        return nbformat.v4.new_notebook(cells=[cell])

    stored = notebook("loss 0.2011 at 0x7f00aa\n", "AAAA")
    assert differences(stored, notebook("loss 0.2011 at 0x7fffbb\n", "BBBB")) == []
    noisy = notebook("loss 0.2011 at 0x7f00aa\n", "AAAA")
    noisy.cells[0].outputs.insert(
        0, nbformat.v4.new_output("stream", name="stderr", text="compiling\n")
    )
    assert differences(stored, noisy) == []
    assert differences(stored, notebook("loss 0.2012 at 0x7f00aa\n", "AAAA"))
    stale = notebook("loss 0.2011 at 0x7f00aa\n", "AAAA")
    stale.cells[0].source = "print(y)"
    assert "stale" in differences(stored, stale)[0]
    untagged = notebook("loss 0.2011 at 0x7f00aa\n", "AAAA")
    untagged.cells[0].metadata = {}
    assert differences(untagged, notebook("loss 0.9 at 0x7f00aa\n", "AAAA")) == []
