"""Distillation: every loss against a direct formula and TRL, the chunked loss's gradients
against autograd on the whole batch, and runs that resume exactly and learn from the teacher."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from slmlab import checkpoint
from slmlab.data.chat import IGNORE
from slmlab.distill import (
    LOSSES,
    CachedTeacherHead,
    DistillConfig,
    TeacherCache,
    cache_teacher,
    distillation_loss,
    divergence,
    feature_loss,
    feature_projection,
    relation_loss,
    relations,
    student_continuations,
    teacher_texts,
    train_distill,
)
from slmlab.models import ConfigError
from slmlab.train import TrainConfig, build_data, train
from tests.test_train import TINY

TEACHER = TINY.replace(steps=30, eval_every=30)  # the loop tests' model, trained a little longer
STUDENT_MODEL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The losses


def _direct(p: list[float], q: list[float], loss: str, beta: float) -> float:
    """The divergences' textbook formulas over plain Python lists of probabilities."""
    if loss == "forward-kl":
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)
    if loss == "reverse-kl":
        return sum(b * math.log(b / a) for a, b in zip(p, q, strict=True) if b > 0)
    if loss == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
    return beta * _direct(p, m, "forward-kl", 0) + (1 - beta) * _direct(q, m, "forward-kl", 0)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_is_its_formula(loss, temperature) -> None:
    student, teacher = torch.randn(2, 5, 11, dtype=torch.float64).unbind(0)
    got = divergence(student, teacher, loss, temperature=temperature, beta=0.3)
    for s, t, value in zip(student, teacher, got, strict=True):
        q = torch.softmax(s / temperature, -1).tolist()
        p = torch.softmax(t / temperature, -1).tolist()
        assert value.item() == pytest.approx(_direct(p, q, loss, 0.3), rel=1e-5, abs=1e-7)


def test_jsd_tends_to_forward_and_reverse_kl_and_is_trls() -> None:
    """TRL's GKD loss (its beta means the same) gives the same number; near β = 0 and β = 1,
    JSD / β and JSD / (1 − β) approach forward and reverse KL."""
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    student, teacher = torch.randn(2, 3, 7, 13).unbind(0)
    for beta in (0.1, 0.5, 0.9):
        ours = divergence(student, teacher, "jsd", temperature=2.0, beta=beta)
        theirs = GKDTrainer.generalized_jsd_loss(
            student, teacher, beta=beta, temperature=2.0, reduction="sum"
        )
        torch.testing.assert_close(ours.sum(), theirs, rtol=1e-5, atol=1e-6)
    s, t = student.double(), teacher.double()
    forward, reverse = divergence(s, t, "forward-kl"), divergence(s, t, "reverse-kl")
    small = 1e-6
    near_forward = divergence(s, t, "jsd", beta=small) / small
    near_reverse = divergence(s, t, "jsd", beta=1 - small) / small
    torch.testing.assert_close(near_forward, forward, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(near_reverse, reverse, rtol=1e-4, atol=1e-6)


def test_a_teacher_cut_to_its_top_tokens_costs_nothing_where_it_is_silent() -> None:
    """Forward KL with -inf logits (a teacher kept to its top k) is finite, and its gradient too."""
    student = torch.randn(4, 9, requires_grad=True)
    teacher = torch.randn(4, 9)
    teacher[:, 5:] = -math.inf
    value = divergence(student, teacher, "forward-kl").sum()
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(student.grad).all()


def _naive_distillation(hidden_s, head_s, hidden_t, head_t, labels, loss, temperature, alpha):
    """The whole batch's logits at once: the reference the chunked loss must equal."""
    keep = labels != IGNORE
    logits, teacher = head_s(hidden_s)[keep], head_t(hidden_t)[keep].detach()
    log_q = F.log_softmax(logits / temperature, -1)
    log_p = F.log_softmax(teacher / temperature, -1)
    soft = {
        "forward-kl": (log_p.exp() * (log_p - log_q)).sum(-1),
        "reverse-kl": (log_q.exp() * (log_q - log_p)).sum(-1),
        "tv": 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1),
    }[loss]
    hard = F.cross_entropy(logits, labels[keep], reduction="none")
    return (alpha * temperature**2 * soft + (1 - alpha) * hard).sum()


@pytest.mark.parametrize("loss", ["forward-kl", "reverse-kl", "tv"])
def test_chunked_loss_and_its_gradients_equal_the_whole_batchs(loss) -> None:
    torch.manual_seed(1)
    head_s = torch.nn.Linear(8, 23, bias=False)
    head_t = torch.nn.Linear(12, 23, bias=False)  # a wider teacher: its own hidden size
    hidden_s = torch.randn(3, 7, 8, requires_grad=True)
    hidden_t = torch.randn(3, 7, 12)
    labels = torch.randint(0, 23, (3, 7))
    labels[0, :4] = IGNORE
    total, count = distillation_loss(
        hidden_s, head_s, hidden_t, head_t, labels,
        loss=loss, temperature=2.0, alpha=0.7, chunk=5,
    )  # fmt: skip
    grads = torch.autograd.grad(total, [hidden_s, head_s.weight])
    reference = _naive_distillation(hidden_s, head_s, hidden_t, head_t, labels, loss, 2.0, 0.7)
    expected = torch.autograd.grad(reference, [hidden_s, head_s.weight])
    assert count == int((labels != IGNORE).sum())
    torch.testing.assert_close(total, reference)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert head_t.weight.grad is None  # the teacher learns nothing


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": "kl"}, "distill.loss must be one of"),
        ({"temperature": 0}, "distill.temperature must be above 0"),
        ({"temperature": float("nan")}, "distill.temperature"),
        ({"alpha": 1.5}, r"distill.alpha must be in \[0, 1\]"),
        ({"beta": 1.0}, "distill.beta must be strictly between 0 and 1"),
        ({"teacher": ""}, "distill.teacher must be"),
        ({"top_k": 0}, "distill.top_k must be a positive number"),
        ({"on_policy": 1.5}, r"distill.on_policy must be in \[0, 1\]"),
        ({"cache": "c.safetensors", "on_policy": 0.5}, "drop one of them"),
        ({"cache": "c.safetensors", "relations": 1.0}, "not its attention"),
        ({"relations": -1.0}, "distill.relations must be a weight"),
        ({"relation_heads": 0}, "distill.relation_heads must be a positive"),
        ({"relation_layers": [3]}, r"distill.relation_layers must be \[teacher's block"),
        ({"features": -0.5}, "distill.features must be a weight"),
        ({"feature_layers": [0, 1, 2]}, r"distill.feature_layers must be \[teacher's block"),
        ({"cache": "c.safetensors", "features": 1.0}, "not its hidden states"),
    ],
)
def test_bad_distillation_settings_are_named(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**{"teacher": "t", **changes})


def test_a_distill_table_is_checked_where_it_is_read() -> None:
    config = TEACHER.replace(distill={"teacher": "t", "temprature": 2.0})
    with pytest.raises(ConfigError, match=r"distill\.temprature is not a distillation field"):
        DistillConfig.of(config)
    with pytest.raises(ConfigError, match=r"distill\.teacher is missing"):
        DistillConfig.of(TEACHER.replace(distill={"loss": "tv"}))
    with pytest.raises(ConfigError, match="objective must be next-token"):
        TEACHER.replace(objective="sft", init_from="x", distill={"teacher": "t"})
    assert TrainConfig.from_dict(
        tomllib.loads(TEACHER.replace(distill={"teacher": "t"}).to_toml())
    ).distill == {"teacher": "t"}


# --------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher trained for 30 steps on stories, and its data."""
    data = build_data(TEACHER)
    out = tmp_path_factory.mktemp("teacher")
    return train(TEACHER, out, progress=False, data=data).checkpoint


def _student(teacher, **distill) -> TrainConfig:
    return TEACHER.replace(
        model=STUDENT_MODEL, steps=8, eval_every=4, distill={"teacher": str(teacher), **distill}
    )


def test_the_first_step_learns_the_mean_divergence_from_the_teacher(teacher, tmp_path) -> None:
    """Step 1's logged loss is the mean forward KL between the fresh student and the teacher
    on step 1's rows, computed here from the two models' logits."""
    config = _student(teacher, alpha=1.0, temperature=1.0)
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    train_distill(config, tmp_path / "run", data=data, progress=False, max_steps=1)
    torch.manual_seed(config.seed)
    from slmlab.models import DecoderLM

    student = DecoderLM(config.model_config(data.vocab_size, data.end_token_id()))
    ids = data.batch(0, config.batch_size, config.seed).ids
    with torch.no_grad():
        expected = divergence(student(ids[:, :-1]), checkpoint.load(teacher)(ids[:, :-1])).mean()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_zero_is_training_from_scratch(teacher, tmp_path) -> None:
    """With the teacher weighted 0 the run is plain pre-training on the teacher's tokens."""
    config = _student(teacher, alpha=0.0)
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    distilled = train_distill(config, tmp_path / "kd", data=data, progress=False)
    plain = train(config.replace(distill=None), tmp_path / "plain", data=data, progress=False)
    assert distilled.val_loss == pytest.approx(plain.val_loss, rel=1e-4)


def _resumes_to_the_bit(config: TrainConfig, tmp_path):
    """Train `config` straight through, and stopped halfway then resumed: the same weights,
    bit for bit. Returns the straight run."""
    teacher = config.distill["teacher"]
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    straight = train_distill(config, tmp_path / "straight", data=data, progress=False)
    stop = config.steps // 2
    train_distill(config, tmp_path / "stopped", data=data, progress=False, max_steps=stop)
    resumed = train_distill(config, tmp_path / "stopped", data=data, progress=False, resume=True)
    for weights in ("model.safetensors", "objective.safetensors"):
        if not (straight.checkpoint / weights).is_file():
            assert not (resumed.checkpoint / weights).is_file()
            continue
        a, b = load_file(straight.checkpoint / weights), load_file(resumed.checkpoint / weights)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    return straight


def test_a_distillation_run_resumes_to_the_bit_and_moves_toward_the_teacher(
    teacher, tmp_path
) -> None:
    straight = _resumes_to_the_bit(_student(teacher, loss="reverse-kl", temperature=2.0), tmp_path)
    losses = [json.loads(line)["loss"] for line in (straight.out / "metrics.jsonl").open()]
    assert losses[-1] < losses[0]


def test_a_distill_config_needs_its_teacher(teacher, tmp_path) -> None:
    config = _student(teacher)
    with pytest.raises(ValueError, match="learns from a teacher"):
        train(config, tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        train_distill(_student(tmp_path / "nowhere"), tmp_path / "run", progress=False)
    other = build_data(TEACHER.replace(vocab_size=280))  # its own tokenizer, not the teacher's
    with pytest.raises(ValueError, match="read with another tokenizer than the teacher's"):
        train_distill(config, tmp_path / "run", data=other, progress=False)


def test_the_teachers_texts_are_seeded_and_train_a_student(teacher, tmp_path) -> None:
    model, tokenizer = checkpoint.load(teacher), checkpoint.load_tokenizer(teacher)
    texts = teacher_texts(model, tokenizer, 5, max_new_tokens=40, batch_size=2, progress=False)
    again = teacher_texts(model, tokenizer, 5, max_new_tokens=40, batch_size=2, progress=False)
    other = teacher_texts(
        model, tokenizer, 5, max_new_tokens=40, batch_size=2, seed=1, progress=False
    )
    assert texts == again and texts != other and len(texts) == 5
    assert all("<|endoftext|>" not in text and text for text in texts)
    corpus = tmp_path / "teacher.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 8))
    config = TEACHER.replace(
        model=STUDENT_MODEL, data=str(corpus), steps=2, warmup_steps=1, eval_every=2
    )
    result = train(config, tmp_path / "student", progress=False)
    assert result.step == 2 and math.isfinite(result.val_loss)


def test_the_teachers_texts_can_be_checked(teacher) -> None:
    """With `keep`, the texts are the accepted ones of the same seeded batches, in order."""
    model, tokenizer = checkpoint.load(teacher), checkpoint.load_tokenizer(teacher)

    def odd(text: str) -> bool:  # turns away about half, whatever the texts say
        return len(text) % 2 == 1

    options = dict(max_new_tokens=30, batch_size=4, progress=False)
    every = teacher_texts(model, tokenizer, 24, **options)
    accepted = [i for i, t in enumerate(every) if odd(t)][:3]
    assert len(accepted) == 3 and accepted[-1] > 2  # some were turned away before the third
    wanted = [every[i] for i in accepted]
    assert teacher_texts(model, tokenizer, 3, keep=odd, **options) == wanted
    with pytest.raises(ValueError, match=r"keep accepted 0 of 8 texts .* loosen keep"):
        teacher_texts(model, tokenizer, 2, keep=lambda text: False, max_tries=4, **options)
    with pytest.raises(ValueError, match="max_tries must be 1 or more"):
        teacher_texts(model, tokenizer, 2, max_tries=0, **options)


def test_the_command_line_distils_and_names_a_bad_setting(teacher, tmp_path) -> None:
    import subprocess
    import sys

    student = tmp_path / "student.toml"
    student.write_text(TEACHER.replace(model=STUDENT_MODEL, steps=3, warmup_steps=1).to_toml())
    command = [sys.executable, "-m", "slmlab", "distill", "--teacher", str(teacher),
               "--student-config", str(student), "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    done = subprocess.run([*command, "--loss", "jsd"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "step 3" in done.stdout
    trainer = json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())
    assert trainer["config"]["distill"] == {"teacher": str(teacher), "loss": "jsd"}
    cache = tmp_path / "teacher-top4.safetensors"
    cached = [
        *command[:-2],
        str(tmp_path / "cached"),
        "--quiet",
        "--cache",
        str(cache),
        "--top-k",
        "4",
    ]
    done = subprocess.run(cached, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert TeacherCache(cache).k == 4
    trainer = json.loads((tmp_path / "cached" / "last" / "trainer.json").read_text())
    assert trainer["config"]["distill"] == {
        "teacher": str(teacher),
        "cache": str(cache),
        "top_k": 4,
    }
    taught = [*command[:-2], str(tmp_path / "taught"), "--quiet", "--features", "0.5",
              "--relations", "0.1"]  # fmt: skip
    done = subprocess.run(taught, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trainer = json.loads((tmp_path / "taught" / "last" / "trainer.json").read_text())
    assert trainer["config"]["distill"] == {
        "teacher": str(teacher), "features": 0.5, "relations": 0.1,
    }  # fmt: skip
    assert (tmp_path / "taught" / "last" / "objective.safetensors").is_file()
    bad = subprocess.run([*command, "--temperature", "-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "distill.temperature must be above 0" in bad.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# The teacher's cache and on-policy rows


def test_a_cached_row_rebuilds_the_top_k_and_spreads_the_rest_evenly() -> None:
    """The rebuilt distribution against its definition, position by position: the teacher's
    k largest probabilities where it put them, the rest of the mass split evenly."""
    torch.manual_seed(0)
    vocab, k, temperature = 11, 4, 2.0
    logits = torch.randn(3, vocab) * 3
    p = torch.softmax(logits / temperature, -1)
    top = p.log().topk(k, -1)
    rows = torch.cat([top.values, top.indices.float()], -1)
    rebuilt = torch.softmax(CachedTeacherHead(vocab, temperature)(rows) / temperature, -1)
    for i in range(3):
        kept = set(top.indices[i].tolist())
        rest = (1 - sum(p[i, j].item() for j in kept)) / (vocab - k)
        want = [p[i, j].item() if j in kept else rest for j in range(vocab)]
        torch.testing.assert_close(rebuilt[i], torch.tensor(want))


def test_a_whole_cache_is_the_live_teacher_and_a_run_reads_it_without_the_teacher(
    teacher, tmp_path, monkeypatch
) -> None:
    """With k = the vocabulary the cached loss is the live one (fp16 log-probabilities: to
    1e-3); a run that names the cache makes it once and the next run never loads the teacher."""
    from slmlab import distill

    model = checkpoint.load(teacher)
    vocab = model.config.vocab_size
    config = _student(teacher, loss="jsd", temperature=2.0, alpha=1.0)
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    data = dataclasses.replace(data, train=data.train[:16])  # a cache of 16 rows, not 2,557
    live = train_distill(config, tmp_path / "live", data=data, progress=False, max_steps=2)
    cached_config = _student(
        teacher, loss="jsd", temperature=2.0, alpha=1.0,
        cache=str(tmp_path / "teacher.safetensors"), top_k=vocab,
    )  # fmt: skip
    cached = train_distill(
        cached_config, tmp_path / "cached", data=data, progress=False, max_steps=2
    )
    losses = [
        [json.loads(line)["loss"] for line in (run.out / "metrics.jsonl").open()]
        for run in (live, cached)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)

    def no_teacher(source):
        raise AssertionError("the cache should have spared loading the teacher")

    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    again = train_distill(cached_config, tmp_path / "again", data=data, progress=False, max_steps=2)
    assert again.train_loss == cached.train_loss


def test_a_cache_for_other_rows_or_settings_is_refused(teacher, tmp_path) -> None:
    model = checkpoint.load(teacher)
    data = build_data(TEACHER.replace(distill=None), tokenizer=checkpoint.load_tokenizer(teacher))
    path = cache_teacher(model, data.train[:3], tmp_path / "c.safetensors", k=5, progress=False)
    cache = TeacherCache(path)
    assert cache.rows(data.train[[2, 0]]).shape == (2, data.train.shape[1] - 1, 10)
    with pytest.raises(ValueError, match=r"c\.safetensors: a training row is not in the teacher"):
        cache.rows(data.train[3:4])
    with pytest.raises(ValueError, match=r"top_k = 5, the run asks for distill.top_k = 8"):
        cache.check(k=8, temperature=1.0, vocab_size=model.config.vocab_size)
    with pytest.raises(ValueError, match=r"temperature = 1.0, the run asks for distill.temp"):
        cache.check(k=5, temperature=2.0, vocab_size=model.config.vocab_size)
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed


def test_on_policy_rows_keep_their_prompt_and_learn_the_students_own_tokens(teacher) -> None:
    student = checkpoint.load(teacher).train()
    data = build_data(TEACHER.replace(distill=None), tokenizer=checkpoint.load_tokenizer(teacher))
    rows = data.train[:6]
    ids, labels, picked = student_continuations(student, rows, 0.5)
    again = student_continuations(student, rows, 0.5)
    assert all(torch.equal(a, b) for a, b in zip((ids, labels, picked), again, strict=True))
    assert 0 < int(picked.sum()) < 6 and student.training  # the draw, and the mode restored
    half = rows.shape[1] // 2
    assert torch.equal(ids[~picked], rows[~picked]) and torch.equal(ids[:, :half], rows[:, :half])
    assert not torch.equal(ids[picked], rows[picked])  # the student wrote something else
    assert (labels[picked, : half - 1] == IGNORE).all()
    assert torch.equal(labels[picked, half - 1 :], ids[picked, half:])
    assert torch.equal(labels[~picked], rows[~picked, 1:])
    none = student_continuations(student, rows, 0.0)
    assert not none[2].any() and torch.equal(none[0], rows)
    assert student_continuations(student, rows, 1.0)[2].all()


def test_an_on_policy_run_resumes_to_the_bit(teacher, tmp_path) -> None:
    config = _student(teacher, loss="jsd", on_policy=0.5).replace(steps=4, eval_every=4)
    _resumes_to_the_bit(config, tmp_path)


# --------------------------------------------------------------------------------------------
# Attention relations


def _naive_relation(x: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2's relation of one row, query by query, with plain loops and Python's exp."""
    T, width = x.shape
    d = width // heads
    out = torch.full((heads, T, T), -math.inf, dtype=torch.float64)
    for h in range(heads):
        part = x[:, h * d : (h + 1) * d].double()
        for i in range(T):
            scores = [float(part[i] @ part[j]) / math.sqrt(d) for j in range(i + 1)]
            top = max(scores)
            norm = math.log(sum(math.exp(v - top) for v in scores)) + top
            for j in range(i + 1):
                out[h, i, j] = scores[j] - norm
    return out


def test_relations_against_a_naive_softmax_and_the_loss_against_its_sum() -> None:
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 12) for _ in range(3))  # width 12 and 8: 4 heads each
    student = tuple(torch.randn(2, 5, 8, requires_grad=True) for _ in range(3))
    got = relations(teacher[0], 4)
    for b in range(2):
        torch.testing.assert_close(
            got[b].double(), _naive_relation(teacher[0][b], 4), rtol=1e-5, atol=1e-5
        )
    expected = 0.0
    for t, s in zip(teacher, student, strict=True):
        for b in range(2):
            p, q = _naive_relation(t[b], 4).exp(), _naive_relation(s[b].detach(), 4).exp()
            for i in range(5):  # each query's KL, averaged over the heads
                expected += (
                    sum(
                        _direct(
                            p[h, i, : i + 1].tolist(), q[h, i, : i + 1].tolist(), "forward-kl", 0
                        )
                        for h in range(4)
                    )
                    / 4
                )
    loss = relation_loss(teacher, student, 4)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    assert relation_loss(teacher, teacher, 4).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(
        ValueError, match="relation_heads = 3 does not divide a projection of width 8"
    ):
        relations(student[0], 3)


def test_a_relation_run_adds_the_relation_loss_to_the_first_step(teacher, tmp_path) -> None:
    """Step 1's logged loss is the mean divergence plus the weighted relation loss per token,
    both computed here from the two models (the relation from hooks of our own)."""
    config = _student(teacher, alpha=1.0, relations=2.0, relation_heads=2, relation_layers=[0, -1])
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    train_distill(config, tmp_path / "run", data=data, progress=False, max_steps=1)
    torch.manual_seed(config.seed)
    from slmlab.models import DecoderLM

    student = DecoderLM(config.model_config(data.vocab_size, data.end_token_id()))
    teacher_model = checkpoint.load(teacher)
    ids = data.batch(0, config.batch_size, config.seed).ids[:, :-1]

    def qkv(model, layer):
        attention = model.model.layers[layer].self_attn
        outputs = []
        hooks = [getattr(attention, f"{n}_proj").register_forward_hook(
            lambda m, a, out: outputs.append(out)) for n in "qkv"]  # fmt: skip
        logits = model(ids)
        for hook in hooks:
            hook.remove()
        return logits, tuple(outputs)

    with torch.no_grad():
        s_logits, s_qkv = qkv(student, -1)
        t_logits, t_qkv = qkv(teacher_model, 0)
        expected = (
            divergence(s_logits, t_logits).mean()
            + 2.0 * relation_loss(t_qkv, s_qkv, 2) / ids.numel()
        )
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="relation layer 5 does not exist: the model has 2 blocks"):
        bad = _student(teacher, relations=1.0, relation_layers=[5, 0])
        train_distill(bad, tmp_path / "bad", data=data, progress=False, max_steps=1)


# --------------------------------------------------------------------------------------------
# Hidden states through a learnt projection


def test_the_feature_loss_is_its_formula_and_teaches_both_sides() -> None:
    """Σ over positions of ‖W h_s − h_t‖² / ‖h_t‖², against Python loops; zero where the
    projection maps the student onto the teacher; gradients reach the student and W."""
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64)
    projection = feature_projection(4, 6, seed=3).double()
    again = feature_projection(4, 6, seed=3)
    assert torch.equal(projection.weight.float(), again.weight)
    assert not torch.equal(again.weight, feature_projection(4, 6, seed=4).weight)
    w = projection.weight.tolist()
    expected = 0.0
    for b in range(2):
        for t in range(3):
            h_s, h_t = student[b, t].tolist(), teacher[b, t].tolist()
            mapped = [sum(w[i][j] * h_s[j] for j in range(4)) for i in range(6)]
            error = sum((mapped[i] - h_t[i]) ** 2 for i in range(6))
            expected += error / sum(x * x for x in h_t)
    loss = feature_loss(teacher, student, projection)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0 and projection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        mapped = projection(student)
    assert feature_loss(mapped, student, projection).item() == pytest.approx(0.0, abs=1e-9)


def _block_output(model, ids, layer):
    """The logits of `model` on `ids` and what block `layer` returned, by a hook of our own."""
    seen = []
    hook = model.model.layers[layer].register_forward_hook(lambda m, a, out: seen.append(out))
    logits = model(ids)
    hook.remove()
    return logits, seen[-1]


def test_a_feature_run_adds_the_hidden_state_loss_and_keeps_the_projection_apart(
    teacher, tmp_path
) -> None:
    """Step 1's logged loss is the mean divergence plus the weighted feature loss per token,
    computed here from hooks of our own and the projection the recipe draws; the projection is
    saved beside the student, not in it, and has learnt."""
    config = _student(teacher, alpha=1.0, features=0.5, feature_layers=[0, -1])
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    run = train_distill(config, tmp_path / "run", data=data, progress=False, max_steps=2)
    torch.manual_seed(config.seed)
    from slmlab.models import DecoderLM

    student = DecoderLM(config.model_config(data.vocab_size, data.end_token_id()))
    teacher_model = checkpoint.load(teacher)
    widths = STUDENT_MODEL["hidden_size"], teacher_model.config.hidden_size
    projection = feature_projection(*widths, seed=config.seed)
    ids = data.batch(0, config.batch_size, config.seed).ids[:, :-1]
    with torch.no_grad():
        s_logits, s_hidden = _block_output(student, ids, -1)
        t_logits, t_hidden = _block_output(teacher_model, ids, 0)
        expected = (
            divergence(s_logits, t_logits).mean()
            + 0.5 * feature_loss(t_hidden, s_hidden, projection) / ids.numel()
        )
    first = json.loads((run.out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    weights = load_file(run.checkpoint / "model.safetensors")
    assert not any(name.startswith("objective") for name in weights)
    learnt = load_file(run.checkpoint / "objective.safetensors")["weight"]
    assert learnt.shape == (widths[1], widths[0])
    assert not torch.equal(learnt, projection.weight)  # it trained with the student
    assert checkpoint.load(run.checkpoint).config.hidden_size == widths[0]
    with pytest.raises(ValueError, match=r"distill.feature_layers names block 4.*has 2 blocks"):
        bad = _student(teacher, features=1.0, feature_layers=[4, 0])
        train_distill(bad, tmp_path / "bad", data=data, progress=False, max_steps=1)


def test_a_feature_run_resumes_to_the_bit(teacher, tmp_path) -> None:
    """The projection and its optimizer state come back with the run: stopped and resumed
    equals never stopped, the student's weights and the projection's."""
    _resumes_to_the_bit(_student(teacher, features=1.0), tmp_path)
