"""Tokens/s and bytes sent per token of each distributed mode with local ring ranks on this machine.

    python scripts/bench_distributed.py [--ranks 2] [--tokens 64] [--json out.json]

Builds two small random checkpoints (a dense Qwen3 and a Qwen3-MoE, 8 layers, hidden 256, real vocabulary),
runs the single-process decode and every mode through `mlx.launch --backend ring` on 127.0.0.1, and prints one
row each. Bytes per token are measured: TCP bytes acknowledged on the ranks' sockets while decoding (Linux
TCP_INFO), summed over ranks, divided by the decoded tokens. Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

from qwen_mlx.cli import Parser  # noqa: E402
from qwen_mlx.flags import number  # noqa: E402

SHAPES = {
    "dense": ("qwen3", dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=32, intermediate_size=768)),
    "moe": ("qwen3_moe", dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=32, intermediate_size=768, moe_intermediate_size=128, num_experts=16,
                              num_experts_per_tok=4, mlp_only_layers=[])),
}


LAUNCH = Path(sys.executable).parent / "mlx.launch"  # MLX's launcher, beside this Python or on the PATH
if not LAUNCH.exists():
    LAUNCH = Path(shutil.which("mlx.launch") or "mlx.launch")


def free_ports(n: int) -> int:
    """A starting port with n free ports after it (other runs may share this machine)."""
    for _ in range(50):
        start = random.randint(20000, 60000)
        try:
            for p in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
    raise RuntimeError("no free ports")


def ring_command(n: int, *command: str) -> list[str]:
    """`mlx.launch --backend ring -n n` of `python command...` on 127.0.0.1, on free ports (tests/test_distributed.py
    launches its ranks with it too)."""
    return [str(LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_ports(n)),
            "--python", sys.executable, "--", *command]


def run(path: Path, mode: str, ranks: int, tokens: int, prompt: str) -> dict:
    command = ["-m", "qwen_mlx.distributed", "generate", "--model", str(path), "--mode", mode, "--prompt-ids",
               prompt, "--max-tokens", str(tokens)]
    cmd = ring_command(ranks, *command) if ranks > 1 else [sys.executable, *command]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{mode} -n {ranks} failed:\n{out}")
    return json.loads(lines[-1])


def main() -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=number(int, low=2), default=2)
    ap.add_argument("--tokens", type=number(int, low=1), default=64)
    ap.add_argument("--repeats", type=number(int, low=1), default=2, help="best of this many runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = ",".join(str(i) for i in range(1000, 1032))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (variant, overrides) in SHAPES.items():
            path = write_tiny_checkpoint(Path(tmp) / name, variant, "float32", overrides=overrides)
            modes = [("single", 1)] + [(m, args.ranks) for m in ("pipeline", "tensor", "expert")
                                       if m != "expert" or variant == "qwen3_moe"]
            for mode, ranks in modes:
                best = None
                for _ in range(args.repeats):
                    r = run(path, "pipeline" if mode == "single" else mode, ranks, args.tokens, prompt)
                    if best is None or r["decode_tokens_per_second"] > best["decode_tokens_per_second"]:
                        best = r
                    time.sleep(0.5)
                row = {"model": name, "mode": mode, "ranks": ranks, "tok_s": best["decode_tokens_per_second"],
                       "bytes_per_token": best["bytes_sent_per_token"] if ranks > 1 else 0,
                       "weights_MiB_per_rank": [round(b / 2**20, 1) for b in best["weights_bytes"]]}
                rows.append(row)
                print(f"{name:6} {mode:9} -n {ranks}  {row['tok_s']:8.1f} tok/s  "
                      f"{row['bytes_per_token']:9.0f} B/token  weights/rank MiB {row['weights_MiB_per_rank']}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
