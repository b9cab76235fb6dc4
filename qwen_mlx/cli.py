"""`qwen-mlx` command line. Subcommands import their modules only when they run, so `--help` is instant."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _info(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .loader import check_finite, load_model

    model, path = load_model(args.model)
    if args.check:
        check_finite(model)
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
    if args.check:
        print("check        every tensor is finite")


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from . import bench

    sources = ([args.model] if args.model else []) + (args.preset or ([] if args.model else ["qwen3-0.6b"]))
    print(bench.HEADER)
    result = bench.run(sources, args.bits, args.prompt_tokens, args.gen_tokens, layers=args.layers,
                       repeats=args.repeats, warmup=args.warmup, with_mlx_lm=not args.no_mlx_lm,
                       bandwidth=args.bandwidth, seed=args.seed)
    if result["ratios"]:
        print()
        print(bench.format_ratios(result))
    if args.json:
        bench.write_json(result, Path(args.json))
        print(f"\nwrote {args.json}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def _bits_list(text: str) -> list[str]:
    values = text.split(",")
    bad = [v for v in values if v not in ("bf16", "8", "4")]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be bf16, 8 or 4, got {bad[0]!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-mlx", description="Fast, faithful Qwen3 inference on MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="describe a checkpoint and check that it loads",
                          description="Load a checkpoint (directory or hub id), check every tensor, describe it.")
    info.add_argument("-m", "--model", required=True, metavar="PATH",
                      help="checkpoint directory or Hugging Face hub id (e.g. Qwen/Qwen3-0.6B)")
    info.add_argument("--check", action="store_true", help="also read every weight and report any NaN or infinity")
    info.set_defaults(run=_info)

    from .bench import PRESETS  # a plain dict; importing it is cheap

    bench = sub.add_parser(
        "bench", help="measure prefill/decode speed and memory, side by side with mlx-lm",
        description="Benchmark generation on random weights with a real model's shape (no download) or on a "
                    "checkpoint. Each case runs through qwen-mlx and, on the same weights, through mlx-lm's own "
                    "generate_step; the table gives tok/s, time to first token, peak memory and the fraction of "
                    "the memory-bandwidth roofline (weight bytes read per token x tok/s / bandwidth).")
    bench.add_argument("--preset", action="append", choices=sorted(PRESETS),
                       help="model shape with random weights; repeat for several (default: qwen3-0.6b)")
    bench.add_argument("-m", "--model", metavar="PATH", help="a checkpoint directory or hub id instead of a preset")
    bench.add_argument("--bits", type=_bits_list, default=["4"], metavar="LIST",
                       help="weight formats for presets, comma-separated from bf16,8,4 (default: 4)")
    bench.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers of a preset "
                       "(a layer stack of the real shape, for big models on small machines)")
    bench.add_argument("--prompt-tokens", type=_int_list, default=[128], metavar="LIST",
                       help="prompt lengths, comma-separated (default: 128)")
    bench.add_argument("--gen-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    bench.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per case; the median is "
                       "reported (default: 3)")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default: 1)")
    bench.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm side (no ratios)")
    bench.add_argument("--bandwidth", type=float, metavar="GB/S", help="memory bandwidth for the roofline "
                       "(default: from a table of Apple and NVIDIA chips, else measured with a copy benchmark)")
    bench.add_argument("--seed", type=int, default=0, help="random weights and prompt seed (default: 0)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON (schema qwen-mlx-bench/1)")
    bench.set_defaults(run=_bench)
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
