"""The training loop: schedule, exact resume, accumulation, errors, and torchrun parity."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import slmlab
from slmlab.models import ConfigError
from slmlab.quant.qat import train_qat
from slmlab.train import TrainConfig, build_data, lr_at, train

TINY = TrainConfig(
    model=dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    data_size=600,
    vocab_size=300,
    seq_len=64,
    batch_size=8,
    steps=12,
    warmup_steps=3,
    lr=3e-3,
    min_lr=3e-4,
    eval_every=4,
    eval_batches=2,
)


@pytest.fixture(scope="module")
def data():
    return build_data(TINY)


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


def test_schedule_warms_up_then_decays_to_min() -> None:
    c = TINY.replace(steps=100, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(c.lr / 10)
    assert lr_at(9, c) == pytest.approx(c.lr)
    assert lr_at(55, c) == pytest.approx((c.lr + c.min_lr) / 2)
    assert lr_at(100, c) == pytest.approx(c.min_lr)
    lrs = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stopped_and_resumed_equals_uninterrupted_to_the_bit(tmp_path, data, optimizer) -> None:
    config = TINY.replace(optimizer=optimizer)
    straight = train(config, tmp_path / "straight", progress=False, data=data)
    train(config, tmp_path / "resumed", max_steps=5, progress=False, data=data)
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False, data=data)
    a, b = weights(straight.out), weights(resumed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in log(straight.out)] == [r["loss"] for r in log(resumed.out)]
    assert (resumed.out / "loss.png").is_file()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_checkpoint_is_a_model_and_learning_happened(tmp_path, data, optimizer) -> None:
    config = TINY.replace(steps=40, eval_every=40, optimizer=optimizer)
    result = train(config, tmp_path / "run", progress=False, data=data)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    model = slmlab.load(result.checkpoint)
    tok = slmlab.load_tokenizer(result.checkpoint)
    ids = tok.encode("Once upon a time").ids
    assert len(slmlab.generate(model, ids, 5, stop_tokens=())[0]) == len(ids) + 5


def test_accumulation_equals_the_full_batch(tmp_path, data) -> None:
    one = train(TINY.replace(steps=3), tmp_path / "one", progress=False, data=data)
    four = train(TINY.replace(steps=3, grad_accum=4), tmp_path / "four", progress=False, data=data)
    a, b = weights(one.out), weights(four.out)
    # Adam divides by the gradient's running magnitude, so where a gradient is nearly zero the
    # last bits of the two summation orders can move a weight by up to ~1% of one step (lr).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-2 * TINY.lr)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_lr_scale_scales_the_embeddings_steps_and_nothing_else(
    tmp_path, data, optimizer
) -> None:
    """AdamW's first step moves a weight by lr times the sign of its gradient (and its decay by
    lr times the weight): with the embedding's rate tripled, its move is three times as long,
    and every other weight, whose gradient is the same at step 0, moves exactly as before."""
    config = TINY.replace(steps=1, warmup_steps=0, optimizer=optimizer)
    before = weights(train(config, tmp_path / "start", max_steps=0, progress=False, data=data).out)
    runs = {
        scale: train(config.replace(embedding_lr_scale=scale), tmp_path / str(scale),
                     progress=False, data=data)
        for scale in (1.0, 3.0)
    }  # fmt: skip
    moved = {scale: {k: v - before[k] for k, v in weights(run.out).items()}
             for scale, run in runs.items()}  # fmt: skip
    name = "model.embed_tokens.weight"  # the head is tied to it
    assert moved[1.0][name].abs().max() > 0.5 * TINY.lr
    torch.testing.assert_close(moved[3.0][name], 3 * moved[1.0][name], rtol=1e-3, atol=1e-9)
    for k in before.keys() - {name}:
        torch.testing.assert_close(moved[3.0][k], moved[1.0][k], rtol=0, atol=0)


def test_one_step_accumulated_is_the_full_batch_gradient(data) -> None:
    """`train_step` with plain SGD (lr 1): the weights move by exactly the mean gradient, the
    same whether the rows come in one micro-batch or four."""
    from slmlab.models import DecoderLM
    from slmlab.train import train_step

    rows = data.batch(0, TINY.batch_size, TINY.seed)
    moved = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = DecoderLM(TINY.model_config(data.tokenizer.vocab_size, 0))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        loss, norm = train_step(model, sgd, rows, TINY.replace(grad_accum=accum, grad_clip=1e9))
        moved.append({k: before[k] - v for k, v in model.state_dict().items()})
        assert norm > 0 and loss > 0
    for k in moved[0]:
        torch.testing.assert_close(moved[0][k], moved[1][k], rtol=1e-5, atol=1e-7)


def test_a_superword_recipe_trains_a_superword_tokenizer(tmp_path) -> None:
    # At 1000 tokens word merges have run out on these stories (672); superwords keep going.
    words = build_data(TINY.replace(vocab_size=1000))
    superword = build_data(TINY.replace(vocab_size=1000, superwords=True))
    assert superword.tokenizer.superwords and not words.tokenizer.superwords
    assert words.tokenizer.vocab_size < 1000 == superword.tokenizer.vocab_size
    # The same documents, fewer tokens: each token carries more text.
    assert superword.val_chars_per_token > 2 * words.val_chars_per_token
    config = TINY.replace(vocab_size=1000, superwords=True, steps=3)
    run = train(config, tmp_path / "run", progress=False)
    story = superword.val_docs[0]
    assert slmlab.load_tokenizer(run.checkpoint).encode(story).ids == superword.tokenizer.encode(
        story
    )


def test_a_non_finite_loss_names_the_step(tmp_path, data) -> None:
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step \d+"):
        train(
            TINY.replace(lr=1e4, min_lr=1e4, warmup_steps=0, steps=30, grad_clip=1e9),
            tmp_path / "boom",
            progress=False,
            data=data,
        )


def test_init_from_starts_from_a_trained_model_and_checks_it_fits(tmp_path, data) -> None:
    train(TINY, tmp_path / "base", progress=False, data=data)
    base = weights(tmp_path / "base")
    # QAT as fine-tuning: the run's step 0 is the trained model, with fake-quantized linears.
    qat = {"bits": 4, "group_size": 32}
    tuned = TINY.replace(init_from=str(tmp_path / "base" / "last"), qat=qat)
    with pytest.raises(ValueError, match="trains through rounding"):
        train(tuned, tmp_path / "tuned", progress=False, data=data)
    train_qat(tuned, tmp_path / "tuned", max_steps=0, progress=False, data=data)
    start = weights(tmp_path / "tuned")
    assert start.keys() == base.keys()
    assert all(torch.equal(start[k], base[k]) for k in base)
    train_qat(tuned, tmp_path / "tuned", progress=False, data=data)
    assert not torch.equal(
        weights(tmp_path / "tuned")["model.norm.weight"], base["model.norm.weight"]
    )
    with pytest.raises(ValueError, match="tokenizer is not the one"):
        train_qat(tuned.replace(vocab_size=280), tmp_path / "other", progress=False)
    wider = tuned.replace(model={**TINY.model, "intermediate_size": 192})
    with pytest.raises(ValueError, match="weights do not fit"):
        train_qat(wider, tmp_path / "wider", progress=False, data=data)
    with pytest.raises(FileNotFoundError, match="'nowhere' is not a checkpoint directory"):
        train(TINY.replace(init_from="nowhere"), tmp_path / "x", data=data)


def test_resume_needs_a_checkpoint_and_the_same_recipe(tmp_path, data) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TINY, tmp_path / "none", resume=True, progress=False, data=data)
    train(TINY, tmp_path / "run", max_steps=2, progress=False, data=data)
    with pytest.raises(ValueError, match="different recipe"):
        train(TINY.replace(lr=1e-3), tmp_path / "run", resume=True, progress=False, data=data)


def test_a_kill_between_the_renames_and_a_torn_log_line_resume_exactly(tmp_path, data) -> None:
    """What a kill during a checkpoint save leaves: no ``last``, the old copy moved aside, the
    new one complete under its temporary name, a partial temporary, a torn metrics line."""
    straight = train(TINY, tmp_path / "straight", progress=False, data=data)
    ahead = train(TINY, tmp_path / "ahead", max_steps=8, progress=False, data=data).out
    run = train(TINY, tmp_path / "run", max_steps=4, progress=False, data=data).out
    (run / "last").rename(run / ".last.old")
    shutil.copytree(ahead / "last", run / ".last.k1ll3d")  # the new copy, not yet renamed
    (run / ".last.partial").mkdir()
    (run / ".last.partial" / "config.json").write_text("{")
    torn = (ahead / "metrics.jsonl").read_text() + '{"step": 9, "lo'
    (run / "metrics.jsonl").write_text(torn)
    resumed = train(TINY, run, resume=True, progress=False, data=data)
    a, b = weights(straight.out), weights(resumed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda r: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(straight.out) == log(resumed.out)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".last")) == []


def test_a_second_run_on_one_out_is_refused_naming_the_first(tmp_path, data) -> None:
    from slmlab.train.loop import _writing

    refused = pytest.raises(RuntimeError, match=rf"another training run \(pid {os.getpid()}\)")
    with _writing(tmp_path / "run"), refused:  # as a first run holds it while it trains
        train(TINY, tmp_path / "run", max_steps=1, progress=False, data=data)
    assert train(TINY, tmp_path / "run", max_steps=1, progress=False, data=data).step == 1


def test_max_steps_must_not_be_negative_or_behind_the_checkpoint(tmp_path, data) -> None:
    with pytest.raises(ValueError, match="max_steps must be 0 or more steps, got -1"):
        train(TINY, tmp_path / "negative", max_steps=-1, progress=False, data=data)
    run = train(TINY, tmp_path / "run", max_steps=6, progress=False, data=data).out
    before = (run / "last" / "trainer.json").read_text()
    with pytest.raises(ValueError, match=r"trainer\.json: the checkpoint is at step 6, past the 3"):
        train(TINY, run, resume=True, max_steps=3, progress=False, data=data)
    assert (run / "last" / "trainer.json").read_text() == before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"grad_accum": 3}, r"grad_accum \(3\) must divide batch_size \(8\)"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"optimizer": "sgd"}, r"optimizer must be one of \['adamw', 'muon'\], got 'sgd'"),
        ({"superwords": "yes"}, "superwords must be true or false, got 'yes'"),
        ({"activation_checkpointing": 1}, "activation_checkpointing must be true or false"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"grad_clip": -1.0}, "grad_clip must be a positive number, got -1.0"),
        ({"grad_clip": 0}, "grad_clip must be a positive number, got 0"),
        ({"grad_clip": float("nan")}, "grad_clip must be a positive number, got nan"),
        ({"grad_clip": "1.0"}, "grad_clip must be a positive number, got '1.0'"),
        ({"weight_decay": -0.1}, "weight_decay must be 0 or more, got -0.1"),
        ({"weight_decay": float("inf")}, "weight_decay must be 0 or more, got inf"),
        ({"embedding_lr_scale": 0}, "embedding_lr_scale must be a positive number, got 0"),
        (
            {
                "model": {
                    "hidden_size": 64,
                    "intermediate_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 3,
                }
            },
            r"num_attention_heads \(3\) must divide hidden_size \(64\)",
        ),
    ],
)
def test_bad_training_configs(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes)


def test_config_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("steps = 10\nlearning_rate = 0.1\n[model]\nhidden_size = 64\n")
    with pytest.raises(
        ConfigError, match=r"run\.toml: unknown training config field\(s\) \['learning_rate'\]"
    ):
        TrainConfig.from_file(path)


def test_toml_round_trip(tmp_path) -> None:
    from slmlab.zoo import RECIPES

    for config in [TINY, *(entry.config for entry in RECIPES.values())]:
        (tmp_path / "run.toml").write_text(config.to_toml())
        assert TrainConfig.from_file(tmp_path / "run.toml") == config


def _cli_train(tmp_path, config: TrainConfig, out: str, *args: str, processes: int = 1) -> None:
    """`slmlab train --config` on `config`, in one process or under torchrun with several."""
    (tmp_path / "run.toml").write_text(config.to_toml())
    assert TrainConfig.from_file(tmp_path / "run.toml") == config
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else []
    )
    command = ["-m", "slmlab", "train", "--config", str(tmp_path / "run.toml"), "--quiet"]
    result = subprocess.run(
        [sys.executable, *launcher, *command, "--out", str(tmp_path / out), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_weights(a, b) -> None:
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_processes_equal_one_process(tmp_path, optimizer) -> None:
    """DDP on 2 CPU processes (gloo) gives the model of 1 process with the same global batch."""
    config = TINY.replace(steps=4, eval_every=0, optimizer=optimizer)
    _cli_train(tmp_path, config, "one")
    _cli_train(tmp_path, config, "two", processes=2)
    state = json.loads((tmp_path / "two" / "last" / "trainer.json").read_text())
    assert (state["world_size"], state["parallel"]) == (2, "ddp")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_sharded_stopped_and_resumed_equals_one_process(tmp_path, optimizer) -> None:
    """FSDP on 2 processes, with gradient accumulation, stopped after 2 steps and resumed
    (weights and optimizer state gathered to whole tensors, then sharded again) ends with the
    model of one process trained straight through. Muon orthogonalises each whole matrix,
    which FSDP holds in halves: the halves are gathered for it."""
    config = TINY.replace(steps=4, eval_every=2, grad_accum=2, optimizer=optimizer)
    _cli_train(tmp_path, config, "one")
    _cli_train(tmp_path, config, "two", "--parallel", "fsdp", "--max-steps", "2", processes=2)
    halfway = load_file(tmp_path / "two" / "last" / "optimizer.safetensors")
    assert halfway["model.embed_tokens.weight::exp_avg"].shape == (300, 64)  # whole, not shards
    if optimizer == "muon":
        assert halfway["model.layers.0.mlp.down_proj.weight::momentum_buffer"].shape == (64, 160)
    _cli_train(tmp_path, config, "two", "--parallel", "fsdp", "--resume", processes=2)
    state = json.loads((tmp_path / "two" / "last" / "trainer.json").read_text())
    assert (state["step"], state["world_size"], state["parallel"]) == (4, 2, "fsdp")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_training_on_an_absent_gpu_says_so(tmp_path, data, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA device is available.*--device cpu"):
        train(TINY, tmp_path / "run", progress=False, data=data, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_cpu_and_resumes(tmp_path, data, monkeypatch) -> None:
    """The same recipe on the GPU (fp32, TF32 off) follows the CPU run's losses, and a run
    stopped and resumed on the GPU ends where a straight one does."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # for this test only
    config = TINY.replace(steps=6, eval_every=6)
    cpu = train(config, tmp_path / "cpu", progress=False, data=data)
    gpu = train(config, tmp_path / "gpu", progress=False, data=data, device="cuda")
    train(config, tmp_path / "resumed", max_steps=3, progress=False, data=data, device="cuda")
    resumed = train(
        config, tmp_path / "resumed", resume=True, progress=False, data=data, device="cuda"
    )

    def losses(run) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(gpu.out) == pytest.approx(losses(cpu.out), rel=1e-4)
    a, b, c = weights(cpu.out), weights(gpu.out), weights(resumed.out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6)


def test_configs_written_with_extra_still_load(tmp_path) -> None:
    old = {**TINY.to_dict(), "extra": {"init_from": "base", "qat": {"bits": 4}}}
    del old["init_from"], old["qat"]
    assert TrainConfig.from_dict(old) == TINY.replace(init_from="base", qat={"bits": 4})
    gone = {**old, "extra": {"quick_steps": 40}}
    with pytest.raises(ConfigError, match=r"extra\.quick_steps no longer exists.*zoo"):
        TrainConfig.from_dict(gone)


def test_fingerprint_covers_every_field_and_ignores_defaults() -> None:
    changed = {
        "data_size": 601,
        "vocab_size": 301,
        "superwords": True,
        "seq_len": 32,
        "batch_size": 4,
        "grad_accum": 2,
        "steps": 13,
        "optimizer": "muon",
        "lr": 2e-3,
        "min_lr": 2e-4,
        "warmup_steps": 2,
        "weight_decay": 0.0,
        "embedding_lr_scale": 10.0,
        "betas": (0.9, 0.99),
        "grad_clip": 0.5,
        "eval_every": 3,
        "eval_batches": 1,
        "checkpoint_every": 5,
        "seed": 1,
        "precision": "auto",
        "activation_checkpointing": True,
        "head_chunk": 16,
        "init_from": "x",
        "qat": {"bits": 4},
        "objective": "sft",
        "lora": {"r": 4},
        "beta": 0.3,
        "simpo_gamma": 1.0,
        "quantize_base": {"fmt": "nf4"},
        "distill": {"teacher": "t"},
        "model": {**TINY.model, "hidden_size": 128},
    }
    lora = {"init_from": "x", "optimizer": "adamw"}
    needs = {"objective": {"init_from": "x"}, "lora": lora,
             "quantize_base": {**lora, "lora": {"r": 4}},
             "head_chunk": {"objective": "sft", "init_from": "x"}}  # fmt: skip
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data"}
    assert set(changed) == fields
    prints = {TINY.replace(**needs.get(k, {}), **{k: v}).fingerprint() for k, v in changed.items()}
    assert len(prints) == len(changed) and TINY.fingerprint() not in prints
    assert TINY.replace(qat=None).fingerprint() == TINY.fingerprint()


KILLABLE = """
import os, pathlib, signal, sys
from slmlab.train import TrainConfig, train

config, out, kill_at = TrainConfig.from_file(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
rename, replace, calls = pathlib.Path.rename, os.replace, [0]

def killed_on_a_rename(self, target):  # checkpoint saves rename twice: aside, then into place
    calls[0] += 1
    if str(calls[0]) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)

def killed_on_the_log(source, target):  # a resumed run's log: rewritten aside, then into place
    if kill_at == "log" and pathlib.Path(target).name == "metrics.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target)

pathlib.Path.rename, os.replace = killed_on_a_rename, killed_on_the_log
resume = (out / "last").exists() or any(out.glob(".last.*"))
train(config, out, resume=resume, progress=False)
"""


def test_sigkilled_runs_resume_to_the_uninterrupted_weights(tmp_path, data) -> None:
    """Real kills (SIGKILL, no clean-up runs): inside a first save, between the two renames of a
    later one, as a resumed run rewrites its log, and at a moment drawn from a seeded clock;
    each time the run is started again with --resume, and the end is the uninterrupted run's
    weights and log, bit for bit."""
    import random

    straight = train(TINY, tmp_path / "straight", progress=False, data=data).out
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY.to_toml())
    run = tmp_path / "run"

    def start(kill_at: int | str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", KILLABLE, str(recipe), str(run), str(kill_at)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    for kill_at in (1, 2):  # the first save's rename; the second save's, between its two
        done = start(kill_at)
        assert done.wait(timeout=300) == -9, done.stderr.read()[-2000:]
    logged = (run / "metrics.jsonl").read_text()
    done = start("log")  # the new log written aside, not yet renamed: the old one must stand
    assert done.wait(timeout=300) == -9, done.stderr.read()[-2000:]
    assert (run / "metrics.jsonl").read_text() == logged != ""
    late = start(0)
    time = random.Random(0).uniform(0.5, 3.0)
    try:
        late.wait(timeout=time)
    except subprocess.TimeoutExpired:
        late.kill()
        late.wait()
    final = start(0)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    a, b = weights(straight), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda r: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(straight) == log(run)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".lock"]


def _saved_bytes(model, ids, **options) -> tuple[int, dict[str, torch.Tensor]]:
    """The bytes autograd keeps for the backward pass of one forward (without the output
    head, whose saved logits checkpointing does not touch), and the parameters' gradients."""
    kept = 0

    def keep(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        hidden = model(ids, head=False, **options)
    hidden.float().square().mean().backward()
    return kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _qlora_(model):
    """`model` with rank-4 LoRA over NF4 linear layers, B nonzero so that both factors learn."""
    from slmlab.layers.lora import LoraConfig, apply_lora_
    from slmlab.quant import QuantConfig, quantize_

    apply_lora_(model, LoraConfig(r=4, alpha=8))
    skip = ("lm_head", "lora_A", "lora_B")
    quantize_(model, QuantConfig(fmt="nf4", bits=4, group_size=32, skip=skip))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.mark.parametrize(
    ("layer_types", "qlora"),
    [(None, False), (["linear_attention", "full_attention"], False), (None, True)],
)
def test_activation_checkpointing_keeps_block_inputs_alone_and_the_same_gradients(
    layer_types, qlora
) -> None:
    """A checkpointed forward keeps a small share of what a plain one keeps for the backward
    pass, and the gradients are the same to the bit (attention and Mamba-2 blocks, plain and
    packed rows, LoRA over an NF4 base)."""
    from slmlab.models import DecoderLM

    extra = {} if layer_types is None else {
        "model_type": "bamba", "layer_types": layer_types, "mamba_n_heads": 4,
        "mamba_expand": 1, "mamba_d_state": 16, "mamba_chunk_size": 16,
    }  # fmt: skip
    config = TINY.replace(model={**TINY.model, **extra})
    torch.manual_seed(0)
    model = DecoderLM(config.model_config(300, 0)).train()
    if qlora:
        _qlora_(model)
    ids = torch.randint(0, 300, (4, 64))
    segments = torch.arange(64).div(20, rounding_mode="floor").expand(4, 64)
    for options in ({}, {"segments": segments}):
        plain, expected = _saved_bytes(model, ids, **options)
        model.activation_checkpointing = True
        kept, grads = _saved_bytes(model, ids, **options)
        model.activation_checkpointing = False
        assert kept < plain / 4, (kept, plain)
        assert grads.keys() == expected.keys()
        for name in grads:
            assert torch.equal(grads[name], expected[name]), name


def test_a_bf16_residual_halves_what_checkpointing_keeps_and_lora_learns_in_fp32() -> None:
    """QLoRA's compute type: under bf16 autocast with the hidden state between blocks in bf16,
    the checkpointed blocks' inputs take half the bytes of an fp32 stream's; the gradients are
    the same with and without checkpointing, to the bit; the LoRA factors' gradients stay
    fp32 and near the fp32 run's (an NF4 base under them, as QLoRA trains)."""
    from slmlab.models import DecoderLM

    torch.manual_seed(0)
    model = _qlora_(DecoderLM(TINY.model_config(300, 0)).train())
    ids = torch.randint(0, 300, (4, 64))
    _, fp32 = _saved_bytes(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.activation_checkpointing = True
        stream_fp32, _ = _saved_bytes(model, ids)
        model.residual_dtype = torch.bfloat16
        stream_bf16, checkpointed = _saved_bytes(model, ids)
        model.activation_checkpointing = False
        _, plain = _saved_bytes(model, ids)
    # the blocks' inputs (B x T x hidden each), and the few small tensors beside them
    inputs = TINY.model["num_hidden_layers"] * ids.numel() * TINY.model["hidden_size"]
    assert stream_fp32 - stream_bf16 == pytest.approx(2 * inputs, rel=0.05)
    assert checkpointed.keys() == plain.keys() == fp32.keys()
    for name, grad in checkpointed.items():
        assert torch.equal(grad, plain[name]), name
        assert grad.dtype == torch.float32, name
        # rounding the stream costs accuracy: ~5% relative here (mixed precision's ~1%)
        error = (grad - fp32[name]).norm() / fp32[name].norm()
        assert error < 0.15, (name, error)


def test_a_checkpointed_run_trains_the_same_weights(tmp_path, data) -> None:
    config = TINY.replace(steps=4, eval_every=4)
    plain = train(config, tmp_path / "plain", progress=False, data=data)
    checkpointed = config.replace(activation_checkpointing=True)
    run = train(checkpointed, tmp_path / "checkpointed", progress=False, data=data)
    a, b = weights(plain.out), weights(run.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
