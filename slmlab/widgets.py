"""A knob a reader turns: live in JupyterLab, and still turning on the published page.

``interact(show, bits=[2, 3, 4, 8], group_size=[32, 96])`` is ipywidgets' ``interact`` where a
kernel runs, and it carries a static copy of itself: ``show`` called once ahead of time for every
combination of the knobs, what it printed and drew kept, and plain HTML controls that show the
combination the reader picks. One output holds both: JupyterLab renders the live widget (its
MIME type ranks first there), the book's site has no kernel and ranks that type out, so it
renders the static copy. Without ipywidgets only the static copy is shown, and so under
``SLMLAB_STATIC_WIDGETS=1``, which the book's build and tests set: a notebook run headless
(nbclient) has no front end for the live widget, and its comm messages there have left the run
waiting for a reply that never came (nbclient#312).
"""

from __future__ import annotations

import base64
import html
import inspect
import itertools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

MAX_COMBINATIONS = 64  # each one is a call of the function and a figure in the page
STATIC_ONLY = "SLMLAB_STATIC_WIDGETS"  # "1": the static copy alone (headless runs)

_SCRIPT = """<script>
(function () {
  const root = document.getElementById(%(id)s);
  const controls = root.querySelectorAll('[data-knob]');
  function update() {
    const key = Array.from(controls, c => c.value).join('|');
    for (const view of root.querySelectorAll('[data-view]')) {
      view.hidden = view.dataset.view !== key;
    }
    for (const c of controls) {
      const shown = root.querySelector('[data-shows="' + c.dataset.knob + '"]');
      if (shown) shown.textContent = c.dataset.labels.split('|')[c.value];
    }
  }
  controls.forEach(c => c.addEventListener('input', update));
  update();
})();
</script>"""


def _choices(name: str, values: object) -> list[Any]:
    if isinstance(values, bool):
        return [values, not values]
    if isinstance(values, tuple) and len(values) == 2 and all(type(v) is int for v in values):
        low, high = values
        if high < low:
            raise ValueError(f"interact: knob {name}={values} has its high end below its low end")
        return list(range(low, high + 1))
    if isinstance(values, (list, tuple)) and values:
        return list(values)
    raise ValueError(
        f"interact: knob {name}={values!r} must be a non-empty list of values, an (int, int) "
        "range or a bool"
    )


def _default(fn: Callable[..., object], name: str, values: list[Any]) -> Any:
    """The function's own default for a knob when it is one of the choices, else the first."""
    parameter = inspect.signature(fn).parameters.get(name)
    if parameter is None:
        raise ValueError(f"interact: {fn.__name__}() has no parameter {name!r} to turn")
    default = parameter.default
    return default if default is not inspect.Parameter.empty and default in values else values[0]


def _render(captured: Any) -> str:
    """What one call printed and displayed, as HTML: text as preformatted text, figures as PNG."""
    parts = []
    if captured.stdout:
        parts.append(f"<pre>{html.escape(captured.stdout)}</pre>")
    for output in captured.outputs:
        data = output.data
        if "image/png" in data:
            png = data["image/png"]
            if isinstance(png, bytes):
                png = base64.b64encode(png).decode()
            parts.append(f'<img src="data:image/png;base64,{png}" alt="figure">')
        elif "text/html" in data:
            parts.append(data["text/html"])
        elif "text/plain" in data:
            parts.append(f"<pre>{html.escape(data['text/plain'])}</pre>")
    return "\n".join(parts)


def static_html(fn: Callable[..., object], knobs: dict[str, Sequence[Any]]) -> str:
    """Every combination of `knobs` (name -> choices) computed by `fn` now, and HTML controls
    that switch between them in a browser, with no kernel behind the page."""
    from IPython.utils.capture import capture_output

    names = list(knobs)
    combinations = list(itertools.product(*(knobs[n] for n in names)))
    if len(combinations) > MAX_COMBINATIONS:
        sizes = " × ".join(f"{n} {len(knobs[n])}" for n in names)
        raise ValueError(
            f"interact: {len(combinations)} combinations ({sizes}) is more than "
            f"{MAX_COMBINATIONS} for the static page; give fewer choices in static="
        )
    root = f"slmlab-knobs-{uuid.uuid4().hex[:12]}"
    defaults = [_default(fn, n, list(knobs[n])) for n in names]
    controls = []
    for name, default in zip(names, defaults, strict=True):
        values = list(knobs[name])
        labels = [str(v) for v in values]
        index = values.index(default)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            controls.append(
                f'<label>{html.escape(name)} <input type="range" data-knob="{name}" min="0" '
                f'max="{len(values) - 1}" step="1" value="{index}" '
                f'data-labels="{html.escape("|".join(labels))}"> '
                f'<output data-shows="{name}">{html.escape(labels[index])}</output></label>'
            )
        else:
            options = "".join(
                f'<option value="{i}"{" selected" if i == index else ""}>{html.escape(label)}'
                "</option>"
                for i, label in enumerate(labels)
            )
            controls.append(
                f'<label>{html.escape(name)} <select data-knob="{name}">{options}</select></label>'
            )
    views = []
    for combination in combinations:
        with capture_output() as captured:
            fn(**dict(zip(names, combination, strict=True)))
        key = "|".join(
            str(list(knobs[n]).index(v)) for n, v in zip(names, combination, strict=True)
        )
        shown = list(combination) == defaults  # the page without scripts shows the default
        views.append(
            f'<div data-view="{key}"{"" if shown else " hidden"}>{_render(captured)}</div>'
        )
    return (
        f'<div id="{root}" class="slmlab-knobs">'
        f'<div class="slmlab-knobs-controls">{" ".join(controls)}</div>'
        + "".join(views)
        + "</div>"
        + _SCRIPT % {"id": json.dumps(root)}
    )


def _ipywidgets() -> Any:
    """The ipywidgets module, or None where it is not installed."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def interact(
    fn: Callable[..., object],
    static: dict[str, Sequence[Any]] | None = None,
    **knobs: object,
) -> None:
    """Display `fn` with a control per knob: a list of choices, an ``(int, int)`` range or a
    bool. The published page gets every combination of the knobs precomputed, or of the
    narrower choices in `static` (name -> choices) where the full grid would be too many."""
    from IPython.display import display

    choices = {name: _choices(name, values) for name, values in knobs.items()}
    for name in choices:
        _default(fn, name, choices[name])  # every knob names a parameter
    narrowed = dict(choices)
    for name, values in (static or {}).items():
        if name not in choices:
            raise ValueError(f"interact: static= names {name!r}, which is not a knob")
        narrowed[name] = _choices(name, values)
    bundle: dict[str, object] = {
        "text/plain": f"{fn.__name__}({', '.join(choices)}): a knob for each",
        "text/html": static_html(fn, narrowed),
    }
    ipywidgets = None if os.environ.get(STATIC_ONLY) == "1" else _ipywidgets()
    if ipywidgets is None:
        display(bundle, raw=True)
        return
    controls = {}
    for name, values in choices.items():
        value = _default(fn, name, values)
        if all(isinstance(v, bool) for v in values):
            controls[name] = ipywidgets.Checkbox(value=value, description=name)
        elif all(isinstance(v, (int, float)) for v in values):
            controls[name] = ipywidgets.SelectionSlider(
                options=values, value=value, description=name
            )
        else:
            controls[name] = ipywidgets.Dropdown(options=values, value=value, description=name)
    live = ipywidgets.interactive(fn, **controls)
    display({**live._repr_mimebundle_(), **bundle}, raw=True)  # the widget's view, and ours
