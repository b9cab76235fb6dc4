"""`qwen-mlx` command line. Subcommands import their modules only when they run, so `--help` is instant."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _info(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .loader import load_model

    model, path = load_model(args.model)
    cfg = model.config
    params = tree_flatten(model.parameters())
    n_bytes = sum(p.nbytes for _, p in params)
    print(f"checkpoint   {path}")
    print(f"model        {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads of {cfg.head_dim}")
    if cfg.num_experts:
        print(f"experts      {cfg.num_experts} experts, {cfg.num_experts_per_tok} active, "
              f"intermediate {cfg.moe_intermediate_size}")
    else:
        print(f"mlp          intermediate {cfg.intermediate_size}")
    rope = f"theta {cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope += (f", YaRN x{cfg.rope_scaling.factor:g} from {cfg.rope_scaling.original_max_position_embeddings}")
    print(f"rope         {rope}; context {cfg.max_position_embeddings}")
    print(f"vocab        {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} LM head")
    quant = cfg.quantization
    print(f"weights      {n_bytes / 2**20:.1f} MiB, "
          + (f"{quant['bits']}-bit group {quant['group_size']}" if quant else cfg.torch_dtype))
    print(f"device       {mx.default_device()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-mlx", description="Fast, faithful Qwen3 inference on MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="describe a checkpoint and check that it loads",
                          description="Load a checkpoint (directory or hub id), check every tensor, describe it.")
    info.add_argument("-m", "--model", required=True, metavar="PATH",
                      help="checkpoint directory or Hugging Face hub id (e.g. Qwen/Qwen3-0.6B)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
