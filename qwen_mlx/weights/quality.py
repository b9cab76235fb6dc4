"""How good a converted checkpoint is: per-tensor quantization error and end-to-end agreement with its source."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.kernels.ops import choose_backend
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.fused import fuse
from qwen_mlx.models.qwen3 import Model
from qwen_mlx.weights.convert import ConvertResult
from qwen_mlx.weights.loader import load_model
from qwen_mlx.weights.names import sanitize
from qwen_mlx.weights.quant import logit_agreement, perplexity
from qwen_mlx.weights.sources import ConvertError, open_source


def quality_report(src: str | Path, result: ConvertResult, *, text_file: str | Path | None = None,
                   tokens: int = 256) -> str:
    """Per-tensor relative error (from the convert) and end to end: KL divergence and top-1 agreement of the
    converted model's next-token distribution vs the source's, over `text_file` (which also gives perplexity) or
    over random token ids. The source model is held unquantized in memory for this."""
    source = open_source(src)
    reference = Model(ModelConfig.from_dict(source.config, str(src)))
    params = {name for name, _ in tree_flatten(reference.parameters())}
    weights = sanitize({name: t.load() for name, t in source.tensors.items()}, reference.config, params)
    reference.load_weights(list(weights.items()))
    fuse(reference, choose_backend())  # as a load gives it (on a CPU: the float32 expert product)
    converted, _ = load_model(result.path)
    if text_file is not None:
        from qwen_mlx.engine.tokenizer import Tokenizer

        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{text_file}: cannot read the report text ({type(e).__name__})") from None
        ids = mx.array(Tokenizer.from_dir(result.path).encode(text)[:tokens])
        if ids.size < 2:
            raise ConvertError(f"{text_file}: the report text needs at least two tokens")
    else:
        ids = mx.random.randint(0, converted.config.vocab_size, (tokens,), key=mx.random.key(0))
    ref_logits, logits = reference(ids[None])[0], converted(ids[None])[0]
    m = logit_agreement(ref_logits, logits)
    lines = []
    if result.tensor_errors:
        errors = sorted(result.tensor_errors.items(), key=lambda kv: -kv[1])
        mean = sum(result.tensor_errors.values()) / len(errors)
        lines.append(f"tensor error  relative L2, mean {mean:.4f} over {len(errors)} quantized tensors; worst: "
                     + ", ".join(f"{name} {err:.4f}" for name, err in errors[:3]))
    lines.append(f"vs source     KL {m['kl_mean']:.5f} nats mean, {m['kl_max']:.5f} max; top-1 agreement "
                 f"{100 * m['top1']:.1f}% over {ids.size} {'text' if text_file else 'random'} tokens")
    if text_file is not None:
        lines.append(f"perplexity    source {perplexity(ref_logits, ids):.3f}, converted {perplexity(logits, ids):.3f}")
    return "\n".join(lines)
