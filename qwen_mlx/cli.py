"""`qwen-mlx` command line: the argument parsers and the exit codes. The subcommands' bodies (commands.py) import
their modules only when they run, so `--help` is instant."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from qwen_mlx import commands
from qwen_mlx.errors import UserError, one_line
from qwen_mlx.flags import number
from qwen_mlx.quant_formats import QUANT_FORMATS
from qwen_mlx.terminal import printable

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
# bench: the first token is prefill's and the memory peak is reset after it, so decode is timed on the others
MIN_GEN_TOKENS = 4
AFFINE_GROUP_SIZES = QUANT_FORMATS["affine"][1]


def _launch(args: argparse.Namespace) -> None:
    from qwen_mlx.distributed.launch import launch

    if args.hosts and args.n:
        raise UserError("give --hosts or -n, not both")
    hosts = args.hosts.split(",") if args.hosts else ["127.0.0.1"] * (args.n or 2)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    code = launch(hosts, command, python=args.python, port=args.port, main=main)
    if code:
        raise SystemExit(code)


def _add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("-m", "--model", default=default, required=default is None, metavar="PATH",
                        help="checkpoint directory or Hugging Face hub id"
                             + (f" (default: {default})" if default else ""))


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                        help="let Qwen3 think before answering (default: on; --no-think for a direct answer)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument("--max-tokens", type=number(int, low=1),
                        default=1024, metavar="N", help="most tokens to generate "
                        "(default: 1024)")
    parser.add_argument("--temp", type=number(float, low=0), metavar="T", help="temperature; 0 is greedy (default: the "
                        "checkpoint's recommendation for thinking or non-thinking turns)")
    parser.add_argument("--top-k", type=number(int, low=0), metavar="K", help="keep the K most likely tokens "
                        "(0: all)")
    parser.add_argument("--top-p", type=number(float, above=0, high=1), metavar="P", help="nucleus sampling mass "
                        "(1: off)")
    parser.add_argument("--min-p", type=number(float, low=0, high=1),
                        metavar="P", help="drop tokens below P x the top probability")
    parser.add_argument("--repetition-penalty", type=number(float, above=0),
                        metavar="R", help="penalize recently seen tokens")
    parser.add_argument("--seed", type=number(int, low=0, high=2**63 - 1), help="random seed, for reproducible "
                        "sampling")
    parser.add_argument("--max-kv-size", type=number(int, low=commands.KEEP + 1), metavar="N",
                        help="keep at most N tokens in the KV cache: fixed memory, the first 4 tokens pinned and a "
                             "sliding window over the rest")
    parser.add_argument("--kv-bits", type=int, choices=[4, 8], help="store the KV cache quantized to 4 or 8 bits "
                        "(with --max-kv-size too)")
    parser.add_argument("--kv-group-size", type=int, choices=AFFINE_GROUP_SIZES, help="values per quantization group "
                        "of the KV cache (default: 64, or 32 when 64 does not divide the model's head_dim)")
    parser.add_argument("--force", action="store_true", help="load the model even when the weights and KV cache "
                        "exceed the GPU's recommended working set (Apple silicon)")
    parser.add_argument("--distributed", choices=["pipeline", "tensor", "expert", "auto"], metavar="MODE",
                        help="split the model over the processes (Macs) mlx.launch starts: pipeline, tensor, expert "
                             "or auto (see README, Several Macs); rank 0 answers, the others serve it")
    parser.add_argument("--draft-model", metavar="PATH", help="speculative decoding: a smaller checkpoint with the "
                        "same tokenizer drafts tokens that the model checks several at a time (e.g. Qwen3-0.6B for "
                        "Qwen3-8B); the output is unchanged")
    parser.add_argument("--mtp", action="store_true", help="speculative decoding with the checkpoint's own "
                        "multi-token-prediction head (Qwen3.5, Qwen3-Next: the mtp.* weights); the output is "
                        "unchanged")
    parser.add_argument("--draft-tokens", type=number(int, low=1, high=8), metavar="N",
                        help="tokens drafted per step, 1..8 (default: adapts to how many are accepted, and stops "
                             "drafting when it does not pay)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def _cache_list(text: str) -> list[str]:
    from qwen_mlx.bench.context import CACHE_KINDS

    values = text.split(",")
    bad = [v for v in values if v not in CACHE_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"cache kinds are {', '.join(CACHE_KINDS)}, got {bad[0]!r}")
    return values


def _bits_list(text: str) -> list[str]:
    values = text.split(",")
    bad = [v for v in values if v not in ("bf16", "8", "4")]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be bf16, 8 or 4, got {bad[0]!r}")
    return values


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.upper().rstrip("KMGIB")
    unit = text.upper()[len(number):]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 4096, got {text!r}") from None
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported on one line (no usage block above it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen-mlx", description="Fast, faithful Qwen3 inference on MLX.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug also after the command; SUPPRESS keeps a subcommand from resetting the top-level value
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=lambda **kw: Parser(parents=[debug], **kw))
    info = sub.add_parser("info", help="describe a checkpoint and check that it loads",
                          description="Load a checkpoint (directory or hub id), check every tensor, describe it.")
    info.add_argument("-m", "--model", required=True, metavar="PATH",
                      help="checkpoint directory or Hugging Face hub id (e.g. Qwen/Qwen3-0.6B)")
    info.add_argument("--check", action="store_true", help="also read every weight and report any NaN or infinity")
    info.add_argument("--distributed", type=number(int, low=1),
                      metavar="N", help="also show what each of N ranks (Macs) holds "
                      "in each distributed mode: weights and KV cache")
    info.set_defaults(run=commands.info)

    chat = sub.add_parser("chat", help="the terminal chat app",
                          description="Chat in the terminal: the answer streams as Markdown, the model's thinking "
                                      "in a collapsible block (ctrl+t shows/hides it, /think and /no_think switch "
                                      "it), live tokens/s in the status bar, Esc stops an answer and keeps it.")
    _add_model_argument(chat, DEFAULT_MODEL)
    _add_generation_arguments(chat)
    chat.add_argument("-c", "--continue", dest="resume", action="store_true",
                      help="continue the last conversation with this model")
    chat.add_argument("--history", metavar="FILE", help="where conversations are kept (default: history.sqlite in "
                      "the platform's data directory, e.g. ~/Library/Application Support/qwen-mlx)")
    chat.add_argument("--no-history", action="store_true", help="keep nothing on disk")
    chat.set_defaults(run=commands.chat)

    generate = sub.add_parser("generate", help="answer one prompt, streaming plain text to stdout",
                              description="Answer one prompt with the checkpoint's chat template. The answer "
                                          "streams to stdout as plain text (pipe-friendly, no escape codes); the "
                                          "thinking goes to stderr (dimmed on a terminal) unless --hide-think.")
    _add_model_argument(generate, DEFAULT_MODEL)
    generate.add_argument("-p", "--prompt", required=True, help="the user message; - reads it from stdin")
    _add_generation_arguments(generate)
    generate.add_argument("--prompt-cache", metavar="FILE", help="keep the prompt's cache up to the user message "
                          "(the system prompt) in FILE: made on the first run, reused by the next ones with the "
                          "same model, system prompt and KV settings")
    generate.add_argument("--hide-think", action="store_true", help="do not print the thinking")
    generate.add_argument("-v", "--verbose", action="store_true", help="print speed and memory to stderr at the end")
    generate.set_defaults(run=commands.generate)

    launch = sub.add_parser(
        "launch", help="run generate or chat with --distributed on several Macs, rank 0 in this terminal",
        description="Start `qwen-mlx COMMAND` on every host (ssh; local processes for 127.0.0.1) as the ranks of one "
                    "mx.distributed ring, with rank 0 here in the foreground: what the chat app needs (mlx.launch "
                    "passes the terminal through line by line). The other ranks' output goes to a log file.",
        epilog="example: qwen-mlx launch --hosts 10.0.0.1,10.0.0.2 -- chat -m ~/models/Qwen3-32B-4bit "
               "--distributed auto")
    launch.add_argument("--hosts", metavar="LIST", help="comma-separated hosts, this Mac first: IP addresses the "
                        "ring uses (e.g. Thunderbolt Bridge IPs), also used for ssh")
    launch.add_argument("-n", type=number(int, low=1),
                        metavar="N", help="instead of --hosts: N processes on this machine")
    launch.add_argument("--python", default=sys.executable, metavar="PATH", help="the Python with qwen-mlx on the "
                        "other hosts (default: this one's path)")
    launch.add_argument("--port", type=number(int, low=1, high=65535),
                        default=32323, help="first ring port; rank r uses PORT + r "
                        "(default: 32323)")
    launch.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the qwen-mlx command each rank runs, e.g. -- generate -m MODEL --distributed auto -p hi")
    launch.set_defaults(run=_launch)

    convert = sub.add_parser(
        "convert", help="convert and quantize a Hugging Face, MLX or GGUF checkpoint into an MLX checkpoint",
        description="Convert SRC (a checkpoint directory, a hub id, an MLX checkpoint to re-quantize, or a .gguf "
                    "file) into an MLX checkpoint at OUT that qwen-mlx and mlx-lm both load. Quantizes to 4-bit "
                    "affine, group 64 unless told otherwise. One tensor at a time, so memory stays near one layer; "
                    "OUT appears only when complete.")
    convert.add_argument("src", metavar="SRC", help="checkpoint directory, hub id (e.g. Qwen/Qwen3-0.6B) or .gguf")
    convert.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --force)")
    convert.add_argument("--bits", type=number(int, low=1),
                         metavar="N", help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    convert.add_argument("--group-size", type=number(int, low=1), metavar="N", help="weights per scale: 32, 64 or 128 "
                         "(default 64; mxfp4/mxfp8 use 32, nvfp4 16)")
    convert.add_argument("--mode", default="affine", metavar="MODE",
                         help="quantization format: affine (default), mxfp4, mxfp8 or nvfp4")
    convert.add_argument("--recipe", metavar="NAME", help="mixed precision: mixed_4_6 (4-bit, down_proj 6-bit, "
                         "embeddings and LM head 8-bit), mixed_3_6, mixed_2_6")
    convert.add_argument("--dtype", metavar="TYPE", help="type of unquantized tensors and scales: bf16, fp16 or "
                         "fp32 (default: the source's)")
    convert.add_argument("--dequantize", action="store_true", help="write unquantized weights (e.g. an MLX or GGUF "
                         "checkpoint back to bf16)")
    convert.add_argument("--shard-size", type=_size, default="5GB", metavar="SIZE",
                         help="largest weight file (default 5GB)")
    convert.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert.add_argument("--report", action="store_true", help="measure the quality: relative error per tensor, "
                         "KL divergence and top-1 agreement of the next-token distribution vs the source")
    convert.add_argument("--report-text", metavar="FILE", help="text for --report (also gives perplexity); "
                         "default: random token ids")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=commands.convert)

    serve = sub.add_parser(
        "serve", help="the OpenAI and Anthropic APIs over HTTP, for editors, agents and chat front ends",
        description="Serve the model on an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) and Anthropic's Messages API (/v1/messages), streaming by server-sent events. "
                    "Concurrent requests decode together (continuous batching); a prompt prefix seen before "
                    "(a shared system prompt) is not prefilled again.")
    _add_model_argument(serve, DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                       "machine only; another address warns unless --api-key is given)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("QWEN_MLX_API_KEY"), metavar="KEY",
                       help="require this key (Authorization: Bearer KEY, or x-api-key: KEY); default: the "
                            "QWEN_MLX_API_KEY environment variable, else none")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together "
                       "(default: 8)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting for a place in the batch; beyond them a request gets 429 with "
                            "Retry-After (default: 64)")
    serve.add_argument("--prompt-cache-bytes", type=_size, default="1GiB", metavar="SIZE", help="memory for the "
                       "prefix cache across requests, least recently used dropped first; 0 turns it off "
                       "(default: 1GiB)")
    serve.add_argument("--max-body-bytes", type=_size, default="4MiB", metavar="SIZE", help="largest request "
                       "body; larger ones get 413 (default: 4MiB)")
    serve.set_defaults(run=commands.serve)

    from qwen_mlx.bench.run import PRESETS  # a plain dict; importing it is cheap

    bench = sub.add_parser(
        "bench", help="measure prefill/decode speed and memory, side by side with mlx-lm",
        description="Benchmark generation on random weights with a real model's shape (no download) or on a "
                    "checkpoint. Each case runs through qwen-mlx and, on the same weights, through mlx-lm's own "
                    "generate_step; the table gives tok/s, time to first token, peak memory, the fraction of "
                    "the memory-bandwidth roofline (weight bytes read per token x tok/s / bandwidth) and the "
                    "memory check: peak memory during decode <= (weights + KV cache) + 10%. Three modes: prompt "
                    "cases (the default), long-context cases (--context) and the long rotating-cache run "
                    "(--rotating-run); --context and --rotating-run may be combined.",
        epilog="The JSON schema (qwen-mlx-bench/1) is documented in docs/bench.md.")
    bench.add_argument("--preset", action="append", choices=sorted(PRESETS),
                       help="model shape with random weights; repeat for several (default: qwen3-0.6b)")
    bench.add_argument("-m", "--model", metavar="PATH", help="a checkpoint directory or hub id instead of a preset")
    bench.add_argument("--bits", type=_bits_list, default=["4"], metavar="LIST",
                       help="weight formats for presets, comma-separated from bf16,8,4 (default: 4)")
    bench.add_argument("--layers", type=number(int, low=1),
                       metavar="N", help="keep only the first N layers of a preset "
                       "(a layer stack of the real shape, for big models on small machines)")
    bench.add_argument("--prompt-tokens", type=_int_list, default=[128], metavar="LIST",
                       help="prompt lengths, comma-separated (default: 128)")
    bench.add_argument("--gen-tokens", type=number(int, low=MIN_GEN_TOKENS),
                       default=64, metavar="N", help="tokens to generate per case "
                       "(default: 64; use a few with --context, each token reads the whole context)")
    bench.add_argument("--context", type=_int_list, metavar="LIST", help="long-context mode: for each length "
                       "(comma-separated, e.g. 8192,32768) fill every layer's cache directly with the same random "
                       "K/V for both engines (no prefill, which would take hours on a CPU), feed one token and "
                       "measure decode tok/s, for each --cache kind; --prompt-tokens is not used")
    bench.add_argument("--cache", type=_cache_list, default=["plain", "rotating", "kv8", "kv4", "rotating-kv4"],
                       metavar="LIST", help="KV cache kinds for --context, comma-separated from plain, rotating "
                       "(window --max-kv-size), kv8, kv4 (8/4-bit quantized, group 64), rotating-kv8, rotating-kv4 "
                       "(mlx-lm has no quantized rotating cache: n/a) (default: plain,rotating,kv8,kv4,"
                       "rotating-kv4)")
    bench.add_argument("--max-kv-size", type=number(int, low=commands.KEEP + 1),
                       default=4096, metavar="N", help="window of the rotating "
                       "caches, in tokens, 4 of them pinned (default: 4096)")
    bench.add_argument("--rotating-run", action="store_true", help="generate 4 x --max-kv-size tokens through "
                       "the rotating cache after a prompt that fills the window (first preset and --bits only, "
                       "qwen-mlx only) and report memory at each quarter: it must stay flat")
    bench.add_argument("--overhead", action="store_true", help="per-token overhead: decode time, graph nodes and "
                       "graph-build time per token, side by side with mlx-lm (default presets: qwen3-deep-thin and "
                       "qwen3-0.6b)")
    bench.add_argument("--plot", metavar="FILE.svg", help="with --context: write decode tok/s against context "
                       "length as an SVG, one line per engine and cache kind")
    bench.add_argument("--repeats", type=number(int, low=1),
                       default=3, metavar="N", help="timed runs per case; the median is "
                       "reported (default: 3)")
    bench.add_argument("--warmup", type=number(int, low=0),
                       default=1, metavar="N", help="untimed runs first (default: 1)")
    bench.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm side (no ratios)")
    bench.add_argument("--bandwidth", type=number(float, above=0),
                       metavar="GB/S", help="memory bandwidth for the roofline "
                       "(default: from a table of Apple and NVIDIA chips, else measured with a copy benchmark)")
    bench.add_argument("--draft", metavar="DRAFT", help="speculative decoding against plain decoding: 'oracle' (a "
                       "draft that always proposes the model's own greedy token: what the machinery gives at full "
                       "acceptance) or a preset name (a random draft model, side by side with mlx-lm's speculative "
                       "decoding on the same weights)")
    bench.add_argument("--draft-tokens", type=number(int, low=1, high=8), default=4, metavar="N",
                       help="tokens drafted per step with --draft (default: 4)")
    bench.add_argument("--seed", type=number(int, low=0, high=2**63 - 1),
                       default=0, help="random weights and prompt seed (default: 0)")
    bench.add_argument("--force", action="store_true", help="run a model even when its weights and KV cache "
                       "exceed the GPU's recommended working set (Apple silicon)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON (schema qwen-mlx-bench/1, "
                       "see docs/bench.md)")
    bench.set_defaults(run=commands.bench)
    return parser


def _import_mlx_whole() -> None:
    """Import mlx.core with Ctrl-C held back: a KeyboardInterrupt while its extension module initialises makes
    nanobind abort the process ("Critical nanobind error", a traceback, no exit status of ours). The signal held
    during the import (a fraction of a second) arrives right after it, as a KeyboardInterrupt main turns into 130."""
    import signal

    if "mlx.core" in sys.modules or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import mlx.core  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (a file, config or flag: one line on stderr), 1 an
    internal error (one line; --debug shows the traceback), 130 interrupted."""
    try:
        _import_mlx_whole()
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # during start-up: the parser imports the bench presets
        return 130
    try:
        args.run(args)
    except UserError as e:  # its message names files, tensors and tokens from a checkpoint: printable
        if args.debug:
            traceback.print_exc()
        print(f"qwen-mlx: error: {printable(one_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the machine's side (disk full, permissions): not a bug, not the user's input
        if args.debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"qwen-mlx: error: {printable(where + (e.strerror or one_line(e)))}", file=sys.stderr)
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
            return 1
        what = printable(": ".join(filter(None, [type(e).__name__, one_line(e)])))
        print(f"qwen-mlx: error: internal error: {what} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
