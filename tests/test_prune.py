"""slmlab.prune: masks and SparseGPT against direct implementations, the methods' reconstruction
errors in their expected order, structured cuts against the masked model and transformers, and
bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import slmlab
from slmlab.infer import generate
from slmlab.models import DecoderLM, ModelConfig
from slmlab.prune import (
    PruneConfig,
    StructureConfig,
    drop_layers_,
    head_group_importance,
    layer_importance,
    mlp_channel_importance,
    nm_mask,
    prune_,
    prune_heads_,
    prune_mlp_,
    prune_structure_,
    sparsegpt_prune,
    sparsity,
    top_mask,
    wanda_scores,
)
from slmlab.quant.calibrate import block_inputs, blocks
from slmlab.quant.gptq import layer_error


def _layer(rows: int = 16, cols: int = 64, tokens: int = 400, seed: int = 0):
    """A weight, calibration inputs with a few loud channels, and their Hessian 2 XᵀX."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (mixing + torch.eye(cols))
    X[:, :3] *= 10  # outlier features, as real activations have
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    return W, X, 2 * X.T @ X


def _direct_obs(W, H, keep, damp=0.01):
    """Optimal Brain Surgeon with the mask given: each row visits its columns left to right,
    H⁻¹ of the columns not yet visited inverted afresh at every step; a removed weight moves
    the unvisited ones by −w_q / [H⁻¹]_qq · H⁻¹[q, :]."""
    W, H = W.clone(), H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    for column in range(W.shape[1]):
        H_inv = torch.linalg.inv(H[column:, column:])
        error = torch.where(keep[:, column], 0.0, W[:, column])
        W[:, column:] -= error[:, None] / H_inv[0, 0] * H_inv[0][None, :]
    return W


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_equals_the_direct_obs_rule(pattern) -> None:
    W, _, H = _layer()
    pruned, keep = sparsegpt_prune(W, H, 0.5, pattern=pattern, block_size=16)  # 4 lazy blocks
    torch.testing.assert_close(pruned, _direct_obs(W, H, keep), rtol=0, atol=1e-12)
    assert torch.equal(pruned != 0, keep)
    blocks_kept = keep.view(16, 4, 16).sum((0, 2))  # each block of columns loses half
    assert blocks_kept.tolist() == [16 * 8] * 4
    if pattern is not None:
        assert (keep.view(16, 16, 4).sum(-1) == 2).all()


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude() -> None:
    for seed in range(3):
        W, X, H = _layer(seed=seed)
        norms = X.norm(dim=0)
        for pattern in (None, (2, 4)):
            if pattern is None:
                magnitude = W * top_mask(W.abs(), 0.5, per="layer")
                wanda = W * top_mask(wanda_scores(W, norms), 0.5, per="row")
            else:
                magnitude = W * nm_mask(W.abs(), *pattern)
                wanda = W * nm_mask(wanda_scores(W, norms), *pattern)
            sparse, _ = sparsegpt_prune(W, H, 0.5, pattern=pattern)
            errors = [layer_error(W, approx, H) for approx in (sparse, wanda, magnitude)]
            assert errors == sorted(errors), (seed, pattern, errors)


def test_wanda_scores_are_weight_times_input_norm() -> None:
    W, X, _ = _layer()
    direct = torch.stack(
        [
            torch.stack([W[i, j].abs() * X[:, j].pow(2).sum().sqrt() for j in range(64)])
            for i in range(16)
        ]
    )
    torch.testing.assert_close(wanda_scores(W, X.norm(dim=0)), direct.float())


def test_masks_remove_exact_counts() -> None:
    scores = torch.rand(8, 24, generator=torch.Generator().manual_seed(2))
    row = top_mask(scores, 0.25, per="row")
    assert (row.sum(1) == 18).all()
    assert (scores[~row].view(8, 6).max(1).values <= scores.where(row, 2).min(1).values).all()
    layer = top_mask(scores, 0.5, per="layer")
    assert int(layer.sum()) == 96 and scores[~layer].max() <= scores[layer].min()
    nm = nm_mask(scores, 2, 4)
    groups, kept = scores.view(8, 6, 4), nm.view(8, 6, 4)
    assert (kept.sum(-1) == 2).all()
    assert (groups.where(~kept, -1).max(-1).values <= groups.where(kept, 2).min(-1).values).all()


def small_model(layers: int = 3, kv_heads: int = 2, bias: bool = False) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        attention_bias=bias,
        model_type="qwen2" if bias else "llama",
    )
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[5] = 20.0  # a loud channel, as trained models have
            if bias:
                for p in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "config",
    [
        PruneConfig("magnitude", 0.5),
        PruneConfig("magnitude", 0.3, scope="global"),
        PruneConfig("wanda", 0.5),
        PruneConfig("wanda", pattern="2:4"),
        PruneConfig("sparsegpt", 0.6),
        PruneConfig("sparsegpt", pattern="4:8"),
    ],
    ids=lambda c: f"{c.method}-{c.pattern or c.sparsity}-{c.scope}",
)
def test_prune_reaches_the_sparsity_asked(config, calibration) -> None:
    model = small_model()
    prune_(model, config, calibration=calibration)
    shares = sparsity(model)
    assert shares["total"] == pytest.approx(config.sparsity, abs=1e-3)
    if config.scope != "global":
        assert all(s == pytest.approx(config.sparsity, abs=1e-3) for s in shares.values())
    if config.nm is not None:
        n, m = config.nm
        for block in model.model.layers:
            w = block.mlp.down_proj.weight
            assert ((w != 0).view(w.shape[0], -1, m).sum(-1) <= n).all()
    assert (model.lm_head.weight != 0).all()  # skipped by default


def test_prune_wanda_and_sparsegpt_see_the_first_blocks_inputs(calibration) -> None:
    model = small_model()
    first = blocks(model)[0]
    (x,) = block_inputs(model, calibration, first, [first.mlp.up_proj])
    x = x.double()
    W = first.mlp.up_proj.weight.detach().clone()
    wanda = copy.deepcopy(model)
    prune_(wanda, PruneConfig("wanda", 0.5), calibration=calibration)
    expected = W * top_mask(wanda_scores(W, x.norm(dim=0)), 0.5, per="row")
    assert torch.equal(wanda.model.layers[0].mlp.up_proj.weight, expected)
    sparse = copy.deepcopy(model)
    prune_(sparse, PruneConfig("sparsegpt", 0.5), calibration=calibration)
    expected, _ = sparsegpt_prune(W, 2 * x.T @ x / x.shape[0], 0.5)
    torch.testing.assert_close(sparse.model.layers[0].mlp.up_proj.weight, expected)


def test_pruned_checkpoint_saves_and_loads(calibration, tmp_path) -> None:
    model = prune_(small_model(), PruneConfig("wanda", pattern="2:4"), calibration=calibration)
    loaded = slmlab.load(slmlab.save(model, tmp_path / "pruned"))
    assert sparsity(loaded)["total"] == pytest.approx(0.5)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def _logits(model: DecoderLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_keeping_everything_changes_no_logit(importance, calibration) -> None:
    model = small_model()
    before = _logits(model, calibration)
    prune_mlp_(model, 1.0, mlp_channel_importance(model, calibration, importance=importance))
    prune_heads_(model, 1.0, head_group_importance(model, calibration, importance=importance))
    torch.testing.assert_close(_logits(model, calibration), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_structured_pruning_equals_the_masked_model(bias, calibration) -> None:
    model = small_model(bias=bias)
    mlp_scores = mlp_channel_importance(model, calibration)
    head_scores = head_group_importance(model, calibration)
    masked = copy.deepcopy(model)
    with torch.no_grad():  # zero what the cut removes: the cut model must compute the same
        for block, m, h in zip(masked.model.layers, mlp_scores, head_scores, strict=True):
            drop = torch.argsort(m)[: 128 - 80]
            block.mlp.down_proj.weight[:, drop] = 0
            group = int(torch.argmin(h))
            block.self_attn.o_proj.weight[:, group * 32 : (group + 1) * 32] = 0
    prune_mlp_(model, 80, mlp_scores)
    prune_heads_(model, 1, head_scores)
    assert model.config.intermediate_size == 80
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(
        _logits(model, calibration), _logits(masked, calibration), rtol=0, atol=1e-5
    )


def test_structurally_pruned_checkpoint_is_a_transformers_model(calibration, tmp_path) -> None:
    model = small_model(layers=4)
    prune_mlp_(model, 0.5, mlp_channel_importance(model, calibration))
    prune_heads_(model, 1, head_group_importance(model, calibration))
    drop_layers_(model, [int(torch.argmin(layer_importance(model, calibration)))])
    path = slmlab.save(model, tmp_path / "cut")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert (
        theirs.num_parameters() == model.num_parameters() < small_model(layers=4).num_parameters()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(calibration).logits, model(calibration), rtol=0, atol=1e-4
        )
    # The cache follows the renumbered blocks: decoding equals the model's own full forward.
    prompt = calibration[:1, :8]
    out = generate(model, prompt, 6, stop_tokens=())
    with torch.no_grad():
        for step in range(6):
            expected = model(out[:, : 8 + step])[0, -1].argmax()
            assert int(out[0, 8 + step]) == int(expected)


def _residuals(model: DecoderLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state entering each block, and the last block's output, computed directly."""
    T = ids.shape[1]
    cos, sin = model.model.rotary_emb(torch.arange(T).expand(ids.shape[0], T), torch.float32)
    x = model.model.embed_tokens(ids)
    states = [x]
    for block in model.model.layers:
        x = block(x, cos, sin, None)
        states.append(x)
    return [s.reshape(-1, s.shape[-1]).double() for s in states]


def test_layer_importance_against_the_hidden_states(calibration) -> None:
    model = small_model(layers=4)
    with torch.no_grad():  # block 2 adds nothing: it must score 0 and be the one to drop
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
        states = _residuals(model, calibration)
    cos = [
        torch.nn.functional.cosine_similarity(states[i], states[i + 2], dim=-1) for i in range(3)
    ]
    influence = layer_importance(model, calibration)
    angular = layer_importance(model, calibration, metric="angular", span=2)
    assert influence.shape == (4,) and int(torch.argmin(influence)) == 2
    assert float(influence[2]) == pytest.approx(0, abs=1e-6)
    expected = torch.stack([(c.clamp(-1, 1).arccos() / torch.pi).mean() for c in cos]).float()
    torch.testing.assert_close(angular, expected)
    before = _logits(model, calibration)
    drop_layers_(model, [2])
    assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(model, calibration), before, rtol=0, atol=1e-5)


def test_taylor_importance_sums_each_weights_first_order_change(calibration) -> None:
    model = small_model()
    mlp_scores = mlp_channel_importance(model, calibration, importance="taylor")
    head_scores = head_group_importance(model, calibration, importance="taylor")
    # Independently: the gradient of the mean loss over all rows at once, then per weight.
    logits = model(calibration[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), calibration[:, 1:].flatten())
    block = model.model.layers[1]
    mlp, attn = block.mlp, block.self_attn
    named = [mlp.gate_proj, mlp.up_proj, mlp.down_proj, attn.q_proj, attn.k_proj, attn.v_proj]
    grads = dict(
        zip(
            [*named, attn.o_proj],
            torch.autograd.grad(loss, [m.weight for m in [*named, attn.o_proj]]),
            strict=True,
        )
    )

    def change(layer, rows=None, cols=None):
        w = layer.weight.detach()
        product = (w * grads[layer]).abs()
        return float(product[rows].sum() if rows is not None else product[:, cols].sum())

    channel = 7
    expected = sum(change(m, rows=channel) for m in (mlp.gate_proj, mlp.up_proj)) + change(
        mlp.down_proj, cols=channel
    )
    assert float(mlp_scores[1][channel]) == pytest.approx(expected, rel=1e-4)
    group = 1  # query heads 2 and 3 read key/value head 1; head_dim 16
    q, kv = slice(32, 64), slice(16, 32)
    expected = (
        change(attn.q_proj, rows=q) + change(attn.k_proj, rows=kv) + change(attn.v_proj, rows=kv)
    )
    expected += change(attn.o_proj, cols=q)
    assert float(head_scores[1][group]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PruneConfig("magnitude", 1.0), "sparsity must be"),
        (lambda: PruneConfig("magnitude", -0.1), "sparsity must be"),
        (lambda: PruneConfig("wanda", pattern="4:2"), "must keep 0 < N < M"),
        (lambda: PruneConfig("wanda", pattern="two:four"), "is not N:M"),
        (lambda: PruneConfig("wanda", 0.3, pattern="2:4"), "give one of the two"),
        (lambda: PruneConfig("wanda", scope="global"), "method='magnitude'"),
        (lambda: PruneConfig("sparsegpt", scope="row"), "per block of columns"),
        (lambda: PruneConfig("lottery"), "unknown method"),
    ],
)
def test_bad_configs_name_the_parameter(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_calls_name_the_parameter(calibration) -> None:
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_(small_model(), PruneConfig("wanda"))
    with pytest.raises(
        ValueError, match=r"fewer than the 128 inputs of model\.layers\.0\.mlp\.down_proj"
    ):
        prune_(small_model(), PruneConfig("sparsegpt"), calibration=calibration[:1, :100])
    with pytest.raises(ValueError, match="not a multiple of 3"):
        prune_(small_model(), PruneConfig("magnitude", pattern="1:3"))
    with pytest.raises(ValueError, match="no linear layer"):
        prune_(small_model(), PruneConfig("magnitude", skip=("proj", "lm_head")))
    model = small_model()
    heads = head_group_importance(model, calibration)
    with pytest.raises(ValueError, match="key/value groups"):
        prune_heads_(model, 0, heads)
    with pytest.raises(ValueError, match="MLP channels from 1 to 128"):
        prune_mlp_(model, 129, mlp_channel_importance(model, calibration))
    with pytest.raises(ValueError, match="one tensor of 128"):
        prune_mlp_(model, 64, heads)
    with pytest.raises(ValueError, match="block numbers from 0 to 2"):
        drop_layers_(model, [3])
    with pytest.raises(ValueError, match="keeps at least one"):
        drop_layers_(model, [0, 1, 2])
    with pytest.raises(ValueError, match="span must be"):
        layer_importance(model, calibration, span=3)


def test_prune_structure_cuts_blocks_then_channels_and_groups(calibration) -> None:
    model = small_model(layers=4)
    with torch.no_grad():  # block 1 adds nothing: the block ShortGPT's influence removes
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    reference = copy.deepcopy(model)
    drop_layers_(reference, [1])
    mlp = mlp_channel_importance(reference, calibration)
    prune_mlp_(reference, 64, mlp)
    heads = head_group_importance(reference, calibration)
    prune_heads_(reference, 1, heads)
    cut = prune_structure_(
        model, StructureConfig(mlp=0.5, kv_groups=1, layers=1), calibration=calibration
    )
    assert cut["removed_layers"] == [1]
    assert cut["mlp_channels"] == [
        torch.sort(torch.argsort(s, descending=True)[:64]).values.tolist() for s in mlp
    ]
    assert len(cut["kv_groups"]) == 3 and all(len(g) == 1 for g in cut["kv_groups"])
    torch.testing.assert_close(
        _logits(model, calibration), _logits(reference, calibration), rtol=0, atol=0
    )
    angular = copy.deepcopy(small_model(layers=4))
    kept = prune_structure_(
        angular, StructureConfig(layers=2, layer_metric="angular"), calibration=calibration
    )
    start = int(
        torch.argmin(layer_importance(small_model(layers=4), calibration, metric="angular", span=2))
    )
    assert kept["removed_layers"] == [start, start + 1]
    with pytest.raises(ValueError, match="keep one"):
        prune_structure_(small_model(), StructureConfig(layers=3), calibration=calibration)


def test_cli_prune_writes_the_checkpoint_and_what_went(
    story_model, story_tokenizer, tmp_path
) -> None:
    import json

    from slmlab.cli import main
    from slmlab.quant import calibration_tokens

    slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    args = ["prune", str(tmp_path / "dense"), "--method", "sparsegpt", "--pattern", "2:4"]
    args += ["--mlp", "64", "--layers", "1", "--calibration-rows", "4", "--seq-len", "64"]
    assert (
        main([*args, "--out", str(tmp_path / "p"), "--json", str(tmp_path / "p.json"), "--quiet"])
        == 0
    )
    calibration = calibration_tokens(story_tokenizer, rows=4, seq_len=64)
    expected = copy.deepcopy(story_model)
    cut = prune_structure_(expected, StructureConfig(mlp=64, layers=1), calibration=calibration)
    prune_(expected, PruneConfig("sparsegpt", pattern="2:4"), calibration=calibration)
    loaded = slmlab.load(tmp_path / "p")
    assert loaded.config == expected.config and loaded.config.intermediate_size == 64
    with torch.no_grad():
        assert torch.equal(loaded(calibration), expected(calibration))
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["structured"]["removed_layers"] == cut["removed_layers"]
    assert record["unstructured"]["layer_sparsity"]["total"] == pytest.approx(0.5)
    assert record["parameters_after"] == loaded.num_parameters() < record["parameters_before"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "nothing to prune"),
        (("--sparsity", "0.5"), "need --method"),
        (("--method", "wanda", "--sparsity", "1.5"), "sparsity must be"),
        (("--mlp", "half"), "neither a share"),
        (("--method", "wanda", "--pack"), "--pack stores 2:4 layers packed"),
    ],
)
def test_cli_prune_refuses_bad_requests_in_one_line(
    extra, message, story_model, story_tokenizer, tmp_path
) -> None:
    import subprocess
    import sys

    slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmlab",
            "prune",
            str(tmp_path / "dense"),
            *extra,
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode in (1, 2) and message in out.stderr.strip().splitlines()[-1], out.stderr
    assert not (tmp_path / "p").exists()


def test_diagonal_hessians_are_the_full_hessians_diagonals(calibration) -> None:
    from slmlab.models.swap import linear_layers
    from slmlab.quant.calibrate import sequential_hessians

    model = small_model()
    targets = dict(linear_layers(model))
    full = {n: h for n, _, h in sequential_hessians(model, calibration, targets)}
    diagonal = {n: h for n, _, h in sequential_hessians(model, calibration, targets, diagonal=True)}
    assert diagonal.keys() == full.keys()
    for name, h in full.items():
        torch.testing.assert_close(diagonal[name], h.diagonal())


def test_masks_break_ties_as_a_stable_sort_does() -> None:
    scores = torch.randint(0, 4, (6, 40), generator=torch.Generator().manual_seed(3)).float()
    for share in (0.0, 0.25, 0.5, 0.9):
        count = round(share * 40)
        order = torch.argsort(scores, dim=1, stable=True)[:, :count]
        expected = torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)
        assert torch.equal(top_mask(scores, share, per="row"), expected)
        flat = torch.argsort(scores.flatten(), stable=True)[: round(share * 240)]
        expected = torch.ones(240, dtype=torch.bool)
        expected[flat] = False
        assert torch.equal(top_mask(scores, share, per="layer"), expected.view(6, 40))


def test_sparsity_sweep_labels_and_measures_each_setting(
    story_model, story_tokenizer, tmp_path
) -> None:
    from slmlab.data import stories
    from slmlab.eval import score_texts
    from slmlab.experiments.pruning import sparsity_sweep

    path = slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    texts = list(stories(5, seed=2))
    rows = sparsity_sweep(
        path,
        methods=("magnitude", "wanda"),
        sparsities=(0.5,),
        patterns=("2:4",),
        texts=texts,
        calibration_rows=4,
        seq_len=64,
        progress=False,
    )
    assert [(r["method"], r["sparsity"], r["pattern"]) for r in rows] == [
        ("dense", 0.0, None),
        ("magnitude", 0.5, None),
        ("wanda", 0.5, None),
        ("magnitude", 0.5, "2:4"),
        ("wanda", 0.5, "2:4"),
    ]
    linear = sum(
        m.weight.numel()
        for n, m in story_model.named_modules()
        if type(m) is torch.nn.Linear and n != "lm_head"
    )
    assert rows[0]["zero_weights"] == 0 and all(r["zero_weights"] == linear // 2 for r in rows[1:])
    score = score_texts(
        story_model, story_tokenizer, texts, separator=story_tokenizer.token_to_id("<|endoftext|>")
    )
    assert rows[0]["perplexity"] == pytest.approx(2 ** (score.bits / score.tokens))
    magnitude = prune_(copy.deepcopy(story_model), PruneConfig("magnitude", 0.5))
    score = score_texts(
        magnitude, story_tokenizer, texts, separator=story_tokenizer.token_to_id("<|endoftext|>")
    )
    assert rows[1]["perplexity"] == pytest.approx(2 ** (score.bits / score.tokens))
    each = sparsity_sweep(  # a sparsity per method: one dense row, each method at its own points
        path,
        methods=("magnitude", "wanda"),
        sparsities={"magnitude": (0.25, 0.5)},
        patterns=("2:4",),
        texts=texts,
        calibration_rows=4,
        seq_len=64,
        progress=False,
    )
    assert [(r["method"], r["sparsity"], r["pattern"]) for r in each] == [
        ("dense", 0.0, None),
        ("magnitude", 0.25, None),
        ("magnitude", 0.5, None),
        ("magnitude", 0.5, "2:4"),
        ("wanda", 0.5, "2:4"),
    ]
    same = [
        (each[i]["perplexity"], rows[j]["perplexity"]) for i, j in ((0, 0), (2, 1), (3, 3), (4, 4))
    ]
    assert all(a == b for a, b in same)  # the settings both sweeps ran, measured alike
    with pytest.raises(ValueError, match=r"sparsities names \['sparsegpt'\]"):
        sparsity_sweep(path, methods=("wanda",), sparsities={"sparsegpt": (0.5,)}, texts=texts)


def test_pack_2to4_round_trip_and_refusals() -> None:
    from slmlab.layers import pack_2to4, unpack_2to4

    torch.manual_seed(0)
    w = torch.randn(6, 32)
    w = w * nm_mask(w.abs(), 2, 4)
    w[0, :8] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0])  # groups with 0 and 1 kept
    values, positions = pack_2to4(w)
    assert values.shape == (6, 16) and positions.shape == (6, 4) and positions.dtype == torch.uint8
    assert torch.equal(unpack_2to4(values, positions), w)
    # Byte 0 of row 0: group 0 keeps positions 0, 1 (two zeros), group 1 keeps 2 (the 3.0), 0.
    assert positions[0, 0].item() == 0 | 1 << 2 | 0 << 4 | 2 << 6
    assert values[0, :4].tolist() == [0.0, 0.0, 0.0, 3.0]
    w[1, :4] = 1.0
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        pack_2to4(w)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_2to4(torch.zeros(2, 12))


def test_packed_model_computes_the_pruned_one_and_saves(calibration, tmp_path) -> None:
    """Packing changes no logit beyond fp32 summation order, halves the weights' storage, saves
    and loads as a packed checkpoint, and a fine-tune of it keeps the 2:4 pattern."""
    import json

    from slmlab.layers import Sparse24Linear
    from slmlab.prune import pack_2to4_

    pruned = prune_(small_model(), PruneConfig("wanda", pattern="2:4"), calibration=calibration)
    packed = pack_2to4_(copy.deepcopy(pruned))
    names = [n for n, m in packed.named_modules() if isinstance(m, Sparse24Linear)]
    assert len(names) == 7 * 3 and all(
        isinstance(packed.get_submodule(n), Sparse24Linear) for n in names
    )
    assert sparsity(packed)["total"] == pytest.approx(0.5)
    for ids in (calibration[:1, :1], calibration):  # one row (the packed kernel), and prefill
        torch.testing.assert_close(_logits(packed, ids), _logits(pruned, ids), rtol=1e-5, atol=1e-5)
    path = slmlab.save(packed, tmp_path / "packed")
    section = json.loads((path / "config.json").read_text())["sparse_config"]
    assert set(section["layers"]) == set(names)
    loaded = slmlab.load(path)
    assert torch.equal(_logits(loaded, calibration), _logits(packed, calibration))
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    dense = sum(f.stat().st_size for f in slmlab.save(pruned, tmp_path / "d").glob("*.safetensors"))
    layer_bytes = sum(4 * pruned.get_submodule(n).weight.numel() for n in names)
    # the header names two tensors a layer instead of one: a little less saved than the tensors
    assert dense - stored == pytest.approx(layer_bytes * (1 - 2.125 / 4), rel=0.02)
    before = loaded.model.layers[0].mlp.up_proj.values.detach().clone()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded.train()
    loaded(calibration).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(loaded.model.layers[0].mlp.up_proj.values, before)
    assert sparsity(loaded)["total"] == pytest.approx(0.5)  # the pattern stays
    with pytest.raises(ValueError, match="no linear layer is 2:4"):
        pack_2to4_(small_model())


def test_a_malformed_sparse_config_is_named(calibration, tmp_path) -> None:
    import json

    from slmlab.prune import pack_2to4_

    model = prune_(small_model(), PruneConfig("magnitude", pattern="2:4"))
    pack_2to4_(model)
    path = slmlab.save(model, tmp_path / "packed")
    config = json.loads((path / "config.json").read_text())
    config["sparse_config"]["layers"]["model.layers.0.mlp.up_proj"] = "4:8"
    (path / "config.json").write_text(json.dumps(config))
    from slmlab.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"malformed sparse_config.*only '2:4'"):
        slmlab.load(path)


def test_cli_prune_pack_writes_a_packed_checkpoint(story_model, story_tokenizer, tmp_path) -> None:
    import json

    from slmlab.cli import main
    from slmlab.layers import Sparse24Linear

    slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    args = ["prune", str(tmp_path / "dense"), "--method", "magnitude", "--pattern", "2:4"]
    args += ["--pack", "--out", str(tmp_path / "p"), "--json", str(tmp_path / "p.json")]
    assert main([*args, "--quiet"]) == 0
    record = json.loads((tmp_path / "p.json").read_text())
    loaded = slmlab.load(tmp_path / "p")
    packed = {n for n, m in loaded.named_modules() if isinstance(m, Sparse24Linear)}
    assert packed == set(record["unstructured"]["packed_layers"])
    assert len(packed) == 7 * story_model.config.num_hidden_layers
    expected = prune_(copy.deepcopy(story_model), PruneConfig("magnitude", pattern="2:4"))
    ids = torch.randint(0, story_model.config.vocab_size, (2, 16))
    torch.testing.assert_close(_logits(loaded, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)


def test_recovery_curve_trains_the_packed_model_in_resumable_segments(
    story_model, story_tokenizer, tmp_path
) -> None:
    """The curve's segments (resumed runs) reach the weights one uninterrupted run reaches, its
    rows score the model at each step, and a packed 2:4 model trains with its pattern kept."""
    from safetensors.torch import load_file

    from slmlab.data import corpus_texts
    from slmlab.experiments.pruning import recovery_curve
    from slmlab.layers import Sparse24Linear
    from slmlab.prune import pack_2to4_

    teacher = slmlab.save(story_model, tmp_path / "dense", story_tokenizer)
    pruned = prune_(copy.deepcopy(story_model), PruneConfig("magnitude", pattern="2:4"))
    texts = list(corpus_texts("stories", "validation"))[:4]
    common = dict(texts=texts, teacher=teacher, data="stories", data_size=200, steps=4)
    common |= dict(batch_size=2, seq_len=32, lr=1e-3, prepare=pack_2to4_, progress=False)
    rows = recovery_curve(pruned, story_tokenizer, tmp_path / "segments", every=2, **common)
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[2]["tokens"] == 4 * 2 * 32
    common["texts"] = {"stories": texts, "first story": texts[:1]}
    whole = recovery_curve(pruned, story_tokenizer, tmp_path / "whole", every=4, **common)
    assert [whole[0]["stories"], whole[-1]["stories"]] == [
        rows[0]["perplexity"],
        rows[-1]["perplexity"],
    ]
    assert whole[-1]["first story"] != whole[-1]["stories"]
    a = load_file(tmp_path / "segments" / "run" / "last" / "model.safetensors")
    b = load_file(tmp_path / "whole" / "run" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = slmlab.load(tmp_path / "whole" / "run" / "last")
    layer = trained.model.layers[0].mlp.up_proj
    assert isinstance(layer, Sparse24Linear) and sparsity(trained)["total"] == pytest.approx(0.5)
    start = pack_2to4_(copy.deepcopy(pruned)).model.layers[0].mlp.up_proj
    assert not torch.equal(layer.values, start.values)  # it trained


def test_semi_structured_refusals_name_the_layer_and_the_fix() -> None:
    from slmlab.prune import to_semi_structured_

    with pytest.raises(ValueError, match="no linear layer is 2:4 sparse"):
        to_semi_structured_(small_model())
    pruned = prune_(small_model(), PruneConfig("magnitude", pattern="2:4"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight is on cpu.*"
                                         r"pack_2to4_"):  # fmt: skip
        to_semi_structured_(pruned)
    assert not pruned.model.layers[0].self_attn.q_proj.weight.is_sparse  # nothing half-done


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="semi-structured sparse tensors need a CUDA GPU of compute capability 8.0 or newer",
)
def test_semi_structured_model_computes_the_pruned_one_on_a_gpu(calibration) -> None:
    """On the GPU's sparse tensor cores, the 2:4 model's logits are the masked fp16 model's
    (up to fp16 summation order), for one row and for a prompt; a layer of the wrong shape or
    precision is refused by name."""
    from torch.sparse import SparseSemiStructuredTensor

    from slmlab.prune import to_semi_structured_

    pruned = prune_(small_model(), PruneConfig("wanda", pattern="2:4"), calibration=calibration)
    dense = pruned.cuda().half()
    sparse = to_semi_structured_(copy.deepcopy(dense))
    weights = [m.weight for m in sparse.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(w, SparseSemiStructuredTensor) for w in weights) == 7 * 3
    for ids in (calibration[:1, :1], calibration):
        ids = ids.cuda()
        with torch.no_grad():
            torch.testing.assert_close(
                sparse(ids).float(), dense(ids).float(), rtol=2e-2, atol=2e-2
            )
    with pytest.raises(ValueError, match=r"is torch.float32; .*model.half"):
        to_semi_structured_(copy.deepcopy(dense).float())
    narrow = prune_(small_model(kv_heads=1), PruneConfig("magnitude", pattern="2:4")).cuda().half()
    with pytest.raises(ValueError, match=r"k_proj.weight is 16x64.*add 'k_proj' to skip"):
        to_semi_structured_(narrow)
