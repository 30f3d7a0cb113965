"""The chapters as labs: every chapter opens with goals and ends with exercises whose solutions
the checker grades; `slmlab course release` writes what nbgrader reads, its student notebooks
are what nbgrader's own `generate_assignment` makes of the source, and nbgrader's validator
passes the source (solutions in place) and fails the release (solutions stripped)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from slmlab import course
from slmlab.cli import main
from slmlab.exercises import EXERCISES

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.md"))


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_opens_with_goals_and_ends_with_graded_exercises(md: Path) -> None:
    text = md.read_text()
    goals = text.split("**After this chapter you can**", 1)
    assert len(goals) == 2, f"{md.name}: no '**After this chapter you can**'"
    bullets = re.match(r"\s*((?:[-*] .*(?:\n  .*)*\n)+)", goals[1])
    count = len(re.findall(r"^[-*] ", bullets.group(1), re.MULTILINE)) if bullets else 0
    assert 3 <= count <= 5, f"{md.name}: {count} goals, not 3 to 5"
    exercises = text.split("## Exercises", 1)
    assert len(exercises) == 2, f"{md.name}: no '## Exercises'"
    items = re.findall(r"^\d+\. \*\*", exercises[1], re.MULTILINE)
    named = re.findall(r'check\("([\w.]+)"', exercises[1].split("```{code-cell}")[0])
    assert len(items) >= 3 and named, f"{md.name}: a few exercises, at least one checked"
    cell = exercises[1].split("```{code-cell} ipython3\n", 1)[1]
    assert cell.startswith(":tags: [hide-input, nbval-check-output]"), "solutions folded, checked"
    assert all(f'print(check("{name}", ' in cell for name in named), "each one solved"


def test_every_exercise_of_the_checker_is_in_a_chapter() -> None:
    solved = set(re.findall(r'print\(check\("([\w.]+)"', "".join(p.read_text() for p in CHAPTERS)))
    assert solved == set(EXERCISES)


def test_release_writes_nbgraders_source_and_student_notebooks(tmp_path) -> None:
    released = course.release(tmp_path, ["08"])
    assert released == [tmp_path / "release" / "08_quantization" / "08_quantization.ipynb"]
    source = nbformat.read(tmp_path / "source" / "08_quantization" / "08_quantization.ipynb", 4)
    student = nbformat.read(released[0], 4)
    nbformat.validate(student)
    graded = {
        c.metadata["nbgrader"]["grade_id"]: c for c in source.cells if "nbgrader" in c.metadata
    }
    for name in ("08.rtn", "08.nf4", "08.gptq"):
        answer, test = (
            graded[f"{name.replace('.', '-')}-answer"],
            graded[f"{name.replace('.', '-')}-check"],
        )
        assert course.BEGIN in answer.source and answer.metadata["nbgrader"]["solution"]
        assert (
            test.metadata["nbgrader"] | {"points": 1, "locked": True, "grade": True}
            == test.metadata["nbgrader"]
        )
        assert f'check("{name}", ' in test.source
    written = [
        c
        for c in source.cells
        if c.cell_type == "markdown" and c.metadata.get("nbgrader", {}).get("grade")
    ]
    assert len(written) == 2  # the measurement and the reason, graded by hand
    # the student sees the signature, the stub and the test, never the solution
    sources = "\n".join(c.source for c in student.cells)
    assert (
        "def gptq(weight, hessian):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
        in sources
    )
    assert "torch.linalg.cholesky(torch.linalg.inv(hessian)" not in sources
    assert course.BEGIN not in sources and sources.count("YOUR ANSWER HERE") == 2
    assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
    assert "| 08 · Quantization |" in (tmp_path / "README.md").read_text()


def test_a_solutions_cell_the_release_cannot_read_is_named(tmp_path) -> None:
    chapter = nbformat.read(ROOT / "notebooks" / "04_data.ipynb", 4)
    chapter.cells[-1].source = chapter.cells[-1].source.replace(
        'print(check("04.pack", pack))', 'for n, f in [("04.pack", pack)]:\n    print(check(n, f))'
    )
    nbformat.write(chapter, tmp_path / "04_data.ipynb")
    with pytest.raises(ValueError, match=r"04_data\.ipynb: the solutions' cell must call check"):
        course.release(tmp_path / "out", notebooks=tmp_path)
    with pytest.raises(ValueError, match=r"no lab \['99'\]; there are \['04_data'\]"):
        course.release(tmp_path / "out", ["99"], notebooks=tmp_path)


def test_course_on_the_command_line(tmp_path, capsys) -> None:
    assert main(["course", "release", "--out", str(tmp_path), "--chapters", "04"]) == 0
    assert capsys.readouterr().out.strip() == str(
        tmp_path / "release" / "04_data" / "04_data.ipynb"
    )
    assert main(["course", "plan"]) == 0
    table = capsys.readouterr().out
    assert "| 04 · Data | " in table and "| stories-1m |" in table


def _nbgrader() -> None:
    pytest.importorskip("nbgrader", reason="nbgrader is in the dev extra")


def test_every_release_is_what_nbgraders_clear_solutions_makes(tmp_path) -> None:
    _nbgrader()
    from nbgrader.preprocessors import ClearSolutions

    for lab in course.labs():
        source = course.assignment(ROOT / "notebooks" / f"{lab.name}.ipynb")
        theirs, _ = ClearSolutions().preprocess(copy.deepcopy(source), {})
        ours = course.clear_solutions(source)
        assert [c.source for c in theirs.cells] == [c.source for c in ours.cells], lab.name


def test_a_teacher_generates_the_assignment_with_nbgrader(tmp_path) -> None:
    """`nbgrader generate_assignment` in the course folder (its gradebook, checksums and all)
    reads the source and writes what `release` wrote."""
    _nbgrader()
    course.release(tmp_path, ["08"])
    shutil.move(tmp_path / "release", tmp_path / "ours")
    bin_dir = Path(sys.executable).parent  # nbgrader runs alembic from the same environment
    done = subprocess.run(
        [bin_dir / "nbgrader", "generate_assignment", "08_quantization"],
        cwd=tmp_path, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path("08_quantization") / "08_quantization.ipynb"
    theirs = nbformat.read(tmp_path / "release" / path, 4)
    ours = nbformat.read(tmp_path / "ours" / path, 4)
    assert [(c.cell_type, c.source) for c in theirs.cells] == [
        (c.cell_type, c.source) for c in ours.cells
    ]
    checksummed = [c for c in theirs.cells if "checksum" in c.metadata.get("nbgrader", {})]
    assert len(checksummed) == 3 + 3 + 2 + 5  # answers, tests, written answers, the prompts


def test_nbgraders_validator_passes_the_solutions_and_fails_the_stubs(tmp_path) -> None:
    """Chapter 04 (no zoo model, half a minute) as a student would hand it in twice: with the
    solutions put back, every test passes; as released, the checker's test fails with its
    paragraph."""
    _nbgrader()
    from nbgrader.validator import Validator

    course.release(tmp_path, ["04"])
    source = Validator().validate(str(tmp_path / "source" / "04_data" / "04_data.ipynb"))
    assert source == {}, source
    release = Validator().validate(str(tmp_path / "release" / "04_data" / "04_data.ipynb"))
    (failed,) = release["failed"]
    assert failed["source"].startswith('result = check("04.pack", pack)')
    assert "raised NotImplementedError" in failed["raw_error"]
