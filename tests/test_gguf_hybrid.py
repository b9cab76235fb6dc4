"""GGUF import of the hybrid models: the tiny Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints (written by
transformers) are written here as llama.cpp's convert_hf_to_gguf.py writes them, and `convert` brings them back.

The writer restates the converter's transforms (its Qwen3NextModel, _LinearAttentionVReorderBase, Qwen3_5TextModel,
Qwen3_5MoeTextModel and Qwen2MoeModel classes) and takes tensor names from the `gguf` package's own name map
(llama.cpp's gguf-py), never from the importer:
  - A_log -> ssm_a = -exp(A_log); dt_bias -> ssm_dt.bias; conv1d squeezed to (channels, width); every
    `*norm.weight` but the gated linear_attn.norm gets + 1;
  - Qwen3.5 (qwen35, qwen35moe) with more value heads than key heads: value heads reordered from grouped by key
    head to tiled, in in_proj_qkv's v rows, in_proj_z, in_proj_b/a, A_log, dt_bias, conv1d's v channels and
    out_proj's columns;
  - Qwen3-Next: in_proj_qkvz (q, k, v, z per key head) split into attn_qkv ([q | k | v]) and attn_gate (z);
  - experts stacked (E, out, in); the hub's stacked gate_up_proj split into gate and up;
  - 1-D tensors, the conv and the routers kept F32; a matrix whose rows are not whole Q8_0 blocks falls back to F16.
The image-text prefix is dropped and the vision tower left out (llama.cpp writes it to a separate mmproj file).

Checked: the config the GGUF metadata gives equals the source's; in F32 every imported parameter equals the
source's (A_log to float32 rounding: it went through exp and log) and the logits are within 1e-4; in F16 and
Q8_0 within the stated share of the largest logit; greedy tokens equal the source's in every case; mlx-lm loads
the converted checkpoints of the default layer pattern with the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from helpers import greedy_ours, prompt_ids
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from test_gguf import write_vocabulary

from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.gguf import read_gguf
from qwen_mlx.weights.gguf_file import GGUFError
from qwen_mlx.weights.loader import load_config, load_model
from qwen_mlx.weights.quant import logit_agreement

ARCH = {"qwen3_5": gguf.MODEL_ARCH.QWEN35, "qwen3_5_moe": gguf.MODEL_ARCH.QWEN35MOE,
        "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT}
KEEP_F32 = (gguf.MODEL_TENSOR.SSM_CONV1D, gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)


def text_config(ckpt: Path) -> dict:
    """The language model's config keys, with the rope keys in one place (both spellings read)."""
    raw = json.loads((ckpt / "config.json").read_text())
    text = dict(raw.get("text_config", raw))
    text["model_type"] = raw["model_type"].removesuffix("_text")
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    rope = text.get("rope_parameters") or {}
    text.setdefault("rope_theta", rope.get("rope_theta"))
    text.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
    text["mrope_section"] = rope.get("mrope_section")
    return text


def hf_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """The text model's tensors as llama.cpp's converter takes them: `model.` names, no vision tower, no MTP."""
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        for name, value in load_file(file).items():
            if name.startswith(("model.visual.", "mtp.")):
                continue
            out[name.replace("model.language_model.", "model.")] = value.astype(np.float32)
    return out


def regroup(x: np.ndarray, axis: int, a: int, b: int, d: int) -> np.ndarray:
    """Heads along `axis` in order (a, b, d) -> (b, a, d)."""
    shape = x.shape
    x = x.reshape(*shape[:axis], a, b, d, *shape[axis + 1:])
    return np.swapaxes(x, axis, axis + 1).reshape(shape)


def llama_cpp_tensors(hf: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """HF name -> value, as the converter's modify_tensors chain hands them to the name map."""
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    Dk, Dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    qk = 2 * Hk * Dk

    def tiled(x: np.ndarray, axis: int, d: int) -> np.ndarray:  # grouped (Hk, Hv / Hk, d) -> tiled (Hv / Hk, Hk, d)
        return regroup(x, axis, Hk, Hv // Hk, d)

    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, x in sorted(hf.items()):
        # _LinearAttentionVReorderBase (Qwen3.5 only), then Qwen3NextModel
        if cfg["model_type"] != "qwen3_next" and Hv != Hk and ".linear_attn." in name:
            if ".in_proj_qkv." in name:
                x = np.concatenate([x[:qk], tiled(x[qk:], 0, Dv)])
            elif ".in_proj_z." in name:
                x = tiled(x, 0, Dv)
            elif ".in_proj_b." in name or ".in_proj_a." in name or name.endswith((".A_log", ".dt_bias")):
                x = tiled(x, 0, 1)
            elif ".conv1d" in name:
                x = x.squeeze()
                x = np.concatenate([x[:qk], tiled(x[qk:], 0, Dv)])
            elif ".out_proj." in name:
                x = tiled(x, 1, Dv)
        if name.endswith(".A_log"):
            x = -np.exp(x)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in name:
            x = x.squeeze()
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            x = x + 1
        if "in_proj_qkvz.weight" in name:
            q, k, v, z = np.split(x.reshape(Hk, -1, x.shape[-1]), [Dk, 2 * Dk, 2 * Dk + Hv // Hk * Dv], axis=1)
            stem = name.removesuffix(".in_proj_qkvz.weight")
            out[f"{stem}.in_proj_qkv.weight"] = np.concatenate([p.reshape(-1, x.shape[-1]) for p in (q, k, v)])
            out[f"{stem}.in_proj_z.weight"] = z.reshape(-1, x.shape[-1])
            continue
        # Qwen2MoeModel: experts stacked (E, out, in), the hub's gate_up_proj split into gate and up
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = np.split(x, 2, axis=1)
            out[f"{name.removesuffix('.gate_up_proj')}.gate_proj.weight"] = gate
            out[f"{name.removesuffix('.gate_up_proj')}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            out[f"{name}.weight"] = x
        elif ".mlp.experts." in name:
            stem, e, proj = name.rsplit(".", 3)[0], int(name.split(".")[-3]), name.split(".")[-2]
            experts.setdefault(f"{stem}.{proj}.weight", {})[e] = x
        else:
            out[name] = x
    for name, per_expert in experts.items():
        out[name] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def stored(x: np.ndarray, qt: gguf.GGMLQuantizationType) -> np.ndarray:
    """x as a GGUF tensor of type qt reads back (Q8_0 on rows that are not whole blocks: F16, as the writer does)."""
    if qt == gguf.GGMLQuantizationType.F32:
        return x
    if qt == gguf.GGMLQuantizationType.F16 or x.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        return x.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt).reshape(x.shape)


def write_hybrid_gguf(ckpt: Path, file: Path, qtype: str, change=None, pre: str | None = None) -> dict[str, np.ndarray]:
    """`ckpt` as llama.cpp writes it (metadata of TextModel, Qwen2MoeModel, Qwen3NextModel and the MRoPE mixin),
    matrices in `qtype`. `change(metadata, tensors)` may edit both (GGUF names) before they are written. With
    `pre`, the vocabulary too, with that pre-tokenizer.

    Returns the source's tensors (Hugging Face names and layout) as the file holds them: each rounded as its type
    rounds it. The converter's transforms only move whole rows (value-head reordering, the qkvz split, expert
    stacking) or touch tensors kept F32, and a row's blocks round the same wherever the row goes; the one
    exception, Qwen3.5's out_proj with its columns reordered, is rounded in the file's column order."""
    cfg = text_config(ckpt)
    arch = ARCH[cfg["model_type"]]
    qt = gguf.GGMLQuantizationType[qtype]
    hf = hf_tensors(ckpt)
    Hk, Hv, Dv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
    held = {}
    for name, x in hf.items():
        if x.ndim == 1 or name.endswith((".conv1d.weight", ".mlp.gate.weight", ".shared_expert_gate.weight")):
            held[name] = x
        elif name.endswith(".linear_attn.out_proj.weight") and arch != gguf.MODEL_ARCH.QWEN3NEXT:
            held[name] = regroup(stored(regroup(x, 1, Hk, Hv // Hk, Dv), qt), 1, Hv // Hk, Hk, Dv)
        else:
            held[name] = stored(x, qt)

    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, cfg["num_hidden_layers"])
    tensors = {}
    for name, x in llama_cpp_tensors(hf, cfg).items():
        # llama.cpp's qwen3next lists no dense MLP tensors (the released model has none): this checkpoint's dense
        # layer takes the generic ffn_gate/ffn_up/ffn_down names
        new = names.get_name(name, try_suffixes=(".weight", ".bias")) or \
            dense_names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        tensors[new] = x
    if cfg["tie_word_embeddings"]:
        tensors.pop("output.weight", None)
    head_dim = cfg["head_dim"]
    u32 = gguf.GGUFValueType.UINT32
    metadata = {
        "block_count": (cfg["num_hidden_layers"], u32), "context_length": (cfg["max_position_embeddings"], u32),
        "embedding_length": (cfg["hidden_size"], u32), "attention.head_count": (cfg["num_attention_heads"], u32),
        "attention.head_count_kv": (cfg["num_key_value_heads"], u32),
        "rope.freq_base": (float(cfg["rope_theta"]), gguf.GGUFValueType.FLOAT32),
        "attention.layer_norm_rms_epsilon": (cfg["rms_norm_eps"], gguf.GGUFValueType.FLOAT32),
        "attention.key_length": (head_dim, u32), "attention.value_length": (head_dim, u32),
        "ssm.conv_kernel": (cfg["linear_conv_kernel_dim"], u32), "ssm.state_size": (cfg["linear_key_head_dim"], u32),
        "ssm.group_count": (cfg["linear_num_key_heads"], u32),
        "ssm.time_step_rank": (cfg["linear_num_value_heads"], u32),
        "ssm.inner_size": (cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"], u32),
        "full_attention_interval": (cfg.get("full_attention_interval") or 4, u32),
        "rope.dimension_count": (int(head_dim * cfg["partial_rotary_factor"]), u32),
    }
    if cfg.get("intermediate_size"):
        metadata["feed_forward_length"] = (cfg["intermediate_size"], u32)
    if cfg.get("num_experts"):
        metadata.update({"expert_count": (cfg["num_experts"], u32),
                         "expert_used_count": (cfg["num_experts_per_tok"], u32),
                         "expert_feed_forward_length": (cfg["moe_intermediate_size"], u32),
                         "expert_shared_feed_forward_length": (cfg["shared_expert_intermediate_size"], u32)})
    if arch != gguf.MODEL_ARCH.QWEN3NEXT:
        metadata["rope.dimension_sections"] = ([*(cfg["mrope_section"] or [11, 11, 10]), 0][:4], None)
    if change is not None:
        change(metadata, tensors)

    w = gguf.GGUFWriter(str(file), gguf.MODEL_ARCH_NAMES[arch])
    for key, (value, vtype) in metadata.items():
        full = f"{gguf.MODEL_ARCH_NAMES[arch]}.{key}"
        if isinstance(value, list):
            w.add_array(full, value)
        else:
            w.add_key_value(full, value, vtype)
    if pre is not None:
        write_vocabulary(w, ckpt, cfg["vocab_size"], pre)
    f32 = {gguf.TENSOR_NAMES[t].split(".")[-1] for t in KEEP_F32}
    for name, x in tensors.items():
        if x.ndim == 1 or qt == gguf.GGMLQuantizationType.F32 or name.split(".")[-2] in f32:
            w.add_tensor(name, x.astype(np.float32))
            continue
        if qt != gguf.GGMLQuantizationType.F16:
            try:
                data = gguf.quants.quantize(x, qt)
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
                continue
            except gguf.QuantError:  # rows not whole blocks: the converter falls back to F16
                pass
        w.add_tensor(name, x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)[None])[0])


CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias",
               "max_position_embeddings", "layer_types", "partial_rotary_factor", "linear_num_key_heads",
               "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
               "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step")
_SLOW = pytest.mark.slow  # 8-24 s each; the default run keeps one case per transform (tiling, qkvz, stacked, Q8_0)
CASES = [("qwen3_5", "F32"), pytest.param("qwen3_5", "F16", marks=_SLOW), pytest.param("qwen3_5", "Q8_0", marks=_SLOW),
         pytest.param("qwen3_5_moe", "F32", marks=_SLOW), ("qwen3_5_moe_default", "Q8_0"), ("qwen3_next", "F32"),
         pytest.param("qwen3_next", "F16", marks=_SLOW), pytest.param("qwen3_next", "Q8_0", marks=_SLOW)]
# max logit error against the source checkpoint, as a share of its largest logit: the format's rounding alone
# (measured 0.0015 .. 0.079 and 0.064 .. 0.39; on these tiny random models Q8_0 flips MoE routing choices). F32:
# 1e-4 absolute.
LOGIT_ERROR = {"F16": 0.15, "Q8_0": 0.6}
MLX_LM = ("qwen3_5_moe_default", "qwen3_next")  # the default layer pattern, which mlx-lm assumes


@pytest.mark.parametrize("variant,qtype", CASES)
def test_hybrid_gguf_imports_config_weights_and_logits(hybrid_checkpoint, tmp_path, variant, qtype):
    src = hybrid_checkpoint(variant)
    file = tmp_path / f"{variant}-{qtype}.gguf"
    with_tokenizer = (variant, qtype) == ("qwen3_5", "F16")  # the vocabulary takes the writer seconds
    held = write_hybrid_gguf(src, file, qtype, pre="qwen35" if with_tokenizer else None)
    out = convert(file, tmp_path / "out", dequantize=True, dtype="fp32", progress=False).path

    theirs, ours = load_config(src), load_config(out)
    for key in CONFIG_KEYS:
        assert getattr(ours, key) == getattr(theirs, key), key
    if any(not theirs.is_moe_layer(i) for i in range(theirs.num_hidden_layers)):
        assert ours.intermediate_size == theirs.intermediate_size

    # the file's own weights, in a Hugging Face checkpoint that our (transformers-checked) loader reads
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(src / "config.json", ref / "config.json")
    save_file(held, str(ref / "model.safetensors"))
    model, expected, source = load_model(out)[0], load_model(ref)[0], load_model(src)[0]

    # every parameter where the model wants it, with the file's value (A_log went through exp and log)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(expected.parameters()))
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        tol = 1e-6 if name.endswith("A_log") else 0.0
        np.testing.assert_allclose(np.array(got[name]), np.array(value), rtol=tol, atol=tol, err_msg=name)

    ids = prompt_ids(16)
    got = logits(model, ids)
    assert np.abs(got - logits(expected, ids)).max() <= 1e-4
    assert greedy_ours(model, ids, 16) == greedy_ours(expected, ids, 16)
    truth = logits(source, ids)  # the source's own logits: only the format's rounding between
    m = logit_agreement(mx.array(truth), mx.array(got))
    err = np.abs(got - truth).max()
    print(f"\n{variant} {qtype}: max logit error {err:.2e} ({err / np.abs(truth).max():.4f} of the largest logit) "
          f"against the source, KL {m['kl_mean']:.5f}, top-1 {m['top1']:.0%}")
    assert err <= 1e-4 if qtype == "F32" else err / np.abs(truth).max() <= LOGIT_ERROR[qtype]

    if variant in MLX_LM:
        from mlx_lm.utils import load_model as mlx_lm_load

        assert np.abs(logits(mlx_lm_load(out)[0], ids) - got).max() <= 1e-4
    if with_tokenizer:
        check_qwen35_tokenizer(src, out)


# Qwen3.5's tokenizer.json split (llama.cpp's "qwen35" pre-tokenizer): Qwen2's, with combining marks (\p{M}) kept
# with the letters they follow.
QWEN35_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def check_qwen35_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer rebuilt from a "qwen35" GGUF vocabulary splits as Qwen3.5's tokenizer.json does: the source's
    vocabulary with Qwen3.5's split pattern (which differs from Qwen2's on combining marks)."""
    from tokenizers import Tokenizer

    raw = json.loads((src / "tokenizer.json").read_text())
    split = raw["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split"
    qwen2 = Tokenizer.from_str(json.dumps(raw))
    split["pattern"] = {"Regex": QWEN35_PATTERN}
    qwen35, got = Tokenizer.from_str(json.dumps(raw)), Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "नमस्ते दुनिया, café e\u0301 ñ 123 <|im_start|>user\nhi<|im_end|>"
    assert got.get_vocab() == qwen35.get_vocab()
    nfc = qwen35.normalizer.normalize_str(text)

    def pieces(tok: Tokenizer) -> list[str]:
        return [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(nfc)]

    assert pieces(got) == pieces(qwen35) != pieces(qwen2)
    assert got.encode(text).ids == qwen35.encode(text).ids
    assert got.decode(got.encode(text).ids, skip_special_tokens=False) == nfc


def _drop(key):
    return lambda metadata, tensors: metadata.pop(key)


def _positive_ssm_a(metadata, tensors):
    tensors["blk.0.ssm_a"] = -tensors["blk.0.ssm_a"]


def _no_mixer(metadata, tensors):
    for name in [n for n in tensors if n.startswith("blk.1.attn_")]:
        del tensors[name]


def _odd_inner(metadata, tensors):
    metadata["ssm.inner_size"] = (metadata["ssm.inner_size"][0] + 1, metadata["ssm.inner_size"][1])


@pytest.mark.parametrize("change,message", [
    (_drop("ssm.group_count"), "metadata key qwen35.ssm.group_count is missing"),
    (_drop("rope.dimension_count"), "metadata key qwen35.rope.dimension_count is missing"),
    (_odd_inner, "ssm.time_step_rank 4 (value heads) must be a multiple of ssm.group_count 2 (key heads) and "
                 "divide ssm.inner_size 97"),
    (_no_mixer, "block 1 holds neither a linear-attention (ssm_out) and a full-attention (attn_q) projection"),
    (_positive_ssm_a, "tensor blk.0.ssm_a must be negative"),
])
def test_hybrid_gguf_inconsistent_is_one_clear_error(hybrid_checkpoint, tmp_path, change, message):
    file = tmp_path / "bad.gguf"
    write_hybrid_gguf(hybrid_checkpoint("qwen3_5"), file, "F32", change)
    with pytest.raises(GGUFError) as e:
        read_gguf(file)  # before any tensor is loaded for writing
    assert str(e.value).startswith(f"{file}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_hybrid_gguf_mtp_blocks_are_left_out(hybrid_checkpoint, tmp_path):
    """llama.cpp's Qwen3.5 converter appends the MTP head as blocks past the model's (block_count counts them,
    nextn_predict_layers says how many): the model's layers are imported, the MTP blocks are not."""
    def mtp_block(metadata, tensors):
        n = metadata["block_count"][0]
        metadata["block_count"] = (n + 1, metadata["block_count"][1])
        metadata["nextn_predict_layers"] = (1, gguf.GGUFValueType.UINT32)
        for name in [t for t in tensors if t.startswith("blk.1.")]:  # a full-attention block, as the MTP's is
            tensors[name.replace("blk.1.", f"blk.{n}.", 1)] = tensors[name]
        tensors[f"blk.{n}.nextn.eh_proj.weight"] = np.zeros((64, 128), np.float32)

    file = tmp_path / "mtp.gguf"
    write_hybrid_gguf(hybrid_checkpoint("qwen3_5"), file, "F32", mtp_block)
    checkpoint = read_gguf(file)
    assert checkpoint.config["num_hidden_layers"] == 4
    assert tuple(checkpoint.config["layer_types"]) == load_config(hybrid_checkpoint("qwen3_5")).layer_types
    assert not [name for name in checkpoint.tensors if name.startswith("model.layers.4.")]
