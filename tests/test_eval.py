"""slmlab.eval: the scorer against a naive forward per request, task files, metrics, story suites,
efficiency, and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmlab.data import stories
from slmlab.eval import (
    Scorer,
    TaskError,
    evaluate,
    exact_match,
    load_task,
    measure_efficiency,
    model_bytes,
    story_items,
    token_bits,
)

SEP = "<|endoftext|>"


@pytest.fixture
def tokenizer(story_tokenizer):
    return story_tokenizer


@pytest.fixture
def model(story_model):
    return story_model


def naive_loglikelihood(model, context: list[int], continuation: list[int], max_length: int):
    """One unbatched forward per request, the truncation rule written out."""
    whole = (context + continuation)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0]
    logprobs = F.log_softmax(logits, -1)[-len(continuation) :]
    target = torch.tensor(continuation)
    ll = logprobs.gather(-1, target[:, None]).sum().item()
    return ll, bool((logprobs.argmax(-1) == target).all())


def test_batched_loglikelihood_equals_one_request_at_a_time(model, tokenizer) -> None:
    scorer = Scorer(model, tokenizer, batch_size=3)
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for n_context, n_cont in [(5, 1), (30, 4), (1, 7), (70, 3), (12, 12), (64, 2), (2, 2)]:
        ids = torch.randint(1, 400, (n_context + n_cont,), generator=generator).tolist()
        pairs.append((ids[:n_context], ids[n_context:]))
    results = scorer.loglikelihood_tokens(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, results, strict=True):
        want_ll, want_greedy = naive_loglikelihood(model, context, continuation, 64)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    assert scorer.truncated == 2  # 70 + 3 and 64 + 2 exceed 64 + 1 tokens
    with pytest.raises(ValueError, match="does not fit the model's context of 64"):
        scorer.loglikelihood_tokens([([1], list(range(1, 66)))])


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation(model, tokenizer) -> None:
    from slmlab.infer import generate

    scorer = Scorer(model, tokenizer)
    prompt = [5, 9, 13]
    greedy = generate(model, [prompt], 4, stop_tokens=())[0][3:]
    [(ll, is_greedy)] = scorer.loglikelihood_tokens([(prompt, greedy)])
    assert is_greedy and ll < 0
    other = [(greedy[0] + 1) % 400, *greedy[1:]]
    assert not scorer.loglikelihood_tokens([(prompt, other)])[0][1]


def test_request_encoding_follows_lm_eval(model, tokenizer) -> None:
    scorer = Scorer(model, tokenizer)
    encode = scorer.encode
    # Trailing whitespace of the context moves into the continuation.
    context, continuation = scorer.encode_pair("Mia went to the ", "park.")
    assert context == encode("Mia went to the")
    assert context + continuation == encode("Mia went to the park.")
    # An empty context is the end-of-text token.
    assert scorer.encode_pair("", "Mia") == ([tokenizer.token_to_id(SEP)], encode("Mia"))


def test_superword_requests_start_the_continuation_at_the_token_that_crosses(
    superword_model, superword_tokenizer
) -> None:
    scorer = Scorer(superword_model, superword_tokenizer)
    items = story_items("stories_what", size=60)
    requests = [(item["context"], " " + choice) for item in items for choice in item["choices"]]
    crossing = 0
    for context, continuation in requests:
        context_ids, continuation_ids = scorer.encode_pair(context, continuation)
        whole = scorer.encode(context + continuation)
        assert context_ids + continuation_ids == whole and continuation_ids
        assert context.startswith(scorer.decode(context_ids))
        assert scorer.decode(continuation_ids).endswith(continuation)
        if whole[: len(scorer.encode(context))] != scorer.encode(context):
            crossing += 1  # lm-eval's cut at len(encode(context)) would split this token
    assert crossing > 0, "no request has a token across the cut: the test tests nothing"


def test_rolling_loglikelihood_uses_lm_eval_windows(model, tokenizer) -> None:
    utils = pytest.importorskip("lm_eval.utils")
    scorer = Scorer(model, tokenizer)
    text = " ".join(stories(2, seed=3))
    ids = scorer.encode(text)
    assert len(ids) > 2 * 64  # several windows
    want = 0.0
    for window in utils.get_rolling_token_windows(ids, scorer.prefix_token_id, 64, 1):
        context, continuation = utils.make_disjoint_window(window)
        want += naive_loglikelihood(model, context, continuation, 64)[0]
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(want, rel=1e-5)


def test_every_stride_scores_every_token_once_with_the_context_it_promises(model) -> None:
    ids = torch.randint(1, 400, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    for stride in (64, 40, 17):
        bits = token_bits(model, ids, context=64, stride=stride)
        assert bits.shape == (149,)
        # Token i was scored by the window that ends at it, which starts at most 64 tokens back
        # and at least 64 - stride: check a few against one forward each.
        for i in (1, 63, 64, 65, 100, 149):
            end = next(e for e in [65, *range(65 + stride, 150 + stride, stride)] if e >= i + 1)
            end = min(end, 150)
            start = max(0, end - 1 - 64)
            ll = naive_loglikelihood(model, ids[start:i], [ids[i]], 64)[0]
            assert bits[i - 1].item() == pytest.approx(-ll / math.log(2), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Task files


def write_task(tmp_path: Path, rows: list, **config) -> Path:
    data = tmp_path / "items.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    settings = {
        "task": "toy",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        **config,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


ROWS = [
    {"question": "Mia had a red", "choices": ["ball", "kite", "hat"], "gold": 0},
    {"question": "Tom went to the", "choices": ["park", "library"], "gold": 1},
    {"question": "In the end, Mia and", "choices": ["Tom", "Alexandra", "Ben", "Zoe"], "gold": 3},
]


def test_accuracy_and_normalised_accuracy_by_their_definitions(model, tokenizer, tmp_path):
    scorer = Scorer(model, tokenizer)
    result = evaluate(scorer, load_task(write_task(tmp_path, ROWS)), progress=False)
    acc = acc_norm = 0
    for row in ROWS:
        lls = [scorer.loglikelihood([(row["question"], " " + c)])[0][0] for c in row["choices"]]
        per_char = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        acc += lls.index(max(lls)) == row["gold"]
        acc_norm += per_char.index(max(per_char)) == row["gold"]
    assert result.metrics == {"acc": acc / 3, "acc_norm": acc_norm / 3}
    assert result.samples == 3 and result.truncated == 0


def test_targets_may_be_text_and_templates_may_build_lists(model, tokenizer, tmp_path) -> None:
    rows = [
        {"q": r["question"], "a": r["choices"], "answer": r["choices"][r["gold"]]} for r in ROWS
    ]
    path = write_task(
        tmp_path, rows, doc_to_text="q", doc_to_choice="{{a}}", doc_to_target="answer"
    )
    task = load_task(path)
    assert [task.target(i) for i in range(3)] == [0, 1, 3]
    assert task.choices(0) == ["ball", "kite", "hat"]


def test_exact_match_equals_lm_eval() -> None:
    metrics = pytest.importorskip("lm_eval.api.metrics")
    predictions = [" Tom were happy", "tom", "Ben!", "Z0e", " Mia"]
    references = ["Tom", "Tom", "Ben", "Zoe", "Mia"]
    for options in [
        {},
        {"regexes_to_ignore": ["^ ", " were.*"]},
        {"ignore_case": True, "ignore_punctuation": True},
        {"ignore_numbers": True, "regexes_to_ignore": [" "]},
    ]:
        ours = exact_match(predictions, references, **options)
        theirs = metrics.exact_match_hf_evaluate(predictions, references, **options)
        assert sum(ours) / len(ours) == pytest.approx(theirs["exact_match"])


@pytest.mark.parametrize(
    ("rows", "config", "message"),
    [
        ([{"question": "a", "choices": ["x"], "gold": 0}, {"choices": ["x"], "gold": 0}], {},
         r"items.jsonl:2: doc_to_text: template '\{\{question\}\}' failed: 'question' is undefined"),
        ([{"question": "a", "choices": ["x", "y"], "gold": 2}], {},
         r"items.jsonl:1: doc_to_target 2 is out of range for 2 choices"),
        ([{"question": "a", "choices": [], "gold": 0}], {},
         r"items.jsonl:1: doc_to_choice: the list of choices is empty"),
        (["{not json"], {}, r"items.jsonl:1: not valid JSON"),
        ([{"question": "a", "choices": ["x"], "gold": 0}], {"num_fewshot": 5},
         r"num_fewshot must be 0"),
        ([{"question": "a", "choices": ["x"], "gold": 0}], {"process_docs": "!function x.f"},
         r"not supported here: process_docs"),
        ([{"question": "a", "choices": ["x"], "gold": 0}], {"dataset_path": "allenai/ai2_arc"},
         r"dataset_path must be 'json'"),
        ([{"question": "a", "choices": ["x"], "gold": 0}], {"metric_list": [{"metric": "bleu"}]},
         r"metric 'bleu' is not available for multiple_choice"),
    ],
)  # fmt: skip
def test_malformed_tasks_name_the_file_line_and_field(tmp_path, rows, config, message) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(write_task(tmp_path, rows, **config)).check()


def test_perplexity_task_equals_the_rolling_loglikelihood(model, tokenizer, tmp_path) -> None:
    text = "Mia went to the park. " * 30
    file = tmp_path / "text.txt"
    file.write_text(text)
    scorer = Scorer(model, tokenizer)
    result = evaluate(scorer, load_task(f"ppl:{file}"), progress=False)
    ll = scorer.loglikelihood_rolling([text])[0]
    assert result.metrics["bits_per_byte"] == pytest.approx(-ll / len(text) / math.log(2))
    assert result.metrics["word_perplexity"] == pytest.approx(
        math.exp(-ll / len(re.split(r"\s+", text)))
    )


# ----------------------------------------------------------------------------------------------
# Story suites


@pytest.mark.parametrize("name", ["stories_who", "stories_where", "stories_what"])
def test_story_items_have_one_right_answer_that_the_story_copies(name) -> None:
    items = story_items(name, size=40)
    assert items == story_items(name, size=40)  # deterministic
    for item in items:
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == item["answer"]
        # The answer was introduced in the opening's five sentences, before the cloze: that
        # copy is what the item tests.
        opening = ".".join(item["context"].split(".")[:5])
        assert re.search(rf"\b{item['answer']}\b", opening), item
        assert not item["context"].endswith(" ")


def test_story_suites_are_lm_eval_task_files(tmp_path) -> None:
    from slmlab.eval import story_task_file

    task = load_task(story_task_file("stories_where", tmp_path))
    assert task.output_type == "multiple_choice" and len(task.docs) == 200
    assert task.docs[:40] == story_items("stories_where", size=40)
    gen = load_task(story_task_file("stories_who_gen", tmp_path))
    assert gen.output_type == "generate_until"
    assert gen.metrics["exact_match"]["regexes_to_ignore"] == ["^ ", " were.*"]


# ----------------------------------------------------------------------------------------------
# Efficiency


def test_efficiency_reports_every_figure(model, tmp_path) -> None:
    from slmlab import save
    from slmlab.eval import disk_bytes

    save(model, tmp_path / "ckpt")
    result = measure_efficiency(
        model, prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2), repeats=1, path=tmp_path / "ckpt"
    )
    # fp32 parameters (a tied embedding counted once) and buffers
    assert result["model_bytes"] == 4 * model.num_parameters() + 4 * sum(
        b.numel() for b in model.buffers()
    )
    assert model_bytes(model) == result["model_bytes"]
    assert result["disk_bytes"] == disk_bytes(tmp_path / "ckpt") > 0
    assert set(result["tokens_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] >= 0
    assert result["peak_rss_bytes"] > result["model_bytes"]
    json.dumps(result)  # JSON-ready
    with pytest.raises(ValueError, match="exceeds the model's context"):
        measure_efficiency(model, prompt_tokens=60, new_tokens=8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_efficiency_on_cuda_reports_the_allocator_peak(model) -> None:
    import copy

    gpu = copy.deepcopy(model).cuda()
    result = measure_efficiency(gpu, prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2), repeats=1)
    assert result["settings"]["device"].startswith("cuda")
    # the weights were on the GPU all along, and decoding allocated more (the KV cache)
    assert result["cuda_peak_bytes"] > result["model_bytes"]
    assert all(v > 0 for v in result["tokens_per_s"].values())


# ----------------------------------------------------------------------------------------------
# The command line


def test_eval_command_prints_and_writes_what_the_library_computes(model, tokenizer, tmp_path):
    from slmlab import save
    from slmlab.cli import main

    checkpoint = save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    task_file = write_task(tmp_path, ROWS)
    text = tmp_path / "text.txt"
    text.write_text("Mia went to the park with Tom. " * 10)
    out = tmp_path / "results.json"
    tasks = f"{task_file},ppl:{text}"
    assert main(["eval", str(checkpoint), "--tasks", tasks, "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    scorer = Scorer(model, tokenizer)
    assert result["tasks"]["toy"]["metrics"] == evaluate(scorer, load_task(task_file)).metrics
    ppl = evaluate(scorer, load_task(f"ppl:{text}")).metrics
    assert result["tasks"][f"ppl:{text}"]["metrics"] == pytest.approx(ppl)
    assert result["disk_bytes"] > 0 and "torch" in result["machine"]


def test_eval_command_on_a_bad_task_is_one_line(model, tokenizer, tmp_path, capsys) -> None:
    from slmlab import save
    from slmlab.cli import main

    checkpoint = save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    bad = write_task(tmp_path, [{"question": "a", "choices": ["x", "y"], "gold": 5}])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(checkpoint), "--tasks", str(bad), "--quiet"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"slmlab eval: error: {tmp_path / 'items.jsonl'}:1: doc_to_target 5 is out of range "
        "for 2 choices"
    ]


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_scorer_batch_size_must_be_a_positive_integer(model, tokenizer, batch_size) -> None:
    """A batch of -1 scored every log-likelihood as 0 instead of failing."""
    with pytest.raises(
        ValueError, match=rf"batch_size must be a positive integer, got {batch_size!r}"
    ):
        Scorer(model, tokenizer, batch_size=batch_size)
