"""The model config: validation messages name the field and the rule; HF round trips."""

from __future__ import annotations

import json

import pytest

from slmlab.models import ConfigError, ModelConfig

BASE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def make(**changes: object) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})  # type: ignore[arg-type]


def test_defaults_are_derived() -> None:
    cfg = make()
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16 and cfg.attention_kind == "MHA"
    assert make(num_key_value_heads=1).attention_kind == "MQA"
    assert make(num_key_value_heads=2).attention_kind == "GQA"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": -64}, "hidden_size must be positive"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
        ({"vocab_size": 10.5}, "vocab_size must be an integer"),
        ({"num_attention_heads": 5}, r"num_attention_heads \(5\) must divide hidden_size \(64\)"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads \(3\) must divide num_attention_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"rope_theta": 0}, "rope_theta must be a positive number"),
        ({"rope_theta": float("inf")}, "rope_theta must be a positive number, got inf"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
        ({"rms_norm_eps": True}, "rms_norm_eps must be a positive number, got True"),
        (
            {"tie_word_embeddings": "false"},
            "tie_word_embeddings must be true or false, got 'false'",
        ),
        ({"attention_bias": 1}, "attention_bias must be true or false, got 1"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": float("inf")}},
            "rope_scaling.factor must be positive",
        ),
        ({"model_type": "gpt2"}, "model_type must be one of"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "needs the field 'low_freq_factor'",
        ),
        ({"rope_scaling": {"rope_type": "su"}}, "rope_scaling.rope_type must be one of"),
    ],
)
def test_bad_configs_name_the_field_and_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(**changes)


def test_from_dict_missing_and_unknown_fields() -> None:
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['intermediate_size'\]"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "intermediate_size"})
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({**BASE, "n_embd": 3})
    assert ModelConfig.from_dict(make().to_dict()) == make()


def test_explicit_head_dim_need_not_divide_width() -> None:
    cfg = make(num_attention_heads=5, head_dim=16)
    assert cfg.q_size == 80


@pytest.mark.parametrize(
    "cfg",
    [
        make(num_key_value_heads=2),
        make(tie_word_embeddings=False, rope_theta=50000.0),
        make(model_type="qwen2", attention_bias=True, num_key_value_heads=1),
        make(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ],
)
def test_hf_round_trip_through_transformers(cfg: ModelConfig, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf.save_pretrained(tmp_path)  # what transformers writes, in whichever layout its version uses
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


def test_unsupported_hf_configs_are_refused(tmp_path) -> None:
    hf = make().to_hf_dict()
    cases = [
        ({"model_type": "gpt2"}, "unknown architecture model_type='gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, "Llama with attention_bias"),
    ]
    for change, message in cases:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**hf, **change}))
        with pytest.raises(ConfigError, match=message) as err:
            ModelConfig.from_json(path)
        assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(path)
