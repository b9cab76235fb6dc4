"""GGUF import: files written here with the `gguf` package's own writer, as llama.cpp's converter lays them out,
come back with Hugging Face names, config, tokenizer and the logits of their dequantized weights; hostile headers
end in one sentence.

The `gguf` package (0.19) can write F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; it cannot make K-quants (it
only dequantizes them), so Q4_K/Q5_K/Q6_K are checked on random blocks written raw, against the package's
reference dequantization.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from helpers import joined_gate_up, prompt_ids
from mlx.utils import tree_flatten

from qwen_mlx.models.qwen3 import Model, checkpoint_weights
from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.gguf import read_gguf
from qwen_mlx.weights.gguf_file import GGUFError, load_tensor, read_header
from qwen_mlx.weights.loader import load_config, load_model
from qwen_mlx.weights.quant import logit_agreement

# Hugging Face -> llama.cpp names, as its convert_hf_to_gguf.py maps a Qwen2/Qwen3/Qwen3-MoE checkpoint.
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


def write_gguf(ckpt: Path, out: Path, qtype: str, tokenizer: bool = True) -> dict[str, np.ndarray]:
    """Write `ckpt` as llama.cpp would (norms and biases F32, matrices `qtype`, experts stacked (E, out, in),
    the BPE vocabulary padded with [PAD] tokens to the embedding rows); return the weights the file holds,
    dequantized, by our names. The vocabulary takes the writer seconds: `tokenizer=False` leaves it out."""
    cfg = json.loads((ckpt / "config.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    w = gguf.GGUFWriter(str(out), ARCH[cfg["model_type"]])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("num_experts"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if tokenizer:
        write_vocabulary(w, ckpt, cfg["vocab_size"])
    held = {}
    qt = gguf.GGMLQuantizationType[qtype]

    def add(gguf_name: str, name: str, a: np.ndarray) -> None:
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, a)
            held[name] = a
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name, a.astype(np.float16))
            held[name] = a.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(a, qt)
            w.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qt)
            held[name] = gguf.quants.dequantize(data, qt).reshape(a.shape)

    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name in sorted(weights):
        stem, kind = name.rsplit(".", 1)
        parts = stem.split(".")
        if ".experts." in name:
            experts.setdefault((parts[2], parts[6]), {})[int(parts[5])] = weights[name]
        elif stem in GLOBAL:
            add(f"{GLOBAL[stem]}.{kind}", name, weights[name])
        else:
            add(f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:])]}.{kind}", name, weights[name])
    for (layer, proj), per_expert in sorted(experts.items()):
        stacked = np.stack([per_expert[e] for e in sorted(per_expert)])
        add(f"blk.{layer}.{EXPERTS[proj]}.weight", f"model.layers.{layer}.mlp.switch_mlp.{proj}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def write_vocabulary(w: gguf.GGUFWriter, ckpt: Path, vocab_size: int, pre: str = "qwen2") -> None:
    """The tokenizer metadata llama.cpp writes for a Qwen (gpt2-style BPE) vocabulary, with pre-tokenizer `pre`."""
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)
    w.add_pad_token_id(151643)
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"])


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)[None])[0])


# (variant, ggml type, bound on the max logit error relative to the largest logit). The vocabulary is written and
# rebuilt in one case (the writer needs seconds for its 300,000 strings; the rebuild does not depend on the type).
CASES = [("qwen3", "F16", 0.01), ("qwen3", "Q8_0", 0.1),
         pytest.param("qwen3", "Q4_0", 1.0, marks=pytest.mark.slow),  # Q4_0 by default through qwen2's case
         ("qwen3_moe", "Q8_0", 0.1), ("qwen2", "Q4_0", 1.0)]


@pytest.mark.parametrize("variant,qtype,bound", CASES)
def test_gguf_imports_names_config_and_logits(tiny_checkpoint, tmp_path, variant, qtype, bound):
    src = tiny_checkpoint(variant)
    file = tmp_path / f"{variant}-{qtype}.gguf"
    with_tokenizer = (variant, qtype) == ("qwen3", "Q8_0")
    held = write_gguf(src, file, qtype, tokenizer=with_tokenizer)
    out = convert(file, tmp_path / "out", dequantize=True, dtype="fp32", progress=False).path

    # config: what the GGUF states, and what its tensors imply (tied head, mlp_only_layers, QKV bias)
    theirs, ours = load_config(src), load_config(out)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "attention_bias", "max_position_embeddings", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers"):
        assert getattr(ours, key) == getattr(theirs, key), key

    # names: the weights the file holds, each where the model wants it, to the bit
    model, _ = load_model(out)
    params = checkpoint_weights(dict(tree_flatten(model.parameters())))  # in the checkpoint's layout
    assert sorted(params) == sorted(held)
    for name, value in held.items():
        assert np.array_equal(np.array(params[name]), value), name

    # logits: those of the dequantized weights, so within the format's quantization error of the source
    ids = prompt_ids(16)
    expected = Model(theirs)
    expected.load_weights(list(joined_gate_up({k: mx.array(v) for k, v in held.items()}).items()))
    got, want, truth = logits(model, ids), logits(expected, ids), logits(load_model(src)[0], ids)
    assert np.abs(got - want).max() <= 1e-4
    err = np.abs(got - truth).max() / np.abs(truth).max()
    m = logit_agreement(mx.array(truth), mx.array(got))
    print(f"\n{variant} {qtype}: max logit error {err:.4f} of the largest logit, KL {m['kl_mean']:.5f}, "
          f"top-1 {m['top1']:.0%}")
    assert err < bound

    if variant == "qwen3_moe":  # straight to 4-bit MLX: experts stacked from the GGUF load in mlx-lm too
        from mlx_lm.utils import load_model as mlx_lm_load

        q4 = convert(file, tmp_path / "q4", group_size=32, dtype="fp32", progress=False).path
        assert np.abs(logits(load_model(q4)[0], ids) - logits(mlx_lm_load(q4)[0], ids)).max() <= 1e-4
    if with_tokenizer:
        check_tokenizer(src, out)
    else:
        assert not (out / "tokenizer.json").exists()


def check_tokenizer(src: Path, out: Path) -> None:
    """The rebuilt tokenizer gives the checkpoint's own ids and text, specials and chat template."""
    from tokenizers import Tokenizer

    a, b = Tokenizer.from_file(str(src / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Hello, world! <|im_start|>user\n你好 <think>x</think>  12345 \n\n\tdef f(): return 'ok'<|im_end|>"
    ids = a.encode(text).ids
    assert a.get_vocab() == b.get_vocab()
    assert b.encode(text).ids == ids
    assert b.decode(ids, skip_special_tokens=False) == text
    assert b.decode(ids) == a.decode(ids)  # the same tokens are special
    src_config = json.loads((src / "tokenizer_config.json").read_text())
    out_config = json.loads((out / "tokenizer_config.json").read_text())
    assert out_config["chat_template"] == src_config["chat_template"]
    assert out_config["eos_token"] == "<|im_end|>"
    assert out_config["added_tokens_decoder"]["151667"] == {**out_config["added_tokens_decoder"]["151667"],
                                                            "content": "<think>", "special": False}
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (151643, 151645)


def test_k_quants_dequantize_as_llama_cpp(tmp_path):
    """Random Q4_K/Q5_K/Q6_K blocks (with sane fp16 scales) read back equal to gguf's reference formulas."""
    rng = np.random.default_rng(0)
    file = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(file), "qwen3")
    raw = {}
    for name, qtype, scale_at in (("q4k", "Q4_K", (0, 2)), ("q5k", "Q5_K", (0, 2)), ("q6k", "Q6_K", (208,))):
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        blocks = rng.integers(0, 256, (6 * 2, size), dtype=np.uint8)  # 6 rows of 2 blocks (512 columns)
        for at in scale_at:  # d (and dmin): small positive halves, not random bit patterns
            blocks[:, at:at + 2] = np.frombuffer(np.full(len(blocks), 0.01, np.float16).tobytes(),
                                                 np.uint8).reshape(-1, 2)
        data = blocks.reshape(6, 2 * size)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        raw[name] = (data, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = read_header(file)
    for name, (data, qt) in raw.items():
        info = header.tensors[name]
        assert info.shape == (6, 512) and info.ggml_type == qt.name
        assert np.array_equal(load_tensor(file, info), gguf.quants.dequantize(data, qt))


def test_header_reads_as_gguf_reader_does(tmp_path):
    """Our bounded parser against the gguf package's reader on a small file with every value type."""
    file = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(file), "qwen3")
    w.add_uint32("a.u32", 7)
    w.add_int64("a.i64", -3)
    w.add_float32("a.f32", 0.1)
    w.add_float64("a.f64", 1e-300)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "héllo")
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.floats", [0.5, 1.5])
    w.add_array("a.strs", ["x", "yz", ""])
    rng = np.random.default_rng(1)
    w.add_tensor("f32", rng.standard_normal((3, 4, 32)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((5, 64)).astype(np.float16))
    for qtype in ("Q8_0", "Q4_0", "BF16"):
        data = gguf.quants.quantize(rng.standard_normal((2, 7, 64)).astype(np.float32),
                                    gguf.GGMLQuantizationType[qtype])
        w.add_tensor(qtype.lower(), data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, theirs = read_header(file), gguf.GGUFReader(str(file))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.shape, info.ggml_type, info.offset, info.nbytes) == \
            (tuple(reversed(t.shape.tolist())), t.tensor_type.name, t.data_offset, t.n_bytes)
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
        assert np.array_equal(load_tensor(file, info), expected), t.name


# --- hostile files ------------------------------------------------------------------------------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def gguf_file(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"\0" * 64, version: int = 3,
              n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH_KV = kv("general.architecture", 8, s("qwen3"))
HOSTILE = {
    "empty": (b"", "shorter than a GGUF header"),
    "bad_magic": (b"GGML" + b"\0" * 60, "does not start with the GGUF magic"),
    "version_1": (gguf_file(version=1), "version 1"),
    "version_999": (gguf_file(version=999), "version 999"),
    "truncated": (gguf_file([ARCH_KV])[:40], "metadata key (20 bytes) runs past the end of the file"),
    "tensor_count_2_62": (gguf_file(n_tensors=2**62), "tensor count 4611686018427387904 needs more bytes"),
    "kv_count_2_62": (gguf_file(n_kv=2**62), "metadata count 4611686018427387904 needs more bytes"),
    "key_length_2_60": (gguf_file([struct.pack("<Q", 2**60) + b"x" * 40]), "metadata key (1152921504606846976 bytes)"),
    "string_length_2_60": (gguf_file([s("k") + struct.pack("<IQ", 8, 2**60)]), "k (1152921504606846976 bytes)"),
    "array_length_2_60": (gguf_file([kv("k", 9, struct.pack("<IQ", 4, 2**60))]), "k length 1152921504606846976"),
    "string_array_2_60": (gguf_file([kv("k", 9, struct.pack("<IQ", 8, 2**60))]), "k length 1152921504606846976"),
    "bad_value_type": (gguf_file([kv("k", 13, b"\0" * 8)]), "k has unknown value type 13"),
    "bad_item_type": (gguf_file([kv("k", 9, struct.pack("<IQ", 77, 1))]), "k has unknown item type 77"),
    "nested_arrays": (gguf_file([kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) +
                                    struct.pack("<IQ", 4, 1) + b"\0" * 4)]), "nests arrays more than 2 deep"),
    "duplicate_key": (gguf_file([ARCH_KV, ARCH_KV]), "metadata key general.architecture appears twice"),
    "key_not_utf8": (gguf_file([kv("k", 8, s(b"\xff\xfe"))]), "k is not UTF-8"),
    "999_dimensions": (gguf_file([ARCH_KV], [s("t") + struct.pack("<I", 999) + b"\0" * 64]), "999 dimensions"),
    "zero_dimensions": (gguf_file([ARCH_KV], [tensor("t", [])]), "0 dimensions"),
    "zero_size": (gguf_file([ARCH_KV], [tensor("t", [4, 0])]), "a zero dimension"),
    "unknown_ggml_type": (gguf_file([ARCH_KV], [tensor("t", [4], 99)]), "unknown ggml type 99"),
    "unsupported_type": (gguf_file([ARCH_KV], [tensor("t", [4], 24)]), "I8, which qwen-mlx does not import"),
    "partial_block": (gguf_file([ARCH_KV], [tensor("t", [40], 8)]), "not whole Q8_0 blocks of 32"),
    "dimension_overflow": (gguf_file([ARCH_KV], [tensor("t", [2**63, 2**63, 2**63])]), "runs past the end"),
    "offset_past_eof": (gguf_file([ARCH_KV], [tensor("t", [4], 0, 2**40)]), "runs past the end of the file"),
    "misaligned_offset": (gguf_file([ARCH_KV], [tensor("t", [4], 0, 4)]), "not a multiple of the alignment 32"),
    "overlapping": (gguf_file([ARCH_KV], [tensor("a", [8]), tensor("b", [8], 0, 0)]), "tensor b overlaps"),
    "duplicate_tensor": (gguf_file([ARCH_KV], [tensor("a", [4]), tensor("a", [4], 0, 32)]), "a repeated name"),
    "bad_alignment": (gguf_file([kv("general.alignment", 4, struct.pack("<I", 24))]), "alignment 24"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_one_clear_error(tmp_path, case):
    raw, message = HOSTILE[case]
    file = tmp_path / "hostile.gguf"
    file.write_bytes(raw)
    with pytest.raises(GGUFError) as e:
        read_header(file)
    assert str(e.value).startswith(f"{file}: ") and message in str(e.value) and "\n" not in str(e.value)


CANARY_NAME = "escaped.txt"
# A template that would create the canary (in the working directory) if anything rendered it outside the sandbox.
ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch " + CANARY_NAME + "') }}"
ESCAPE_KV = kv("tokenizer.chat_template", 8, s(ESCAPE))
CLI_HOSTILE = {name: raw for name, (raw, _) in HOSTILE.items()}
CLI_HOSTILE["escape_template_then_999_dimensions"] = gguf_file(
    [ARCH_KV, ESCAPE_KV], [s("t") + struct.pack("<I", 999) + b"\0" * 64])
CLI_HOSTILE["escape_template_then_offset_past_eof"] = gguf_file(
    [ARCH_KV, ESCAPE_KV], [tensor("t", [4], 0, 2**40)])


# Each file is refused in-process above; through the CLI (a process each) the default run takes every fifth and
# the template escapes, CI all of them.
@pytest.mark.parametrize("case", [case if i % 5 == 0 or case.startswith("escape_template") else
                                  pytest.param(case, marks=pytest.mark.slow) for i, case in enumerate(sorted(CLI_HOSTILE))])
def test_hostile_gguf_through_the_cli(tmp_path, case):
    """`qwen-mlx convert FILE.gguf OUT`: one line on stderr, exit 2, no traceback, under 5 s, nothing written."""
    canary = tmp_path / CANARY_NAME
    file = tmp_path / "hostile.gguf"
    file.write_bytes(CLI_HOSTILE[case])
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "convert", str(file), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    seconds = time.perf_counter() - start
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"qwen-mlx: error: {file}: "), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert seconds < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.gguf"]  # no OUT, no partial dir, no lock
    assert not canary.exists()


def test_cli_gguf_corpus_is_large_enough():
    assert len(CLI_HOSTILE) >= 15


def small_model_gguf(path: Path, block_count: int = 1, **metadata) -> Path:
    """A one-layer qwen3 header whose tensors are right, for the checks after the header."""
    u32 = lambda v: (4, struct.pack("<I", v))  # noqa: E731
    kvs = {"general.architecture": (8, s(metadata.pop("arch", "qwen3"))), "qwen3.block_count": u32(block_count),
           "qwen3.embedding_length": u32(32), "qwen3.attention.head_count": u32(2),
           "qwen3.feed_forward_length": u32(64)}
    kvs.update(metadata)
    body = [kv(k, t, p) for k, (t, p) in kvs.items()]
    path.write_bytes(gguf_file(body, [tensor("token_embd.weight", [32, 10]), tensor("blk.0.attn_norm.weight", [32],
                                                                               0, 1280)], data=b"\0" * 1408))
    return path


@pytest.mark.parametrize("change,message", [
    ({"arch": "llama"}, "architecture 'llama' is not a Qwen model"),
    ({"block_count": 4}, "qwen3.block_count is 4 but the file has tensors for layers 0..0"),
    ({"tokenizer.ggml.eos_token_id": (4, struct.pack("<I", 10))}, "eos_token_id 10 is not a token id below 10"),
    ({"qwen3.attention.head_count": (8, s("two"))}, "qwen3.attention.head_count must be int, got 'two'"),
])
def test_model_checks_after_the_header(tmp_path, change, message):
    with pytest.raises(GGUFError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_gguf(small_model_gguf(tmp_path / "m.gguf", **change))
