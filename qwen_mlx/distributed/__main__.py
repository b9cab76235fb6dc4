"""`python -m qwen_mlx.distributed generate`: token ids in, one JSON line out (rank 0), for checks and benchmarks,
with MLX's launcher (`--` before `-m`):

    mlx.launch --backend ring -n 2 --python "$(which python)" -- -m qwen_mlx.distributed generate \\
        --model PATH --mode pipeline --prompt-ids 1,2,3 --max-tokens 32

The line holds the tokens, prefill seconds, decode tokens/s, TCP bytes sent per decoded token (Linux), and each
rank's weight bytes, load-time peak memory and layers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qwen_mlx.distributed.plan import MODES
from qwen_mlx.distributed.runtime import Runner, Turn, reply
from qwen_mlx.distributed.shard import load_rank
from qwen_mlx.distributed.watchdog import Watchdog, connect, failures
from qwen_mlx.engine.generate import GenerationStats
from qwen_mlx.errors import UserError
from qwen_mlx.weights.loader import resolve


def _bytes_sent() -> int | None:
    """Bytes this process's TCP sockets have sent and had acknowledged (Linux TCP_INFO tcpi_bytes_acked), summed
    over its sockets: the ring backend's real traffic. None where that cannot be read (macOS)."""
    import socket
    import struct

    if not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"):
        return None
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as s:  # closing the duplicate leaves the ring's socket open
                if s.type != socket.SOCK_STREAM:
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
                total += struct.unpack_from("<Q", info, 120)[0]  # offset of tcpi_bytes_acked in struct tcp_info
        except (OSError, ValueError, struct.error):
            continue
    return total



def prompt_logits(runner: Runner, prompt: list[int]) -> np.ndarray | None:
    """The prompt's float32 logits at every position (L, vocab) on the sampling rank (None elsewhere), through a
    cache of their own: every rank runs its part."""
    h = runner.model.model(mx.array(prompt)[None], runner.new_cache())  # (1, L, dim)
    if not runner.samples:
        mx.eval(h)
        return None
    return np.array(runner.model.head(h)[0].astype(mx.float32))


def generate(args: argparse.Namespace) -> None:
    watchdog = Watchdog(int(os.environ.get("MLX_RANK", "0")), args.timeout)
    with failures(watchdog):
        group = connect(watchdog, args.backend)
        rank = group.rank()
        model, stage = load_rank(resolve(args.model), args.mode, group)
        n_bytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        load_peak = mx.get_peak_memory()
        runner = Runner(model, args.mode, group, stage)
        cache = runner.new_cache(max_size=args.max_kv_size, bits=args.kv_bits, group_size=args.kv_group_size)
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        if not prompt:
            raise UserError("--prompt-ids: give at least one token id, e.g. --prompt-ids 9707,11,1879")
        watchdog.started = True
        if args.logits_out is not None:
            with watchdog.guard("computing the prompt's logits"):
                logits = prompt_logits(runner, prompt)
            if logits is not None:
                np.save(args.logits_out, logits)
        turn = Turn(keep=0, tokens=prompt, sampling={"temperature": args.temp}, max_tokens=args.max_tokens)
        stats = GenerationStats()
        tokens: list[int] = []
        sent = None
        for token in reply(runner, cache, turn, watchdog, stats=stats):
            if not tokens:
                sent = _bytes_sent()  # decoding starts: count from here
            tokens.append(token)
        sent = _bytes_sent() - sent if sent is not None else None
        with watchdog.guard("gathering statistics"):
            mine = mx.array([n_bytes, load_peak, sent or 0, runner.stage.start, runner.stage.stop])
            table = np.array(mx.distributed.all_gather(mine.astype(mx.int64)[None], group=group))
    if rank == 0:
        decoded = stats.generated_tokens - 1
        result = {
            "mode": args.mode, "ranks": group.size(), "tokens": tokens,
            "prompt_tokens": stats.prompt_tokens, "prefill_seconds": round(stats.prompt_seconds, 4),
            "decode_tokens_per_second": round(stats.decode_tps, 2) if stats.decode_seconds else None,
            "bytes_sent_per_token": (round(float(table[:, 2].sum()) / decoded, 1)
                                     if decoded and sent is not None else None),
            "weights_bytes": table[:, 0].tolist(), "load_peak_bytes": table[:, 1].tolist(),
            "layers": [[int(a), int(b)] for a, b in table[:, 3:5]],
        }
        print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qwen_mlx.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="decode token ids over all ranks; rank 0 prints one JSON line")
    g.add_argument("--model", required=True, help="checkpoint directory (the same path on every host)")
    g.add_argument("--mode", choices=MODES, default="pipeline")
    g.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    g.add_argument("--max-kv-size", type=int, metavar="N", help="rotating KV cache of N tokens (see cache.py)")
    g.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantized KV cache")
    g.add_argument("--kv-group-size", type=int, choices=[32, 64, 128])
    g.add_argument("--backend", default="any", help="mx.distributed backend: any, ring, jaccl, mpi")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one exchange between ranks may take before every rank stops (default 60)")
    g.add_argument("--logits-out", type=Path, help="the sampling rank saves the prompt's logits here (.npy)")
    args = ap.parse_args(argv)
    generate(args)


if __name__ == "__main__":
    main()
