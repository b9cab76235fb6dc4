import json

import pytest
from make_tiny_checkpoint import VARIANTS

from qwen_mlx.models.config import ConfigError, ModelConfig

BASE = {**VARIANTS["qwen3"], "vocab_size": 100}


def test_qwen3_head_dim_is_taken_not_derived():
    cfg = ModelConfig.from_dict(BASE)
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.n_rep == 2 and cfg.tie_word_embeddings and not cfg.attention_bias and cfg.rope_scaling is None


def test_qwen2_derives_head_dim_and_has_qkv_bias():
    cfg = ModelConfig.from_dict({**VARIANTS["qwen2"], "vocab_size": 100})
    assert cfg.head_dim == 16 and cfg.attention_bias and not cfg.tie_word_embeddings


@pytest.mark.parametrize("spelling", [
    {"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    # transformers 5 writes rope_parameters in place of rope_theta / rope_scaling
    {"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                             "original_max_position_embeddings": 64}},
])
def test_yarn_spellings(spelling):
    raw = {k: v for k, v in {**BASE, **spelling}.items() if v is not None}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 1e4
    assert (cfg.rope_scaling.factor, cfg.rope_scaling.original_max_position_embeddings) == (4.0, 64)
    assert (cfg.rope_scaling.beta_fast, cfg.rope_scaling.beta_slow) == (32.0, 1.0)


def test_rope_parameters_default_type_has_no_scaling():
    raw = {k: v for k, v in BASE.items() if k != "rope_theta"}
    cfg = ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None


def test_moe_reads_num_local_experts():
    raw = {**VARIANTS["qwen3_moe"], "vocab_size": 100}
    del raw["num_experts"]
    cfg = ModelConfig.from_dict({**raw, "num_local_experts": 8})
    assert cfg.num_experts == 8
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]


def test_round_trip_through_to_dict():
    for variant in VARIANTS:
        cfg = ModelConfig.from_dict({**VARIANTS[variant], "vocab_size": 100})
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not divisible by num_key_value_heads (3)"),
    ({"hidden_size": None}, "required key 'hidden_size' is missing"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be int"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_theta": None}, "rope_theta is missing"),
    ({"quantization": {"group_size": 64, "bits": 7}}, "unsupported quantization bits=7"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization method 'awq' is not supported"),
])
def test_bad_configs_fail_with_one_sentence(change, message):
    raw = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw, "x/config.json")
    assert message in str(e.value) and str(e.value).startswith("x/config.json: ")
    assert "\n" not in str(e.value)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(tmp_path / "config.json")
