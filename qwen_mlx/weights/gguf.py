"""Read a Qwen GGUF file (llama.cpp's format) as a checkpoint: config, tensors by the model's names, tokenizer.
The file itself is read by gguf_file (a bounded header parse); the hybrid models' keys and transforms are
gguf_hybrid's.

llama.cpp writes Qwen2/Qwen3 Q and K projections unpermuted (its Qwen models use NeoX-style RoPE, the Hugging Face
layout; only the Llama converter permutes), so no un-permutation is needed. Blocks past block_count -
nextn_predict_layers (the hybrids' multi-token-prediction head) are not imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from qwen_mlx.models.config import ARCHITECTURES, HYBRID_MODEL_TYPES
from qwen_mlx.weights.gguf_file import GGUFError, Metadata, TensorInfo, load_tensor, read_header
from qwen_mlx.weights.gguf_hybrid import hybrid_config, hybrid_tensors
from qwen_mlx.weights.names import GGUF_UNUSED, gguf_layer, gguf_name

MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",  # llama.cpp architecture -> ours
               "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe", "qwen3next": "qwen3_next"}

# The pre-tokenizer splits of llama.cpp's "qwen2" (Qwen2, 2.5 and 3) and "qwen35" (Qwen3.5 and later: combining
# marks \p{M} stay with their letters) pre-tokenizers, as their tokenizer.json files state them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"qwen2": QWEN2_SPLIT, "qwen35": QWEN35_SPLIT}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass
class GGUFCheckpoint:
    """What convert needs: a Hugging Face config.json, the tensors by HF name with lazy loaders, and files."""

    config: dict
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], mx.array]]]
    files: dict[str, bytes]


# --- Qwen model, config and tokenizer -------------------------------------------------------------------------

def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """A Qwen2/Qwen3/Qwen3-MoE or hybrid (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) GGUF file as a checkpoint by the
    model's tensor names and values (tensors read when loaded)."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise GGUFError(f"{path}: architecture {arch!r} is not a Qwen model qwen-mlx runs "
                        f"({', '.join(MODEL_TYPES)})")
    get = Metadata(path, arch, meta)
    n_blocks = get("block_count", int)
    nextn = get("nextn_predict_layers", int, 0) if MODEL_TYPES[arch] in HYBRID_MODEL_TYPES else 0
    if not 0 <= nextn < n_blocks:
        raise GGUFError(f"{path}: {arch}.nextn_predict_layers {nextn} leaves no layers of the {n_blocks} blocks")
    n_layers = n_blocks - nextn  # the blocks after them are the multi-token-prediction head
    infos: dict[str, TensorInfo] = {}  # by Hugging Face name
    layers = set()
    for name, info in header.tensors.items():
        if name in GGUF_UNUSED:
            continue
        layer = gguf_layer(name)
        if layer is not None:
            layers.add(layer)
            if layer >= n_layers:
                continue
        hf_name = gguf_name(name)
        if hf_name is None:
            raise GGUFError(f"{path}: tensor {name} is not part of a {arch} model")
        infos[hf_name] = info
    if layers != set(range(n_blocks)):
        raise GGUFError(f"{path}: {arch}.block_count is {n_blocks} but the file has tensors for layers "
                        f"{min(layers, default=0)}..{max(layers, default=-1)}")
    config = _config(path, arch, get, header.tensors, n_layers)
    if config["model_type"] in HYBRID_MODEL_TYPES:
        tensors = hybrid_tensors(path, infos, config)
    else:
        tensors = {hf_name: (info.shape, lambda info=info: mx.array(load_tensor(path, info)))
                   for hf_name, info in infos.items()}
    files = _tokenizer_files(path, meta, config)
    return GGUFCheckpoint(config, tensors, files)


def _config(path: Path, arch: str, get: Metadata, tensors: dict[str, TensorInfo], n_layers: int) -> dict:
    model_type = MODEL_TYPES[arch]
    meta = get.meta
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    hidden, heads = get("embedding_length", int), get("attention.head_count", int)
    vocab = tensors["token_embd.weight"].shape[0]
    cfg = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", int, heads),
        "head_dim": get("attention.key_length", int, hidden // heads if heads else 0),
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-6),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "max_position_embeddings": get("context_length", int, 32768),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if all(t.ggml_type in ("BF16", "F32") for t in tensors.values()) else "float16",
    }
    dense = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
    if dense:
        cfg["intermediate_size"] = get("feed_forward_length", int)
    if model_type in ("qwen3_moe", "qwen3_next"):
        cfg.update(num_experts=get("expert_count", int), num_experts_per_tok=get("expert_used_count", int),
                   moe_intermediate_size=get("expert_feed_forward_length", int),
                   # llama.cpp's qwen3moe graph always renormalizes the top-k weights, as Qwen3-MoE configs say
                   norm_topk_prob=get("expert_weights_norm", bool, True),
                   decoder_sparse_step=1, mlp_only_layers=dense)
    if model_type in HYBRID_MODEL_TYPES:
        cfg.update(hybrid_config(path, get, tensors, n_layers, cfg, dense))
    if meta.get(f"{arch}.rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": get("rope.scaling.factor", float),
                               "original_max_position_embeddings": get("rope.scaling.original_context_length", int)}
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise GGUFError(f"{path}: tokenizer.ggml.{gguf_key} {value!r} is not a token id below {vocab}")
            cfg[key] = value
    return cfg


def _tokenizer_files(path: Path, meta: dict, config: dict) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json rebuilt from the GGUF vocabulary (none if the file has none)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return {}
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "qwen2")
    if model != "gpt2" or pre not in SPLITS:
        raise GGUFError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not Qwen's (gpt2 with "
                        f"{' or '.join(SPLITS)})")
    types = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges", [])
    if not (isinstance(tokens, list) and isinstance(types, list) and isinstance(merges, list)) \
            or len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens + merges):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens, token_type and merges must be lists of one length, "
                        "of strings")
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(f"{path}: {len(tokens)} tokens but only {config['vocab_size']} embedding rows")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise GGUFError(f"{path}: tokenizer.ggml.merges has an entry that is not two tokens")

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
    added = [(i, t, kind == _CONTROL) for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (_CONTROL, _USER_DEFINED)]
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the library names the merge whose tokens are not in the vocabulary
        raise GGUFError(f"{path}: the GGUF vocabulary does not make a BPE tokenizer ({' '.join(str(e).split())})") \
            from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for _, t, special in added])
    for i, t, _ in added:  # the library numbers added tokens after the vocabulary: they must land on their ids
        if tok.token_to_id(t) != i:
            raise GGUFError(f"{path}: added token {t!r} (id {i}) does not follow the regular vocabulary")

    def token(key: str) -> str | None:
        i = config.get(key)
        return tokens[i] if i is not None and i < len(tokens) else None

    tokenizer_config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": special} for i, t, special in added},
        "bos_token": None,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("eos_token_id"),
        "errors": "replace",
        "model_max_length": config["max_position_embeddings"],
        "pad_token": token("pad_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if tokenizer_config["chat_template"] is None:
        del tokenizer_config["chat_template"]
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode()}
