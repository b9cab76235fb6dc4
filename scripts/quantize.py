"""Quantize a Qwen checkpoint to MLX (4-bit affine, group 64 unless told otherwise): `qwen-mlx convert` by its
other name, from a checkout, without installing.

    python scripts/quantize.py SRC OUT [--bits 2|3|4|5|6|8] [--group-size 32|64|128] [--recipe mixed_4_6]
                                       [--mode affine|mxfp4|mxfp8|nvfp4] [--report]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_mlx.cli import main  # noqa: E402

if __name__ == "__main__":
    if "--dequantize" in sys.argv[1:]:
        sys.exit("quantize.py: --dequantize writes unquantized weights; use scripts/convert.py for that")
    sys.exit(main(["convert", *sys.argv[1:]]))
