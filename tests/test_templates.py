"""Templates from other people's files (task files, chat templates) render as data: the known
sandbox escapes are refused, work and size are bounded, and ordinary templates render exactly as
plain Jinja (lm-evaluation-harness's environment) renders them."""

from __future__ import annotations

import json
import time

import jinja2
import pytest

from slmlab.eval import load_task
from slmlab.eval.tasks import TaskError
from slmlab.infer import ChatTemplateError, render_chat
from slmlab.templates import Sandbox, TemplateLimitError

ESCAPES = [
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self._TemplateReference__context.environment }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{% set x = question.__class__.__base__.__subclasses__() %}{{ x }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_task_file_cannot_run_code(template, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "evil.yaml").write_text(
        "task: evil\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\ntest_split: test\n"
        f"output_type: generate_until\ndoc_to_text: {json.dumps(template)}\ndoc_to_target: answer\n"
    )
    task = load_task(tmp_path / "evil.yaml")
    with pytest.raises(TaskError, match=r"items\.jsonl:1: doc_to_text: template .* failed"):
        task.text(0)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("template", ESCAPES)
def test_a_chat_template_cannot_run_code(template, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match="cannot render the chat template"):
        render_chat(template.replace("question", "messages"), [{"role": "user", "content": "hi"}])
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ 10 ** 100000000 }}",
        "{{ 'a' | center(10**10) }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}",
        "{{ range(99999) | list | join(',') * 20 }}",
    ],
)
def test_work_and_size_are_bounded(template) -> None:
    start = time.monotonic()
    with pytest.raises(TemplateLimitError):
        Sandbox(seconds=1.0).render(template, {})
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "template",
    [
        "Question: {{question}}\nAnswer:",
        "{{ question | regex_replace('[?]', '') }} {{ choices | join(', ') }}\n",
        "{% for c in choices %}{{ loop.index }}. {{ c }}\n{% endfor %}",
        "{{ (choices | length) * 2 }} {{ 'ab' * 3 }} {{ 2 ** 10 }} {{ question[:4] | upper }}",
        "{{ {'a': 1}['a'] }} {{ choices[gold] }}{% if gold > 0 %} late{% endif %}",
    ],
)
def test_ordinary_templates_render_as_plain_jinja(template) -> None:
    doc = {"question": "What is it?", "choices": ["a cat", "a dog"], "gold": 1}
    plain = jinja2.Environment(
        loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    plain.filters["regex_replace"] = lambda s, pattern, repl: __import__("re").sub(pattern, repl, s)
    from slmlab.eval.tasks import _template_env

    assert _template_env().render(template, doc) == plain.from_string(template).render(**doc)
