"""The body of each `qwen-mlx` subcommand (cli.py parses the arguments). Each imports what it needs when it runs, so
importing this module costs nothing and `qwen-mlx --help` stays instant."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from qwen_mlx.errors import UserError
from qwen_mlx.terminal import printable

KEEP = 4  # tokens the rotating KV cache pins (cache.kv.make_cache's default): a window must be larger


def info(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen_mlx.kernels import ops as kernels
    from qwen_mlx.weights.loader import check_finite, has_vision_tower, load_model, read_index

    model, path = load_model(args.model)
    if args.check:
        check_finite(model)
    cfg = model.config
    params = tree_flatten(model.parameters())
    n_bytes = sum(p.nbytes for _, p in params)
    print(f"checkpoint   {path}")
    print(f"model        {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads of {cfg.head_dim}")
    if cfg.layer_types:
        linear = sum(cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers))
        print(f"layers       {linear} linear attention (Gated DeltaNet, {cfg.linear_num_key_heads} key / "
              f"{cfg.linear_num_value_heads} value heads of {cfg.linear_key_head_dim} / {cfg.linear_value_head_dim}),"
              f" {cfg.num_hidden_layers - linear} full attention (RoPE on {cfg.rotary_dim} of {cfg.head_dim} dims)")
    if has_vision_tower(read_index(path)):
        print("vision       vision tower present, not used")
    if cfg.num_experts:
        print(f"experts      {cfg.num_experts} experts, {cfg.num_experts_per_tok} active, "
              f"intermediate {cfg.moe_intermediate_size}"
              + (f", shared expert {cfg.shared_expert_intermediate_size}" if cfg.shared_expert_intermediate_size
                 else ""))
    else:
        print(f"mlp          intermediate {cfg.intermediate_size}")
    rope = f"theta {cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope += (f", YaRN x{cfg.rope_scaling.factor:g} from {cfg.rope_scaling.original_max_position_embeddings}")
    print(f"rope         {rope}; context {cfg.max_position_embeddings}")
    print(f"vocab        {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} LM head")
    print(f"weights      {n_bytes / 2**20:.1f} MiB, " + (_recipe(cfg.quantization) if cfg.quantization
                                                          else cfg.torch_dtype))
    print(f"device       {mx.default_device()}")
    print(f"kernels      {kernels.BACKEND} (set {kernels.ENV}=reference|custom to choose)")
    if args.check:
        print("check        every tensor is finite")
    if args.distributed:
        from qwen_mlx.distributed.plan import memory_plan

        plan = memory_plan(path, args.distributed)
        print(f"over {args.distributed} ranks (weights per rank; KV cache per rank per 1k tokens of context):")
        for mode in ("pipeline", "tensor", "expert"):
            per = plan[mode]
            if isinstance(per, str):
                print(f"  {mode:9}  not possible: {per}")
                continue
            kv = plan[f"{mode}_kv_per_token"]
            print(f"  {mode:9}  " + ", ".join(f"rank {r}: {b / 2**30:.2f} GiB + KV {k * 1000 / 2**20:.1f} MiB"
                                              for r, (b, k) in enumerate(zip(per, kv))))


def _recipe(quant: dict) -> str:
    """A quantization section in words: the default settings, then how many layers override them (mlx-lm's mixed
    recipes, its 8-bit routers and gates), e.g. "4-bit group 64; 8 layers 8-bit group 64"."""
    def words(bits: int, group_size: int) -> str:
        return f"{bits}-bit group {group_size}"

    others = Counter("unquantized" if v is False else words(v.get("bits", quant["bits"]),
                                                             v.get("group_size", quant["group_size"]))
                     for v in quant.values() if isinstance(v, dict) or v is False)
    return words(quant["bits"], quant["group_size"]) + "".join(f"; {n} layers {what}"
                                                               for what, n in sorted(others.items()))


def _sampling_overrides(args: argparse.Namespace) -> dict:
    names = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "seed": "seed"}
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}


def _read_prompt(args: argparse.Namespace) -> str:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty")
    return prompt


def _open_model(args: argparse.Namespace, context: int):
    """A context giving the model for generate and chat: loaded in this process (after the memory check for
    `context` tokens), or with --distributed split over the ranks a launcher (mlx.launch) started; then every rank
    but 0 serves rank 0 and is given None."""
    if args.distributed is None:
        from contextlib import nullcontext

        from qwen_mlx.api import load
        from qwen_mlx.weights.memory import MemoryPlan

        plan = MemoryPlan(context=context, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits,
                          kv_group_size=args.kv_group_size, force=args.force)
        return nullcontext(load(args.model, memory=plan, draft=args.draft_model, draft_tokens=args.draft_tokens,
                                mtp=args.mtp))
    if args.draft_model is not None or args.mtp:
        raise UserError("speculative decoding (--draft-model, --mtp) does not run with --distributed yet")
    from qwen_mlx.distributed.runtime import run_ranks

    return run_ranks(args.model, args.distributed, verbose=getattr(args, "verbose", False))


def generate(args: argparse.Namespace) -> None:
    from qwen_mlx.weights.memory import wired_limit

    # Under a launcher only rank 0 reads the prompt, once the model is up; alone, before loading, for the check.
    if args.prompt_cache is not None and args.distributed is not None:
        raise UserError("--prompt-cache does not run with --distributed yet")
    prompt = _read_prompt(args) if args.distributed is None else ""
    # A byte-level BPE token is at least one byte: the text's bytes bound its tokens; the template adds a few.
    context = len(prompt.encode()) + len((args.system or "").encode()) + 64 + args.max_tokens
    with wired_limit(), _open_model(args, context) as llm:
        if llm is None:  # a rank that served rank 0
            return
        prompt = prompt or _read_prompt(args)
        sampling = llm.sampling(args.think, **_sampling_overrides(args))
        if args.max_kv_size is not None:
            n = len(llm.prompt_tokens(prompt, think=args.think, system=args.system))
            if n > args.max_kv_size:
                print(f"qwen-mlx: note: the prompt is {n} tokens; the KV window (--max-kv-size) keeps its first "
                      f"{KEEP} and the latest {args.max_kv_size - KEEP}, and so does every step after",
                      file=sys.stderr)
        show_thinking = not args.hide_think
        color = sys.stderr.isatty()
        # The model's text reaches a terminal with its control characters made visible; a file or pipe gets it as is.
        answer_text = printable if sys.stdout.isatty() else str
        thinking_text = printable if color else str
        done = None
        for event in llm.stream(prompt, think=args.think, system=args.system, max_tokens=args.max_tokens,
                                sampling=sampling, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits,
                                kv_group_size=args.kv_group_size, prompt_cache=args.prompt_cache):
            if event.kind == "answer":
                sys.stdout.write(answer_text(event.text))
                sys.stdout.flush()
            elif event.kind == "thinking" and show_thinking:
                text = thinking_text(event.text)
                sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if color else text)
                sys.stderr.flush()
            elif event.kind == "done":
                done = event
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose and done is not None:
        s = done.stats
        print(f"prompt {s.prompt_tokens} tokens at {s.prompt_tps:.1f} tok/s, first token after "
              f"{s.time_to_first_token:.2f} s; {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s; "
              f"peak memory {s.peak_memory / 2**30:.2f} GiB; finished: {done.finish_reason}"
              + (f"; speculative: {s.acceptance:.0%} of {s.drafted} drafted tokens accepted, "
                 f"{s.tokens_per_forward:.2f} tokens per forward" if s.drafted else ""), file=sys.stderr)


def chat(args: argparse.Namespace) -> None:
    from pathlib import Path

    from qwen_mlx.weights.memory import wired_limit
    from tui.app import ChatApp
    from tui.engine import ModelEngine
    from tui.history import History, default_path

    # the conversation's length is not known: the check counts one reply (or the whole window)
    with wired_limit(), _open_model(args, args.max_tokens) as llm:
        if llm is None:  # a rank that served rank 0
            return
        engine = ModelEngine(llm, system=args.system, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits,
                             kv_group_size=args.kv_group_size, max_tokens=args.max_tokens,
                             sampling_overrides=_sampling_overrides(args))
        history = None if args.no_history else History(Path(args.history) if args.history else default_path())
        app = ChatApp(engine, think=args.think, history=history, resume=args.resume)
        ended = _share_the_terminal(app, engine, llm)
        try:
            app.run()
        finally:
            ended.set()
            if history is not None:
                history.close()
        if app.failure is not None:
            raise app.failure
        if app.return_code:
            raise SystemExit(app.return_code)


def _share_the_terminal(app, engine, llm):
    """With --distributed the status bar says how the model is split, and a lost rank, which ends this process from
    another thread, first lets the app give the terminal back (for up to two seconds). Returns the event to set
    once the app has ended."""
    import threading

    from qwen_mlx.distributed.runtime import DistributedLLM

    ended = threading.Event()
    if isinstance(llm, DistributedLLM):
        engine.details += f" · {llm.description}"

        def end_app() -> None:
            app.call_from_thread(app.exit, None, 1)
            ended.wait(2)

        llm.on_exit(end_app)
    return ended


def bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from qwen_mlx.bench import context as bench_context
    from qwen_mlx.bench import run as bench
    from qwen_mlx.weights.memory import wired_limit

    if args.plot and not args.context:
        raise UserError("--plot draws the long-context cases: give --context too")
    sources = ([args.model] if args.model else []) + (args.preset or ([] if args.model else ["qwen3-0.6b"]))
    common = dict(layers=args.layers, bandwidth=args.bandwidth, seed=args.seed, force=args.force)
    timed = dict(common, repeats=args.repeats, warmup=args.warmup, with_mlx_lm=not args.no_mlx_lm)
    docs = []
    if args.draft is not None:
        return _bench_speculative(args, sources)
    with wired_limit():
        if args.overhead:
            from qwen_mlx.bench import overhead

            if len(args.prompt_tokens) > 1:
                raise UserError("--overhead takes one --prompt-tokens length")
            docs.append(overhead.run_overhead(sources if args.model or args.preset else overhead.DEFAULT_SOURCES,
                                              args.bits, args.prompt_tokens[0], args.gen_tokens, **timed))
            if docs[-1]["overhead_ratios"]:
                print()
                print(overhead.format_overhead_ratios(docs[-1]))
        if not args.context and not args.rotating_run and not args.overhead:
            docs.append(bench.run(sources, args.bits, args.prompt_tokens, args.gen_tokens, **timed))
            if docs[-1]["ratios"]:
                print()
                print(bench.format_ratios(docs[-1]))
        if args.context:
            docs.append(bench_context.run_context(sources, args.bits, args.context, args.gen_tokens,
                                                  kinds=args.cache, max_kv_size=args.max_kv_size, **timed))
            if docs[-1]["context_ratios"]:
                print()
                print(bench_context.format_context_ratios(docs[-1]))
        if args.rotating_run:
            docs.append(bench_context.run_rotating(sources, args.bits, args.max_kv_size, **common))
    result = bench_context.merge(*docs)
    if args.json:
        bench.write_json(result, Path(args.json))
        print(f"\nwrote {args.json}")
    if args.plot:
        from qwen_mlx.bench.plot import write_context_svg

        write_context_svg(result, Path(args.plot))
        print(f"wrote {args.plot}")


def _bench_speculative(args: argparse.Namespace, sources: list[str]) -> None:
    import json
    from pathlib import Path

    from qwen_mlx.bench import speculative
    from qwen_mlx.bench.run import PRESETS
    from qwen_mlx.files import write_atomically

    if args.draft != "oracle" and args.draft not in PRESETS:
        raise UserError(f"--draft must be 'oracle' or a preset ({', '.join(PRESETS)}): got {args.draft!r}")
    if not 1 <= args.draft_tokens <= 8:
        raise UserError(f"--draft-tokens must be between 1 and 8: got {args.draft_tokens}")
    if args.model:
        raise UserError("--draft runs on presets (random weights); give --preset instead of --model")
    results = []
    for preset in sources:
        for bits in args.bits:
            print(f"{preset}, {bits}-bit, draft {args.draft}, k = {args.draft_tokens}:")
            result = speculative.run(preset, args.layers, bits, args.draft, args.draft_tokens,
                                     prompt_tokens=args.prompt_tokens[0], gen_tokens=args.gen_tokens,
                                     repeats=args.repeats, with_mlx_lm=not args.no_mlx_lm, seed=args.seed)
            print(speculative.format_result(result))
            results.append(result)
    if args.json:
        write_atomically(Path(args.json), json.dumps({"schema": "qwen-mlx-bench-speculative/1",
                                                      "cases": results}, indent=1).encode())
        print(f"\nwrote {args.json}")


def convert(args: argparse.Namespace) -> None:
    from qwen_mlx.weights import convert as converting

    result = converting.convert(args.src, args.out, bits=args.bits, group_size=args.group_size, mode=args.mode,
                     recipe=args.recipe, dtype=args.dtype, dequantize=args.dequantize, shard_size=args.shard_size,
                     force=args.force, progress=not args.quiet, report=args.report)
    what = "unquantized" if result.quantization is None else \
        f"{result.quantization['bits']}-bit {result.quantization['mode']} group {result.quantization['group_size']}"
    print(f"wrote {result.path} ({what}, {result.total_bytes / 2**20:.1f} MiB in {result.shards} "
          f"shard{'s' if result.shards > 1 else ''}, {result.seconds:.1f} s)")
    if args.report:
        from qwen_mlx.weights.quality import quality_report

        print(quality_report(args.src, result, text_file=args.report_text))


def serve(args: argparse.Namespace) -> None:
    from qwen_mlx.api import load
    from qwen_mlx.serve.app import ServeOptions, bind_warning
    from qwen_mlx.serve.app import serve as run_server

    for flag, n in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if n < 1:
            raise UserError(f"{flag} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535: got {args.port}")
    warning = bind_warning(args.host, args.api_key)
    if warning:
        print(f"qwen-mlx: warning: {warning}", file=sys.stderr)
    options = ServeOptions(model_name=args.model, api_key=args.api_key, max_batch=args.max_batch,
                           max_queue=args.max_queue, prompt_cache_bytes=args.prompt_cache_bytes,
                           max_body_bytes=args.max_body_bytes, debug=args.debug)
    run_server(load(args.model), options, host=args.host, port=args.port)
