import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from qwen_mlx.weights.loader import load_model, resolve
from qwen_mlx.weights.names import LoadError


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny qwen3 checkpoint to break."""
    return shutil.copytree(tiny_checkpoint("qwen3"), tmp_path / "ckpt")


def rewrite_weights(path, change):
    file = path / "model.safetensors"
    weights = dict(mx.load(str(file)))
    change(weights)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)


def test_wrong_shape_names_file_tensor_and_shapes(ckpt):
    def change(w):
        w["model.layers.0.self_attn.k_proj.weight"] = mx.zeros((32, 64))

    rewrite_weights(ckpt, change)
    with pytest.raises(LoadError) as e:
        load_model(ckpt)
    assert str(e.value) == ("model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape (32, 64), "
                            "the config needs (64, 64)")


def test_unexpected_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": mx.zeros(128)}))
    with pytest.raises(LoadError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.bias that this qwen3 config"):
        load_model(ckpt)


def test_unsupported_dtype_is_named(ckpt):
    rewrite_weights(ckpt, lambda w: w.update({"model.norm.weight": mx.zeros(64, dtype=mx.int32)}))
    with pytest.raises(LoadError, match=r"tensor model\.norm\.weight has dtype I32"):
        load_model(ckpt)


def test_expert_stack_problems_are_named_as_the_checkpoint_names_them(tiny_checkpoint, tmp_path):
    """Gate and up are joined into one stack on loading: a missing or misshapen part is named as the checkpoint
    (Hugging Face's per-expert tensors, mlx-lm's stacks) names it."""
    from qwen_mlx.weights.convert import convert

    hf = shutil.copytree(tiny_checkpoint("qwen3_moe"), tmp_path / "hf")
    rewrite_weights(hf, lambda w: w.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(LoadError, match=r"^tensor model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight is missing$"):
        load_model(hf)

    stacked = convert(tiny_checkpoint("qwen3_moe"), tmp_path / "mlx", dequantize=True, progress=False).path
    up = "model.layers.0.mlp.switch_mlp.up_proj.weight"
    for name, change, message in [
        ("missing", lambda w: w.pop(up), rf"^checkpoint has no tensor {up} \(needed"),
        ("short", lambda w: w.update({up: w[up][:, 1:]}),
         r"^model\.safetensors: tensors model\.layers\.0\.mlp\.switch_mlp\.gate_proj\.weight and "
         r"model\.layers\.0\.mlp\.switch_mlp\.up_proj\.weight joined have shape \(8, 63, 64\), the config needs "
         r"\(8, 64, 64\)$"),
    ]:
        broken = shutil.copytree(stacked, tmp_path / name)
        rewrite_weights(broken, change)
        with pytest.raises(LoadError, match=message):
            load_model(broken)


def test_tied_checkpoint_with_lm_head_loads(ckpt):
    rewrite_weights(ckpt, lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"]}))
    model, _ = load_model(ckpt)
    assert "lm_head" not in model


def test_bad_config_json_is_named(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(LoadError, match=r"config\.json: not valid JSON"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(LoadError, match=r"config\.json: model_type 'llama' is not supported"):
        load_model(ckpt)


def test_truncated_safetensors_is_named(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(LoadError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(ckpt)


def test_sharded_index_problems(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "sharded")
    load_model(ckpt)  # the intact two-shard checkpoint loads
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match=r"shard model-00002-of-00002\.safetensors is listed but missing"):
        load_model(ckpt)
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"shard name '\.\./\.\./etc/passwd' is not a \.safetensors file"):
        load_model(ckpt)


def test_float32_cast_and_parameter_count(tiny_checkpoint):
    model, path = load_model(tiny_checkpoint("qwen3", "bfloat16"), dtype=mx.float32)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    assert path.is_dir()


def test_missing_directory_and_offline_hub_id(tmp_path):
    with pytest.raises(LoadError, match="no such checkpoint directory"):
        resolve(tmp_path / "nope")
    with pytest.raises(LoadError) as e:
        resolve("Qwen/Qwen3-0.6B-not-cached")  # HF_HUB_OFFLINE=1 in the tests
    assert "--model PATH" in str(e.value)


def test_cli_prints_one_clear_line(ckpt):
    rewrite_weights(ckpt, lambda w: w.pop("model.norm.weight"))
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "info", "--model", str(ckpt)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "qwen-mlx: error: checkpoint has no tensor model.norm.weight (needed by this qwen3 config)"
    assert "Traceback" not in run.stderr


def test_cli_info_on_a_good_checkpoint(tiny_checkpoint):
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "info", "--model", str(tiny_checkpoint("qwen3_moe"))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "qwen3_moe" in run.stdout and "8 experts, 2 active" in run.stdout


@pytest.mark.parametrize("variant,layout", [("qwen3_moe", "hf"), ("qwen3_moe", "mlx-bf16"), ("qwen3_moe", "mlx-4bit"),
                                            ("qwen2", "hf")])
def test_peak_memory_while_loading_stays_near_the_weights(tmp_path, variant, layout):
    """Experts dominate this checkpoint (vocab cut to 1000), so stacking them (Hugging Face's per-expert tensors)
    and joining gate and up (from either layout) must not copy them twice."""
    from make_tiny_checkpoint import write_tiny_checkpoint
    from mlx.utils import tree_flatten

    from qwen_mlx.weights.convert import convert

    overrides = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4)
    if variant == "qwen3_moe":
        overrides.update(num_experts=64, moe_intermediate_size=256)
    else:
        overrides.update(intermediate_size=8192)
    path = write_tiny_checkpoint(tmp_path / variant, variant, "bfloat16", overrides=overrides)
    if layout != "hf":  # mlx-lm's layout: each layer's experts stacked (E, out, in), gate and up apart
        path = convert(path, tmp_path / layout, progress=False, **({"bits": 4} if layout == "mlx-4bit" else
                                                                   {"dequantize": True})).path
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, _ = load_model(path)
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert weights > 20 * 2**20
    print(f"\n{variant} {layout}: load peak {(mx.get_peak_memory() - base) / weights:.3f} x weights")
    assert mx.get_peak_memory() - base <= 1.1 * weights
