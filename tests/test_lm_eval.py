"""lm-evaluation-harness's own evaluator, running the registered ``slmlab`` model on local task
files, gives the numbers slmlab's own scorer gives on the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmlab.data import stories
from slmlab.eval import Scorer, evaluate, load_task, story_items

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


@pytest.fixture(params=["words", "superwords", "superwords-healed"])
def scorer(request) -> Scorer:
    # The model's context (64) is shorter than the items: truncation is exercised too. With
    # superword tokens some choices merge with the context's last word (test_eval checks that),
    # and generation may heal the prompt's end (test_healing).
    prefix = "story" if request.param == "words" else "superword"
    model = request.getfixturevalue(f"{prefix}_model")
    return Scorer(
        model,
        request.getfixturevalue(f"{prefix}_tokenizer"),
        batch_size=8,
        token_healing=request.param.endswith("healed"),
    )


def write_tasks(folder: Path) -> list[str]:
    items = story_items("stories_what", size=30)
    (folder / "what.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    texts = [{"text": t} for t in stories(6, seed=4)]
    (folder / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    data = "dataset_path: json\ntest_split: test\n"
    what = f"dataset_kwargs:\n  data_files:\n    test: {folder / 'what.jsonl'}\n"
    (folder / "toy_mc.yaml").write_text(
        f"task: toy_mc\n{data}{what}output_type: multiple_choice\n"
        # a Jinja template, a list field and an index target
        "doc_to_text: 'Story: {{context}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "toy_gen.yaml").write_text(
        f"task: toy_gen\n{data}{what}output_type: generate_until\n"
        "doc_to_text: context\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.', ' ']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: ['^ ']\n    ignore_case: true\n"
    )
    texts_file = f"dataset_kwargs:\n  data_files:\n    test: {folder / 'texts.jsonl'}\n"
    (folder / "toy_ppl.yaml").write_text(
        f"task: toy_ppl\n{data}{texts_file}output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return ["toy_mc", "toy_gen", "toy_ppl"]


def assert_lm_eval_agrees(scorer: Scorer, folder: Path, names: list[str], rel: float, **model):
    """lm-eval's `simple_evaluate(**model)` on the task files in `folder` gives every metric
    slmlab's `evaluate` gives with `scorer`; returns lm-eval's results."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        **model,
        tasks=names,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        bootstrap_iters=0,
    )["results"]
    for name in names:
        ours = evaluate(scorer, load_task(folder / f"{name}.yaml"), progress=False).metrics
        theirs = {k.split(",")[0]: v for k, v in results[name].items() if k.endswith(",none")}
        assert set(ours) <= set(theirs), (name, theirs)
        for metric, value in ours.items():
            assert theirs[metric] == pytest.approx(value, rel=rel), (name, metric)
    return results


def test_lm_eval_evaluator_agrees_with_slmlab(scorer, tmp_path) -> None:
    from slmlab.eval.harness import SlmlabLM

    names = write_tasks(tmp_path)
    results = assert_lm_eval_agrees(scorer, tmp_path, names, 1e-6, model=SlmlabLM(scorer=scorer))
    # Sanity: the comparison is not between two constant answers.
    assert 0 < results["toy_ppl"]["bits_per_byte,none"] < 20


def test_the_model_is_registered_for_the_lm_eval_command_line(tmp_path) -> None:
    # `--model slmlab` must resolve once slmlab.eval.harness is imported.
    code = (
        "import slmlab.eval.harness\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('slmlab').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SlmlabLM"


def test_model_args_reach_the_scorer(superword_model, superword_tokenizer, tmp_path) -> None:
    import slmlab
    from slmlab.eval.harness import SlmlabLM

    path = slmlab.save(superword_model, tmp_path / "ckpt", tokenizer=superword_tokenizer)
    plain = SlmlabLM.create_from_arg_string(f"pretrained={path},batch_size=4")
    healed = SlmlabLM.create_from_arg_string(f"pretrained={path},token_healing=True")
    assert plain.scorer.healer is None and plain.scorer.batch_size == 4
    assert healed.scorer.healer is not None


def test_slmlab_scores_as_lm_evals_own_hf_model_where_the_tokenizer_has_bos(tmp_path) -> None:
    """A model with beginning- and end-of-text tokens (SmolLM2's: <|im_start|> 1, <|im_end|> 2),
    converted from GGUF as the zoo converts SmolLM2: lm-eval's `hf` model conditions a text's
    first token on BOS, and so must slmlab."""
    import slmlab
    from slmlab.checkpoint import convert_gguf
    from slmlab.models import DecoderLM
    from slmlab.tokenizers import train_bpe
    from tests.test_gguf import CONFIG, SPECIALS, write_gguf

    tokenizer = train_bpe(stories(300, seed=5), CONFIG.vocab_size, special_tokens=SPECIALS).to_hf()
    gguf = write_gguf(tmp_path / "m.gguf", DecoderLM(CONFIG).eval(), tokenizer)
    checkpoint = convert_gguf(gguf, tmp_path / "checkpoint")
    scorer = Scorer(slmlab.load(checkpoint), slmlab.load_tokenizer(checkpoint), batch_size=8)
    assert scorer.prefix_token_id == tokenizer.token_to_id("<|im_start|>") != CONFIG.eos_token_id
    names = [n for n in write_tasks(tmp_path) if n != "toy_gen"]
    hf = f"pretrained={checkpoint},dtype=float32,device=cpu"
    assert_lm_eval_agrees(scorer, tmp_path, names, 1e-5, model="hf", model_args=hf)


def test_registering_slmlab_keeps_lm_evals_own_models() -> None:
    code = (
        "import slmlab.eval.harness\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('hf').__name__, get_model('slmlab').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["HFLM", "SlmlabLM"]
