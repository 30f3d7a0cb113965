"""The book as a course: each chapter's notebook turned into an nbgrader assignment.

    slmlab course release --out course/   # source/ for the teacher, release/ for the students
    slmlab course plan                    # what each lab needs: time, chapters before, zoo models

A chapter ends with **Exercises**: a numbered list, and one folded cell of solutions that calls
``check("NN.name", fn)`` for each exercise the checker grades. `release` rewrites that ending in
nbgrader's format (https://nbgrader.readthedocs.io): after each exercise that names a
``check(...)``, a solution cell holding that function with its body between ``### BEGIN
SOLUTION`` and ``### END SOLUTION``, then a locked autograder cell that runs the check and
asserts it passed (the checker's paragraph is the feedback); after each exercise that asks for a
measurement or a reason, a Markdown answer cell graded by hand. The rest of the chapter is left
as it is, its outputs cleared, so that a lab is the chapter itself.

``source/NN_name/NN_name.ipynb`` is what ``nbgrader generate_assignment`` reads (in a course
directory it adds the checksums that catch an edited test); ``release/NN_name/NN_name.ipynb`` is
the same notebook with every solution region replaced as nbgrader's ``ClearSolutions`` replaces
it, ready to hand out.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Lab",
    "assignment",
    "clear_solutions",
    "labs",
    "measured_on",
    "plan",
    "release",
    "zoo_minutes",
]

REPOSITORY = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader's, for Python
TEXT_STUB = "YOUR ANSWER HERE"
WRITTEN = "*Your answer (for a measurement, its code in cells above this one).*"
_CHECK = re.compile(r"""check\(\s*["']([\w.]+)["']\s*,\s*(\w+)\s*\)""")
_ITEM = re.compile(r"^(\d+)\. ", re.MULTILINE)


@dataclass(frozen=True)
class Lab:
    """One chapter as a lab: what a teacher needs to know before handing it out."""

    name: str  # the notebook's stem, e.g. "08_quantization"
    title: str
    zoo: tuple[str, ...]  # the zoo models its cells load (trained before class)
    after: tuple[str, ...]  # the chapters a student should have done first
    checked: tuple[str, ...]  # the exercises the checker grades
    written: int  # the exercises graded by hand
    minutes: float | None  # measured: the chapter's cells, its zoo models already trained


def _read(path: Path) -> Any:
    import nbformat

    return nbformat.read(path, as_version=4)


def _notebooks(notebooks: Path | None) -> Path:
    folder = Path(notebooks) if notebooks is not None else REPOSITORY / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no chapter notebooks here; pass --notebooks DIR, the notebooks/ folder of "
            "a clone of the book's repository"
        )
    return folder


def _exercises(path: Path, notebook: Any) -> tuple[int, int, list[str], str]:
    """Where a chapter's exercises are: the index of the Markdown cell holding the list, of the
    solutions' cell, the list's items, and the text before ``## Exercises`` in its cell. Bad
    layout is an error naming the notebook, never a lab quietly left out."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown" and "## Exercises" in cell.source:
            before, _, rest = cell.source.partition("## Exercises")
            starts = [m.start() for m in _ITEM.finditer(rest)]
            items = [
                rest[a:b].strip() for a, b in zip(starts, [*starts[1:], len(rest)], strict=True)
            ]
            solutions = index + 1
            cells = notebook.cells
            if solutions >= len(cells) or not cells[solutions].source.startswith("# Solution"):
                raise ValueError(
                    f"{path}: the cell after '## Exercises' must be the solutions' cell, starting "
                    "'# Solution'"
                )
            if not items:
                raise ValueError(f"{path}: '## Exercises' has no numbered list")
            return index, solutions, items, before
    raise ValueError(f"{path}: no '## Exercises' section")


def labs(notebooks: Path | None = None, times: Path | None = None) -> list[Lab]:
    """Every chapter notebook with exercises, in book order (03, 03b, 04, ...)."""
    folder = _notebooks(notebooks)
    minutes = _measured_minutes(times)
    found = []
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        notebook = _read(path)
        if not any(
            c.cell_type == "markdown" and "## Exercises" in c.source for c in notebook.cells
        ):
            continue  # a page without exercises
        _, _, items, _ = _exercises(path, notebook)
        meta = notebook.metadata.get("slmlab", {})
        title = next(
            (c.source.splitlines()[0].lstrip("# ").strip() for c in notebook.cells
             if c.cell_type == "markdown" and c.source.startswith("# ")),
            path.stem,
        )  # fmt: skip
        checked = [m.group(1) for item in items for m in _CHECK.finditer(item)]
        written = sum(1 for item in items if not _CHECK.search(item))
        found.append(
            Lab(
                path.stem, title, tuple(meta.get("zoo", [])), tuple(meta.get("after", [])),
                tuple(checked), written, minutes.get(path.stem),
            )
        )  # fmt: skip
    return sorted(found, key=lambda lab: lab.title.split(" ")[0])  # 10 before 10b


TIMES = REPOSITORY / "benchmarks" / "results" / "chapters.json"


def _measured(times: Path | None) -> dict:
    path = Path(times) if times is not None else TIMES
    return json.loads(path.read_text()) if path.exists() else {}


def _measured_minutes(times: Path | None) -> dict[str, float]:
    chapters = _measured(times).get("chapters", {})
    return {name: row["seconds"] / 60 for name, row in chapters.items()}


def measured_on(times: Path | None = None) -> str:
    """Where the plan's minutes come from: the machine and the build that measured them."""
    measured = _measured(times)
    if not measured:
        return "no measurements yet: python tools/notebooks.py times CACHE --json writes them"
    machine = measured["machine"]
    return (
        f"measured {measured['date']} in a full book build from an empty zoo cache, on "
        f"{machine['cpu_count']} cores ({machine['cpu']}) with "
        f"{', '.join(machine['cpu_simd'])}; GPU: {machine['cuda'] or 'none'}"
        + (f"; {measured['note']}" if measured.get("note") else "")
    )


def zoo_minutes(times: Path | None = None) -> dict[str, float]:
    """Minutes each zoo model took to train in that build (fetched ones: to fetch and convert)."""
    return {name: s / 60 for name, s in _measured(times).get("zoo", {}).items()}


def plan(notebooks: Path | None = None, times: Path | None = None) -> str:
    """A teacher's table in Markdown: each lab's measured minutes, the chapters to do first,
    its exercises, and the zoo models to train before class (``slmlab zoo train NAME...``)."""
    rows = [
        "| lab | minutes | after | graded by the checker | by hand | zoo models to train first |",
        "|---|---|---|---|---|---|",
    ]
    for lab in labs(notebooks, times):
        minutes = f"{lab.minutes:.1f}" if lab.minutes is not None else "—"
        rows.append(
            f"| {lab.title} | {minutes} | {', '.join(lab.after) or '—'} | "
            f"{', '.join(lab.checked)} | {lab.written} | {', '.join(lab.zoo) or '—'} |"
        )
    trained = zoo_minutes(times)
    if trained:
        rows += ["", "| zoo model | minutes to train, once |", "|---|---|"]
        rows += [f"| {name} | {m:.1f} |" for name, m in trained.items()]
    return "\n".join(rows)


def _solution_cell(source: str, function: ast.FunctionDef) -> str:
    """The function's text with its body (after any docstring) between the markers."""
    lines = source.splitlines()
    body = function.body
    docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    start = (body[1] if docstring and len(body) > 1 else body[0]).lineno - 1
    head = lines[function.lineno - 1 - len(function.decorator_list) : start]
    inner = lines[start : function.end_lineno]
    indent = re.match(r"\s*", inner[0]).group(0)
    return "\n".join([*head, indent + BEGIN, *inner, indent + END])


def _split_solutions(path: Path, source: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """The solutions' cell as a set-up cell (imports and helpers) and, per checked exercise,
    (the function's name, its solution cell)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    checked: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check":
            name, fn = node.args[0], node.args[1]
            if not (isinstance(name, ast.Constant) and isinstance(fn, ast.Name)):
                raise ValueError(
                    f'{path}: the solutions\' cell must call check("NN.name", function) with the '
                    f"name written out, one call a line; line {node.lineno} does not"
                )
            checked[name.value] = fn.id
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = [name for name, fn in checked.items() if fn not in functions]
    if missing:
        raise ValueError(
            f"{path}: the solutions' cell checks {missing} with no function it defines"
        )
    solution_of = {fn: name for name, fn in checked.items()}
    setup, cells = [], {}
    for node in tree.body:
        text = "\n".join(
            lines[node.lineno - 1 - len(getattr(node, "decorator_list", [])) : node.end_lineno]
        )
        if isinstance(node, ast.FunctionDef) and node.name in solution_of:
            cells[solution_of[node.name]] = (node.name, _solution_cell(source, node))
        elif isinstance(node, ast.Expr) and _CHECK.search(text):
            continue  # the checks become autograder cells
        else:
            setup.append(text)
    return "\n".join(setup).strip(), cells


def _nbgrader(grade_id: str, *, solution: bool, grade: bool, locked: bool) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}  # fmt: skip
    if grade:
        meta["points"] = 1
    return {"nbgrader": meta}


def assignment(path: Path) -> Any:
    """Chapter notebook `path` as nbgrader's source notebook (solutions between the markers)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell

    notebook = _read(path)
    index, solutions, items, before = _exercises(path, notebook)
    setup, functions = _split_solutions(path, notebook.cells[solutions].source)
    stem = path.stem[:3].rstrip("_")
    cells = []
    if before.strip():
        cells.append(new_markdown_cell(before.rstrip()))
    cells.append(new_markdown_cell("## Exercises"))
    if setup:
        cells.append(new_code_cell(setup))
    for number, item in enumerate(items, start=1):
        prompt = new_markdown_cell(item)
        prompt.metadata.update(
            _nbgrader(f"{stem}-{number}-task", solution=False, grade=False, locked=True)
        )
        cells.append(prompt)
        names = [m.group(1) for m in _CHECK.finditer(item)]
        for name in names:
            if name not in functions:
                raise ValueError(
                    f"{path}: exercise {number} names check({name!r}, ...) but the solutions' cell does not"
                )
            function, solution = functions[name]
            answer = new_code_cell(solution)
            answer.metadata.update(
                _nbgrader(
                    f"{name.replace('.', '-')}-answer", solution=True, grade=False, locked=False
                )
            )
            test = new_code_cell(
                f'result = check("{name}", {function})\nprint(result)\n'
                "assert result.passed, result.message"
            )
            test.metadata.update(
                _nbgrader(
                    f"{name.replace('.', '-')}-check", solution=False, grade=True, locked=True
                )
            )
            cells += [answer, test]
        if not names:
            answer = new_markdown_cell(WRITTEN)
            answer.metadata.update(
                _nbgrader(f"{stem}-{number}-answer", solution=True, grade=True, locked=False)
            )
            cells.append(answer)
    notebook.cells = [*notebook.cells[:index], *cells, *notebook.cells[solutions + 1 :]]
    for i, cell in enumerate(notebook.cells):
        cell.id = f"{stem}-{i:03d}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(notebook)
    return notebook


def clear_solutions(notebook: Any) -> Any:
    """What students get: each solution region, or a whole solution cell, replaced by nbgrader's
    stub (``ClearSolutions``: the region's indentation kept)."""
    import copy

    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        is_solution = cell.metadata.get("nbgrader", {}).get("solution", False)
        if BEGIN in cell.source:
            lines, kept, inside = cell.source.split("\n"), [], False
            for line in lines:
                if BEGIN in line:
                    inside = True
                    indent = re.match(r"\s*", line).group(0)
                    stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
                    kept += [indent + s for s in stub.split("\n")]
                elif END in line:
                    inside = False
                elif not inside:
                    kept.append(line)
            cell.source = "\n".join(kept)
        elif is_solution:
            cell.source = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
    return notebook


def release(
    out: Path, chapters: list[str] | None = None, notebooks: Path | None = None
) -> list[Path]:
    """Write ``out/source/NAME/NAME.ipynb`` and ``out/release/NAME/NAME.ipynb`` for each chapter
    with exercises (or the `chapters` named by number or name), and ``out/README.md`` with the
    teacher's table. Returns the released notebooks' paths."""
    import nbformat

    folder = _notebooks(notebooks)
    chosen = [lab.name for lab in labs(folder)]
    if chapters:
        wanted = {c.split("_")[0] if c[:2].isdigit() else c for c in chapters}
        unknown = wanted - {n.split("_")[0] for n in chosen} - set(chosen)
        if unknown:
            raise ValueError(f"no lab {sorted(unknown)}; there are {chosen}")
        chosen = [n for n in chosen if n in wanted or n.split("_")[0] in wanted]
    out = Path(out)
    written = []
    for name in chosen:
        source = assignment(folder / f"{name}.ipynb")
        for kind, notebook in (("source", source), ("release", clear_solutions(source))):
            path = out / kind / name / f"{name}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".ipynb.tmp")
            nbformat.write(notebook, tmp)
            tmp.replace(path)
        written.append(out / "release" / name / f"{name}.ipynb")
    readme = out / "README.md"
    readme.write_text(
        "# slmlab labs\n\nHand out `release/`; keep `source/` (the solutions). `nbgrader "
        "generate_assignment NAME` run here reads `source/NAME/` and writes the same release "
        "with checksums; `nbgrader autograde` grades the submissions.\n\n" + plan(folder) + "\n"
    )
    return written
