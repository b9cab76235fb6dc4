"""Write tiny Qwen checkpoints with random weights in the real Hugging Face layout.

Real vocabulary (151,936 ids, so every token id is real), tiny hidden sizes. Used by the tests and benchmarks:

    python scripts/make_tiny_checkpoint.py OUT_DIR --variant qwen3 --dtype bfloat16 [--tokenizer-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

VOCAB = 151936
_COMMON = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=151643,
               eos_token_id=151645, hidden_act="silu", initializer_range=0.02, use_cache=True)

VARIANTS: dict[str, dict] = {
    # Qwen3 dense, tied embeddings; head_dim stated explicitly and != hidden_size // heads, as in real Qwen3.
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                  rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False),
    # Qwen2.5: QKV bias, untied LM head, head_dim derived, written as two shards with an index.
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=1000000.0,
                  tie_word_embeddings=False, sliding_window=None, use_sliding_window=False),
    # Qwen3 with YaRN; a small original context so that the test prompts run past it.
    "qwen3_yarn": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, intermediate_size=128,
                       rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                       max_position_embeddings=256,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen3-MoE: 8 experts, top-2, layer 1 dense (mlp_only_layers).
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1000000.0,
                      tie_word_embeddings=False, attention_bias=False, router_aux_loss_coef=0.001),
}

GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                     "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors. Scales are larger than a trained model's so that logits are spread
    out and greedy decoding has no near-ties between implementations."""
    rng = np.random.default_rng(seed)
    d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads

    def linear(out_dim, in_dim):
        return rng.normal(0, in_dim**-0.5, (out_dim, in_dim)).astype(np.float32)

    def norm(dim):
        return (1.0 + 0.2 * rng.standard_normal(dim)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.normal(0, 1.0, (cfg["vocab_size"], d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    if cfg["tie_word_embeddings"]:
        # A zero-mean final norm, or the tied head scores the input token highest and greedy repeats it forever.
        w["model.norm.weight"] = rng.standard_normal(d).astype(np.float32)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(cfg["vocab_size"], d) * 4
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = linear(heads * hd, d) * 2
        w[p + "self_attn.k_proj.weight"] = linear(kv * hd, d) * 2
        w[p + "self_attn.v_proj.weight"] = linear(kv * hd, d)
        w[p + "self_attn.o_proj.weight"] = linear(d, heads * hd) * 3  # mix the residual stream well away from
        # the input embedding, or a tied head just predicts the input token again
        if cfg["model_type"] == "qwen2":
            for name, dim in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                w[p + f"self_attn.{name}_proj.bias"] = rng.normal(0, 0.5, dim).astype(np.float32)
        else:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        if cfg.get("num_experts") and i not in cfg.get("mlp_only_layers", []):
            e, h = cfg["num_experts"], cfg["moe_intermediate_size"]
            w[p + "mlp.gate.weight"] = linear(e, d) * 4
            for j in range(e):
                q = p + f"mlp.experts.{j}."
                w[q + "gate_proj.weight"], w[q + "up_proj.weight"] = linear(h, d), linear(h, d)
                w[q + "down_proj.weight"] = linear(d, h) * 3
        else:
            h = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = linear(h, d), linear(h, d)
            w[p + "mlp.down_proj.weight"] = linear(d, h) * 3
    return w


def write_tiny_checkpoint(out_dir: Path, variant: str, dtype: str = "float32", *, seed: int = 0,
                          tokenizer_dir: Path | None = None, overrides: dict | None = None) -> Path:
    """Write config.json, safetensors weights (qwen2: two shards + index), generation_config.json and, from
    `tokenizer_dir`, the tokenizer files. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**_COMMON, **VARIANTS[variant], **(overrides or {}), "torch_dtype": dtype}
    mx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype]
    weights = {k: mx.array(v).astype(mx_dtype) for k, v in random_weights(cfg, seed).items()}
    names = sorted(weights)
    shards = [names] if variant != "qwen2" else [names[: len(names) // 2], names[len(names) // 2:]]
    if len(shards) == 1:
        mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(out_dir / file), {k: weights[k] for k in shard}, metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        total = sum(v.nbytes for v in weights.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="qwen3")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", type=Path,
                    help="copy tokenizer files from here (default: write Qwen3's tokenizer, see make_tokenizer.py)")
    ap.add_argument("--opens-thinking", action="store_true",
                    help="write a chat_template.jinja whose generation prompt opens the think block, as thinking-only "
                         "checkpoints (e.g. Qwen3-4B-Thinking-2507) do: a random model then always 'thinks'")
    args = ap.parse_args()
    write_tiny_checkpoint(args.out_dir, args.variant, args.dtype, seed=args.seed, tokenizer_dir=args.tokenizer_dir)
    if args.tokenizer_dir is None:  # a checkpoint that `qwen-mlx generate` and `chat` can run as it is
        from make_tokenizer import write_qwen_tokenizer

        write_qwen_tokenizer(args.out_dir)
    if args.opens_thinking:
        from make_tokenizer import CHAT_TEMPLATE

        prompt = "{{- '<|im_start|>assistant\\n' }}"
        assert CHAT_TEMPLATE.count(prompt) == 1
        (args.out_dir / "chat_template.jinja").write_text(
            CHAT_TEMPLATE.replace(prompt, "{{- '<|im_start|>assistant\\n<think>\\n' }}"))
    print(args.out_dir)


if __name__ == "__main__":
    main()
