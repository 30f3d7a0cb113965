"""slmlab.widgets.interact: one output with the live widget and a static copy that turns in a
browser with no kernel, showing what the function printed for the chosen combination."""

from __future__ import annotations

import re

import pytest
from IPython.utils.capture import capture_output

from slmlab.widgets import MAX_COMBINATIONS, interact, static_html
from tests.browser import chromium, served, skip_reason


def report(bits: int = 4, group: int = 96, symmetric: bool = True) -> None:
    print(f"bits={bits} group={group} symmetric={symmetric}")


def test_static_copy_holds_every_combination_once() -> None:
    page = static_html(report, {"bits": [2, 4, 8], "group": [32, 96], "symmetric": [True]})
    views = re.findall(r'<div data-view="([^"]+)"( hidden)?><pre>([^<]*)</pre>', page)
    assert len(views) == 6
    texts = {key: text.strip() for key, _, text in views}
    assert texts["0|0|0"] == "bits=2 group=32 symmetric=True"
    assert texts["2|1|0"] == "bits=8 group=96 symmetric=True"
    # Without scripts the page shows the function's own defaults (bits=4, group=96), alone.
    assert [key for key, hidden, _ in views if not hidden] == ["1|1|0"]


@pytest.mark.parametrize("static_only", [False, True])
def test_interact_gives_the_widget_and_its_static_copy(monkeypatch, static_only: bool) -> None:
    """The live widget and the page's copy in one output; the copy alone where the chapters
    run headless (`SLMLAB_STATIC_WIDGETS=1`, set by the book's build and tests)."""
    pytest.importorskip("ipywidgets")
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("SLMLAB_STATIC_WIDGETS", "1" if static_only else "0")
    InteractiveShell.instance()  # display() publishes rich outputs only inside a shell
    with capture_output() as captured:
        interact(report, bits=(2, 4), group=[32, 96], symmetric=True, static={"bits": [2, 4]})
    (output,) = captured.outputs
    live = "application/vnd.jupyter.widget-view+json" in output.data
    assert live is not static_only
    page = output.data["text/html"]
    assert page.count("data-view=") == 2 * 2 * 2  # bits narrowed to 2 choices for the page
    assert "bits=3" not in page


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: interact(report, colour=["red"]), "has no parameter 'colour'"),
        (lambda: interact(report, bits=[]), "must be a non-empty list"),
        (lambda: interact(report, bits=(8, 2)), "high end below its low end"),
        (lambda: interact(report, bits=[4], static={"depth": [1]}), "not a knob"),
        (
            lambda: interact(report, bits=(1, 40), group=[1, 2]),
            f"more than {MAX_COMBINATIONS} for the static page",
        ),
    ],
)
def test_bad_knobs_are_refused_in_one_line(call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        call()
    assert "\n" not in str(err.value)


def test_static_copy_turns_in_a_browser(tmp_path) -> None:
    """Moving a slider or picking an option shows exactly the view the function printed for
    that combination, and the slider's label follows."""
    if (reason := skip_reason(wllama=False)) is not None:
        pytest.skip(reason)

    def describe(bits: int = 4, mode: str = "int") -> None:
        print(f"{mode}{bits}")

    body = static_html(describe, {"bits": [2, 4, 8], "mode": ["int", "nf"]})
    (tmp_path / "page.html").write_text(f"<!doctype html><html><body>{body}</body></html>")
    with served(tmp_path) as origin, chromium() as browser:
        page = browser.new_page()
        page.goto(f"{origin}/page.html")

        def visible() -> list[str]:
            return page.eval_on_selector_all(
                "[data-view]", "vs => vs.filter(v => !v.hidden).map(v => v.innerText.trim())"
            )

        assert visible() == ["int4"]
        page.fill('input[data-knob="bits"]', "2")
        assert visible() == ["int8"]
        assert page.inner_text('output[data-shows="bits"]') == "8"
        page.select_option('select[data-knob="mode"]', "1")
        assert visible() == ["nf8"]
