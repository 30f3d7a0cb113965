"""Distillation: every loss against a direct formula and TRL, the chunked loss's gradients
against autograd on the whole batch, and runs that resume exactly and learn from the teacher."""

from __future__ import annotations

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
    DistillConfig,
    distillation_loss,
    divergence,
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


def test_a_distillation_run_resumes_to_the_bit_and_moves_toward_the_teacher(
    teacher, tmp_path
) -> None:
    config = _student(teacher, loss="reverse-kl", temperature=2.0)
    data = build_data(config, tokenizer=checkpoint.load_tokenizer(teacher))
    straight = train_distill(config, tmp_path / "straight", data=data, progress=False)
    train_distill(config, tmp_path / "stopped", data=data, progress=False, max_steps=4)
    resumed = train_distill(config, tmp_path / "stopped", data=data, progress=False, resume=True)
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
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
    bad = subprocess.run([*command, "--temperature", "-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "distill.temperature must be above 0" in bad.stderr.strip().splitlines()[-1]
