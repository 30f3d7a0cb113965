"""slmlab.lowrank: each factorisation against its closed form (Eckart–Young for SVD, the
dropped singular values of the whitened weight for SVD-LLM), full rank reproducing the layer,
rank choice, checkpoints, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import slmlab
from slmlab.layers.lowrank import LowRankLinear
from slmlab.lowrank import LowRankConfig, factorize, low_rank_, rank_for
from slmlab.quant.gptq import layer_error
from tests.test_prune import _layer, small_model


@pytest.mark.parametrize("rank", [1, 8, 20])
def test_svd_is_the_best_rank_r_weight(rank) -> None:
    W, _, _ = _layer(rows=24, cols=48)
    B, A = factorize(W, LowRankConfig("svd", rank=rank))
    sigma = torch.linalg.svdvals(W)
    assert (B.shape, A.shape) == ((24, rank), (rank, 48))
    # Eckart–Young: the Frobenius error is the energy of the dropped singular values.
    assert float((W - B @ A).pow(2).sum()) == pytest.approx(
        float(sigma[rank:].pow(2).sum()), rel=1e-9
    )


@pytest.mark.parametrize("rank", [4, 12])
def test_svd_llm_reaches_the_smallest_output_error_of_its_rank(rank) -> None:
    W, X, _ = _layer(rows=24, cols=48)
    H = 2 * X.T @ X / X.shape[0]
    config = LowRankConfig("svd-llm", rank=rank, damp=0.0)
    B, A = factorize(W, config, H)
    S = torch.linalg.cholesky(X.T @ X / X.shape[0])
    dropped = torch.linalg.svdvals(W @ S)[rank:].pow(2).sum()
    errors = {
        "svd-llm": layer_error(W, B @ A, H),
        "asvd": layer_error(W, torch.matmul(*factorize(W, LowRankConfig("asvd", rank=rank), H)), H),
        "svd": layer_error(W, torch.matmul(*factorize(W, LowRankConfig("svd", rank=rank))), H),
    }
    assert errors["svd-llm"] == pytest.approx(2 * float(dropped), rel=1e-8)
    assert errors["svd-llm"] <= errors["asvd"] <= errors["svd"], errors  # loud channels first


def test_asvd_is_the_svd_of_the_scaled_weight() -> None:
    W, X, _ = _layer(rows=24, cols=48)
    H = 2 * X.T @ X / X.shape[0]
    s = X.pow(2).mean(0).sqrt() ** 0.5
    U, sigma, Vh = torch.linalg.svd(W * s, full_matrices=False)
    expected = (U[:, :6] * sigma[:6]) @ Vh[:6] / s
    B, A = factorize(W, LowRankConfig("asvd", rank=6), H)
    torch.testing.assert_close(B @ A, expected)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_full_rank_reproduces_the_model(method) -> None:
    model = small_model()
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
    low_rank_(model, LowRankConfig(method, energy=1.0), calibration=ids)
    assert all(
        isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith("_proj")
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-4)


def test_rank_choice_by_energy_and_by_parameters() -> None:
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for(sigma, (8, 4), LowRankConfig("svd", energy=16 / 22)) == 1
    assert rank_for(sigma, (8, 4), LowRankConfig("svd", energy=0.9)) == 2  # 20/22 = 0.909
    assert rank_for(sigma, (8, 4), LowRankConfig("svd", energy=0.95)) == 3
    # 60% of a 96 x 64 layer's 6144 parameters: r (96 + 64) <= 3686.4, so r = 23
    assert rank_for(torch.ones(64), (96, 64), LowRankConfig("svd", ratio=0.6)) == 23
    model = low_rank_(small_model(), LowRankConfig("svd", ratio=0.6))
    for name, layer in model.named_modules():
        if isinstance(layer, LowRankLinear):
            out, inp = layer.out_features, layer.in_features
            assert layer.rank * (out + inp) <= 0.6 * out * inp < (layer.rank + 1) * (out + inp), (
                name
            )


def test_factored_checkpoint_saves_and_loads(tmp_path) -> None:
    model = small_model()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    low_rank_(model, LowRankConfig("svd-llm", ratio=0.5), calibration=ids)
    path = slmlab.save(model, tmp_path / "lr")
    loaded = slmlab.load(path)
    assert [m.rank for m in loaded.modules() if isinstance(m, LowRankLinear)] == [
        m.rank for m in model.modules() if isinstance(m, LowRankLinear)
    ]
    assert loaded.num_parameters() == model.num_parameters() < small_model().num_parameters()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        out = slmlab.generate(
            loaded, ids[:1, :4], max_new_tokens=4, temperature=0.0, stop_tokens=()
        )
    assert out.shape == (1, 8)


def test_a_damaged_low_rank_section_is_one_line(tmp_path) -> None:
    import json

    path = slmlab.save(low_rank_(small_model(), LowRankConfig("svd", rank=4)), tmp_path / "lr")
    config = json.loads((path / "config.json").read_text())
    config["low_rank_config"]["layers"]["model.layers.0.mlp.up_proj"] = 999
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(slmlab.checkpoint.CheckpointError, match="malformed low_rank_config"):
        slmlab.load(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LowRankConfig("svd"), "exactly one of"),
        (lambda: LowRankConfig("svd", rank=4, ratio=0.5), "exactly one of"),
        (lambda: LowRankConfig("svd", rank=0), "positive integer"),
        (lambda: LowRankConfig("svd", energy=1.5), "energy must be"),
        (lambda: LowRankConfig("svd", ratio=0.0), "ratio must be"),
        (lambda: LowRankConfig("pca", rank=4), "unknown method"),
        (lambda: low_rank_(small_model(), LowRankConfig("svd", rank=65)), "above model.layers.0"),
        (lambda: low_rank_(small_model(), LowRankConfig("asvd", rank=4)), "needs calibration"),
        (
            lambda: low_rank_(
                small_model(),
                LowRankConfig("svd-llm", rank=4),
                calibration=torch.zeros(1, 50, dtype=torch.long),
            ),
            "50 tokens, fewer than the 128 inputs",
        ),
        (
            lambda: low_rank_(small_model(), LowRankConfig("svd", rank=4, targets=("fc1",))),
            "no linear layer",
        ),
    ],
)
def test_bad_input_names_the_parameter(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_untouched_model_is_left_whole_after_a_refused_rank() -> None:
    model = small_model()
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError):
        low_rank_(model, LowRankConfig("svd", rank=100))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_cli_lowrank_writes_the_checkpoint_and_the_ranks(
    story_model, story_tokenizer, tmp_path
) -> None:
    import json

    from slmlab.cli import main
    from slmlab.quant import calibration_tokens

    slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    args = ["lowrank", str(tmp_path / "dense"), "--method", "svd-llm", "--ratio", "0.5"]
    args += ["--calibration-rows", "4", "--seq-len", "64", "--out", str(tmp_path / "lr")]
    assert main([*args, "--json", str(tmp_path / "lr.json"), "--quiet"]) == 0
    calibration = calibration_tokens(story_tokenizer, rows=4, seq_len=64)
    expected = low_rank_(
        copy.deepcopy(story_model), LowRankConfig("svd-llm", ratio=0.5), calibration=calibration
    )
    loaded = slmlab.load(tmp_path / "lr")
    with torch.no_grad():
        assert torch.equal(loaded(calibration), expected(calibration))
    record = json.loads((tmp_path / "lr.json").read_text())
    assert record["ranks"]["model.layers.0.mlp.up_proj"] == 48 * 96 // (2 * (48 + 96))
    assert record["parameters_after"] == loaded.num_parameters() < record["parameters_before"]
    with pytest.raises(SystemExit):
        main(["lowrank", str(tmp_path / "dense"), "--rank", "0", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
