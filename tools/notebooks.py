"""Keep book/*.md (the source) and notebooks/*.ipynb (what readers and nbval run) in step.

    python tools/notebooks.py sync [NAME...]   # write notebooks/NAME.ipynb from book/NAME.md
    python tools/notebooks.py check            # fail if any pair has drifted apart
    python tools/notebooks.py zoo              # train the zoo models the chapters name
    python tools/notebooks.py times CACHE      # how long each chapter took in the book build
    python tools/notebooks.py times CACHE --json   # ... and the zoo's training: the teachers' page

The markdown is the source: it diffs well and is what the book builds from. `sync` converts it
with jupytext, executes it (unless only the prose changed), and keeps only the outputs of cells
tagged `nbval-check-output` (`:tags: [nbval-check-output]` under the cell's opening line), which
are the outputs nbval compares; every other output is dropped so the notebooks stay small. A tag
rather than nbval's comment marker, so that the reader's page and notebook show no testing line.
`check` compares cell by cell (type and source) and names the first difference.

A chapter names the zoo models it loads in its front matter, so that the book build trains them
before any chapter runs (no cell timeout can then catch a training run):

    slmlab:
      zoo: [stories-1m, stories-8m]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
BOOK, NOTEBOOKS = ROOT / "book", ROOT / "notebooks"
CHECK = "nbval-check-output"  # the cell tag nbval reads, like its comment marker


def chapters() -> list[Path]:
    return sorted(p for p in BOOK.glob("*.md") if p.read_text().startswith("---\njupytext:"))


def zoo_models(md: Path) -> list[str]:
    """The zoo recipes chapter `md` names under ``slmlab: zoo:`` in its front matter."""
    from slmlab.zoo import names as zoo_names

    where = md.relative_to(ROOT) if md.is_relative_to(ROOT) else md
    names = jupytext.read(md).metadata.get("slmlab", {}).get("zoo", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SystemExit(f"{where}: slmlab.zoo must be a list of recipe names")
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        raise SystemExit(
            f"{where}: slmlab.zoo names {unknown}, which the zoo does not have; "
            f"it has {sorted(zoo_names())}"
        )
    return names


def from_markdown(md: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(md)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{md.stem[:2]}-{i:03d}"  # stable ids: regenerating gives the same file
    return nb


def _code(cells: list) -> list[str]:
    return [cell.source for cell in cells if cell.cell_type == "code"]


def sync(md: Path) -> None:
    nb = from_markdown(md)
    out = NOTEBOOKS / f"{md.stem}.ipynb"
    old = nbformat.read(out, as_version=4) if out.exists() else None
    if old is not None and _code(old.cells) == _code(nb.cells):
        # Only the prose changed: keep the stored outputs instead of running the chapter again.
        print(f"prose only, not re-run: {md.relative_to(ROOT)}", flush=True)
        stored = iter(cell for cell in old.cells if cell.cell_type == "code")
        for cell in nb.cells:
            if cell.cell_type == "code":
                previous = next(stored)
                cell.outputs, cell.execution_count = previous.outputs, previous.execution_count
    else:
        print(f"executing {md.relative_to(ROOT)}", flush=True)
        NotebookClient(
            nb,
            timeout=1200,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if CHECK not in cell.metadata.get("tags", []):
            cell.outputs = []
            cell.execution_count = None  # nbval refuses stored outputs of a cell never run
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("language_info", None)  # the executing Python's version: noise in diffs
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")


def drift(md: Path) -> str | None:
    ipynb = NOTEBOOKS / f"{md.stem}.ipynb"
    if not ipynb.exists():
        return f"{md.relative_to(ROOT)} has no notebook {ipynb.relative_to(ROOT)}"
    want, have = from_markdown(md).cells, nbformat.read(ipynb, as_version=4).cells
    for i, (a, b) in enumerate(zip(want, have, strict=False)):
        tags_a, tags_b = a.metadata.get("tags", []), b.metadata.get("tags", [])
        if (a.cell_type, a.source, tags_a) != (b.cell_type, b.source, tags_b):
            first = (a.source.splitlines() or [""])[0][:70]
            return f"{ipynb.relative_to(ROOT)} cell {i} differs from {md.relative_to(ROOT)} ({first!r})"
        if a.cell_type == "code" and CHECK in a.metadata.get("tags", []) and not b.outputs:
            return (
                f"{ipynb.relative_to(ROOT)} cell {i} is checked by nbval but has no stored output"
            )
    if len(want) != len(have):
        return f"{ipynb.relative_to(ROOT)} has {len(have)} cells, {md.relative_to(ROOT)} has {len(want)}"
    return None


def write_times(runs: dict[str, float | None]) -> None:
    """benchmarks/results/chapters.json: each chapter's seconds in the build that filled the
    jupyter cache, and each zoo model's in $SLMLAB_HOME/zoo (from its lock file, taken when its
    training began, to its newest file): run it after a full build from an empty cache, which
    is what a teacher preparing a class does."""
    import datetime
    import json

    from slmlab.env import cache_dir, report

    zoo = {}
    for lock in sorted((cache_dir() / "zoo").glob("*.lock"), key=lambda p: p.stat().st_mtime):
        folder = lock.with_suffix("")
        files = [f.stat().st_mtime for f in folder.rglob("*") if f.is_file()]
        if files:
            zoo[folder.name.rsplit("-", 1)[0]] = round(max(files) - lock.stat().st_mtime)
    result = {
        "benchmark": "chapters",
        "date": datetime.date.today().isoformat(),
        "machine": report(),
        "chapters": {
            md.stem: {"seconds": round(runs[md.name])} for md in chapters() if runs.get(md.name)
        },
        "zoo": zoo,
    }
    out = ROOT / "benchmarks" / "results" / "chapters.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["sync"]:
        names = set(argv[1:])
        for md in chapters():
            if not names or md.stem in names or md.stem[:2] in names:
                sync(md)
        return 0
    if argv[:1] == ["zoo"]:
        from slmlab import zoo

        zoo.prepare(name for md in chapters() for name in zoo_models(md))
        return 0
    if argv[:1] == ["times"] and len(argv) in (2, 3) and argv[2:] in ([], ["--json"]):
        from jupyter_cache import get_cache

        runs = {
            Path(record.uri).name: record.data.get("execution_seconds")
            for record in get_cache(argv[1]).list_cache_records()
        }
        for md in chapters():
            seconds = runs.get(md.name)
            print(f"{md.stem:<20} " + (f"{seconds:6.0f} s" if seconds else "     —"))
        if argv[2:] == ["--json"]:
            write_times(runs)
        return 0
    if argv[:1] == ["check"]:
        for md in chapters():
            zoo_models(md)  # the names must be recipes the zoo has
        problems = [p for md in chapters() if (p := drift(md))]
        stray = {p.stem for p in NOTEBOOKS.glob("*.ipynb")} - {md.stem for md in chapters()}
        problems += [f"notebooks/{s}.ipynb has no book/{s}.md" for s in sorted(stray)]
        for p in problems:
            print(f"drift: {p}  (fix: edit book/*.md, then `python3 run.py sync`)", file=sys.stderr)
        if not problems:
            print(f"{len(chapters())} chapter pairs in step")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
