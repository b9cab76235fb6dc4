"""Convert a Qwen checkpoint (Hugging Face directory or hub id, MLX checkpoint, or .gguf file) into an MLX
checkpoint that qwen-mlx and mlx-lm both load: `qwen-mlx convert` from a checkout, without installing.

    python scripts/convert.py SRC OUT [--bits 4] [--group-size 64] [--mode affine] [--recipe mixed_4_6]
                                      [--dtype bf16] [--dequantize] [--shard-size 5GB] [--force] [--report]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_mlx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
