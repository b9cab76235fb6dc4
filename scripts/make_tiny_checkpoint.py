"""Write tiny Qwen checkpoints with random weights in the real Hugging Face layout.

Real vocabulary (151,936 ids, so every token id is real), tiny hidden sizes. Used by the tests and benchmarks:

    python scripts/make_tiny_checkpoint.py OUT_DIR --variant qwen3 --dtype bfloat16 [--tokenizer-dir DIR]

The hybrid variants (HYBRID_VARIANTS: qwen3_5, qwen3_5_moe, qwen3_next) are written by transformers itself, with
their weights redrawn at a trained model's spread; they vary what the released models fix (layer order, head
counts and dims, partial rotary, expert layout, rope spelling, tied head, dense layers among MoE ones).
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


HYBRID_VOCAB = 151680  # the tokenizer's 151,669 ids fit; not Qwen3's 151,936 nor Qwen3.5's 248,320
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
               linear_conv_kernel_dim=4)
_HYBRID = dict(vocab_size=HYBRID_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096, **_LINEAR)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [4, 2, 2]}

# name -> (transformers class, text config, top-level keys, checkpoint form). Forms: "rope_top_level" moves
# rope_parameters' theta and partial_rotary_factor to the top level (the older spelling); "stacked" writes each
# MoE layer's experts as two stacks (mlp.experts.gate_up_proj (E, 2I, H), mlp.experts.down_proj (E, H, I)), as
# the hub's Qwen3.5-MoE files do. mlx-lm assumes full_attention_interval's pattern: the *_default variants keep it.
HYBRID_VARIANTS: dict[str, tuple[str, dict, dict, tuple[str, ...]]] = {
    # image-text layout, layers in a non-default order, tied head, rope_parameters spelling
    "qwen3_5": ("Qwen3_5ForConditionalGeneration",
                dict(_HYBRID, intermediate_size=96, rope_parameters=_ROPE,
                     layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
                dict(tie_word_embeddings=True), ()),
    "qwen3_5_default": ("Qwen3_5ForConditionalGeneration",
                        dict(_HYBRID, intermediate_size=96, rope_parameters=_ROPE, full_attention_interval=4),
                        dict(tie_word_embeddings=False), ()),
    # text-only class, experts one by one, rope spelled at the top level, untied
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM",
                    dict(_HYBRID, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, rope_parameters=_ROPE,
                         layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"]),
                    {}, ("rope_top_level",)),
    # the hub's layout: image-text, stacked experts
    "qwen3_5_moe_default": ("Qwen3_5MoeForConditionalGeneration",
                            dict(_HYBRID, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, rope_parameters=_ROPE,
                                 full_attention_interval=4),
                            dict(tie_word_embeddings=False), ("stacked",)),
    # interleaved projections, a dense layer among the MoE ones (mlp_only_layers), untied
    "qwen3_next": ("Qwen3NextForCausalLM",
                   dict(_HYBRID, intermediate_size=80, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                        mlp_only_layers=[1], rope_parameters={k: v for k, v in _ROPE.items() if k != "mrope_section"},
                        full_attention_interval=4),
                   {}, ("rope_top_level",)),
}


def write_hybrid_checkpoint(out_dir: Path, variant: str, *, seed: int = 0, tokenizer_dir: Path | None = None,
                            mtp: bool = False) -> Path:
    """A tiny hybrid checkpoint written by transformers' own class (float32), weights redrawn with `seed`; with
    `mtp`, plus a random MTP head (`mtp.*`, see add_mtp_head)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    cls_name, text, top, forms = HYBRID_VARIANTS[variant]
    cls = getattr(transformers, cls_name)
    config_cls = cls.config_class
    if cls_name.endswith("ForConditionalGeneration"):  # image-text: a nested text config and a vision tower
        config = config_cls(text_config=dict(text, tie_word_embeddings=top.get("tie_word_embeddings", False)),
                            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                               out_hidden_size=text["hidden_size"]), **top)
    else:
        config = config_cls(**text, **top)
    torch.manual_seed(seed)
    model = cls(config).eval()
    _redraw(model, tied=config.get_text_config().tie_word_embeddings, seed=seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if "stacked" in forms:
        _stack_experts(out_dir / "model.safetensors", load_file, save_file)
    if mtp:
        add_mtp_head(out_dir / "model.safetensors", model, stacked="stacked" in forms, seed=seed)
    if "rope_top_level" in forms:
        raw = json.loads((out_dir / "config.json").read_text())
        body = raw.get("text_config", raw)
        rope = body.pop("rope_parameters")
        body.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
        (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir


def _redraw(model, *, tied: bool, seed: int) -> None:
    """Weights at a trained model's spread, so that logits are spread out and greedy decoding has no near-ties:
    linear layers N(0, 1/fan_in) (output projections and the head x2), zero-centred norms N(0, 0.2) (the tied
    head's final norm zero-mean, or it scores the input token highest), decay rates and conv taps of real size."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1) - 3)  # decays exp(-A softplus)
            elif name.endswith("dt_bias"):
                p.copy_(normal(p.shape, 1.0))
            elif name.endswith("conv1d.weight"):
                p.copy_(normal(p.shape, 0.5))
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + normal(p.shape, 0.2))  # the gated norm is a plain scale
            elif p.ndim == 1:  # zero-centred norms: x * (1 + w)
                final = name.endswith("model.norm.weight") or name.endswith("language_model.norm.weight")
                p.copy_(normal(p.shape, 0.5) - 1.0 if tied and final else normal(p.shape, 0.2))
            elif "embed_tokens" in name:
                p.copy_(normal(p.shape, 1.0))
            else:
                gain = 2.0 if "lm_head" in name else 1.0
                p.copy_(normal(p.shape, gain * p.shape[-1] ** -0.5))


def mtp_layer(model):
    """A fresh full-attention decoder layer of `model`'s own transformers class, built as layer 0 (the MTP head's
    `mtp.layers.0`: MoE exactly when the model's layer 0 is)."""
    import copy

    text = copy.deepcopy(model.config.get_text_config())
    text.layer_types = ["full_attention", *text.layer_types[1:]]
    text._attn_implementation = "eager"
    layer_cls = next(type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    return layer_cls(text, 0).eval()


def add_mtp_head(file: Path, model, *, stacked: bool, seed: int) -> None:
    """Append a random MTP head to the checkpoint file in the hub's names: mtp.fc (H, 2H), the zero-centred norms
    mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden and mtp.norm, and mtp.layers.0.* (mtp_layer's weights,
    experts one by one, or as the hub's two stacks when `stacked`). Drawn from their own generator, so the model's
    weights are those of the checkpoint without the head."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.get_text_config().hidden_size
    layer = mtp_layer(model)
    head = {f"layers.0.{name}": p.detach() for name, p in layer.state_dict().items()}
    head.update({"fc.weight": torch.zeros(hidden, 2 * hidden), "norm.weight": torch.zeros(hidden),
                 "pre_fc_norm_embedding.weight": torch.zeros(hidden), "pre_fc_norm_hidden.weight": torch.zeros(hidden)})
    tensors = load_file(str(file))
    for name in sorted(head):
        p = head[name]
        if p.ndim == 1:  # zero-centred norms: x * (1 + w)
            value = torch.randn(p.shape, generator=gen) * 0.2
        else:  # linear layers and expert stacks (E, out, in): N(0, 1 / fan_in)
            value = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
        experts = name.rsplit(".", 1)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and not stacked:
            if experts[1] == "gate_up_proj":
                parts = dict(zip(("gate_proj", "up_proj"), value.chunk(2, dim=1)))
            else:
                parts = {"down_proj": value}
            for proj, stack in parts.items():
                for e in range(stack.shape[0]):
                    tensors[f"mtp.{experts[0]}.{e}.{proj}.weight"] = stack[e].contiguous()
        else:
            tensors[f"mtp.{name}"] = value.contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


def _stack_experts(file: Path, load_file, save_file) -> None:
    """Rewrite per-expert tensors (experts.{e}.gate_proj/up_proj/down_proj.weight) as the hub's two stacks."""
    import re

    import torch

    tensors = load_file(str(file))
    pattern = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in list(tensors):
        m = pattern.match(name)
        if m:
            pieces.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensors.pop(name)
    for prefix, projs in pieces.items():
        stack = {k: torch.stack([v[e] for e in sorted(v)]) for k, v in projs.items()}
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1).contiguous()
        tensors[f"{prefix}.down_proj"] = stack["down_proj"].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", choices=sorted([*VARIANTS, *HYBRID_VARIANTS]), default="qwen3")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", type=Path,
                    help="copy tokenizer files from here (default: write Qwen3's tokenizer, see make_tokenizer.py)")
    ap.add_argument("--mtp", action="store_true", help="hybrid variants: add a random MTP head (mtp.*)")
    ap.add_argument("--opens-thinking", action="store_true",
                    help="write a chat_template.jinja whose generation prompt opens the think block, as thinking-only "
                         "checkpoints (e.g. Qwen3-4B-Thinking-2507) do: a random model then always 'thinks'")
    args = ap.parse_args()
    if args.mtp and args.variant not in HYBRID_VARIANTS:
        ap.error(f"--mtp: only the hybrid variants ({', '.join(HYBRID_VARIANTS)}) have an MTP head")
    if args.variant in HYBRID_VARIANTS:
        write_hybrid_checkpoint(args.out_dir, args.variant, seed=args.seed, tokenizer_dir=args.tokenizer_dir,
                                mtp=args.mtp)
    else:
        write_tiny_checkpoint(args.out_dir, args.variant, args.dtype, seed=args.seed,
                              tokenizer_dir=args.tokenizer_dir)
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
