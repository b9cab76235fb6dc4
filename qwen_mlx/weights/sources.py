"""What `convert` reads: a Hugging Face or MLX checkpoint directory, a hub id or a GGUF file, as the model's
tensors by checkpoint name (mlx-lm's layout: experts stacked), each read lazily when its loader is called, with
the tokenizer files. Every tensor's name, dtype and shape is checked before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from qwen_mlx.errors import UserError
from qwen_mlx.models.config import HYBRID_MODEL_TYPES
from qwen_mlx.untrusted import read_bytes, read_json
from qwen_mlx.weights.loader import SAFETENSORS_DTYPES, TensorInfo, load_config, read_index, resolve
from qwen_mlx.weights.names import (
    expert_piece,
    expert_stack,
    hybrid_hf_layout,
    hybrid_shape,
    hybrid_value,
    model_name,
    stacked_experts,
    unused,
)
from qwen_mlx.weights.quant import layer_settings

# Copied from the source when present; never code (*.py) and never anything the model does not need.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.json")
DTYPES = {"bf16": mx.bfloat16, "bfloat16": mx.bfloat16, "fp16": mx.float16, "float16": mx.float16,
          "fp32": mx.float32, "float32": mx.float32}


class ConvertError(UserError):
    """A convert that cannot start: bad source, output or options. One sentence naming the path or flag."""


@dataclass(frozen=True)
class SourceTensor:
    """One model parameter of the source, by its name in the (unquantized) model."""

    shape: tuple[int, ...]  # as the unquantized model holds it
    load: Callable[[], mx.array]  # the floating-point tensor, lazily; called once
    # Quantized in the source (an MLX checkpoint): (group_size, bits, mode) and the packed arrays {"weight",
    # "scales"[, "biases"]}, copied as they are when the output asks for the same quantization.
    packed: tuple[tuple[int, int, str], Callable[[], dict[str, mx.array]]] | None = None


@dataclass
class Source:
    name: str  # what the user passed, for the card
    config: dict  # config.json in Hugging Face spelling, without any quantization section
    tensors: dict[str, SourceTensor]
    files: dict[str, bytes]  # tokenizer and generation config files, by name
    dtype: mx.Dtype  # the output dtype unless --dtype says otherwise
    index: dict[str, TensorInfo] = field(default_factory=dict)  # safetensors sources: where each tensor lives


def open_source(src: str | Path) -> Source:
    """A checkpoint directory, hub id or .gguf file, with every tensor checked and nothing read yet."""
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConvertError(f"{src}: not a checkpoint directory or a .gguf file")
        from qwen_mlx.weights.gguf import read_gguf

        return _gguf_source(str(src), read_gguf(path))
    return _safetensors_source(str(src), resolve(src))


def _safetensors_source(name: str, path: Path) -> Source:
    cfg = load_config(path)
    raw = read_json(path / "config.json", path)
    for key in ("quantization", "quantization_config", "auto_map", "_name_or_path"):
        raw.pop(key, None)  # auto_map names code that is never run nor copied
    index = read_index(path)
    for tensor, info in index.items():  # the vision tower is never read: its dtypes do not matter
        if info.dtype not in SAFETENSORS_DTYPES and model_name(tensor, mtp=True) is not None:
            raise ConvertError(f"{info.file.name}: tensor {tensor} has dtype {info.dtype}, which qwen-mlx does not "
                               "convert")
    # mx.load is lazy: an array is read from its file when evaluated. Each is taken out of `arrays` when it is
    # used, so that once written it is freed.
    arrays: dict[str, mx.array] = {}
    for file in sorted({info.file for info in index.values()}):
        arrays.update(mx.load(str(file)))
    take = arrays.pop

    tensors: dict[str, SourceTensor] = {}  # the MTP head's (mtp.*) among them, converted like the model's
    experts: dict[str, dict[int, str]] = {}
    quant = cfg.quantization
    # A hybrid model's Hugging Face values (conv layout, zero-centred norms) become the model's as they are read.
    hf_values = cfg.model_type in HYBRID_MODEL_TYPES and hybrid_hf_layout(index)
    for tensor, info in index.items():
        if unused(tensor, cfg):
            continue
        if tensor.endswith((".scales", ".biases")) and quant:
            continue  # read with their weight below
        name = model_name(tensor, mtp=True)
        if name is None:  # the vision tower is never read
            continue
        piece = expert_stack(name)
        if piece:
            stacked, e = piece
            experts.setdefault(stacked, {})[e] = tensor
            continue
        layer = tensor.removesuffix(".weight")
        if quant and f"{layer}.scales" in index:
            tensors[name] = _packed_tensor(layer, index, quant, take)
        elif stacked_experts(name):  # the hub's (E, 2I, H) gate and up, or (E, H, I) down: split by rows
            parts = stacked_experts(name)
            rows = info.shape[1] // len(parts)
            for i, part in enumerate(parts):
                tensors[part] = SourceTensor((info.shape[0], rows, *info.shape[2:]),
                                             lambda t=tensor, i=i, r=rows: arrays[t][:, i * r:(i + 1) * r])
        elif hf_values:
            tensors[name] = SourceTensor(hybrid_shape(name, info.shape),
                                         lambda t=tensor, n=name: hybrid_value(n, take(t)))
        else:
            tensors[name] = SourceTensor(info.shape, lambda t=tensor: take(t))
    for stacked, per_expert in experts.items():
        names = [per_expert[e] for e in sorted(per_expert)]
        if sorted(per_expert) != list(range(cfg.num_experts)):
            missing = sorted(set(range(cfg.num_experts)) - set(per_expert))
            raise ConvertError(f"{path}: tensor {expert_piece(stacked, missing[0])} is "
                               "missing" if missing else f"{path}: {stacked} has more experts than the config")
        shapes = {index[n].shape for n in names}
        if len(shapes) != 1:
            raise ConvertError(f"{index[names[0]].file.name}: the experts of {stacked} differ in shape")
        tensors[stacked] = SourceTensor((len(names), *index[names[0]].shape),
                                        lambda names=names: mx.stack([take(n) for n in names]))
    return Source(name, raw, tensors, _copy_files(path), _default_dtype(cfg.torch_dtype), index)


def _packed_tensor(layer: str, index: dict[str, TensorInfo], quant: dict, take) -> SourceTensor:
    """A weight quantized in the source: checked against its stated settings, dequantized when loaded."""
    settings = layer_settings(quant, layer)
    weight, scales = index[f"{layer}.weight"], index[f"{layer}.scales"]
    if settings is None or weight.dtype != "U32":
        raise ConvertError(f"{weight.file.name}: {layer} has scales but config.json does not quantize it")
    group_size, bits, mode = settings
    in_dims = weight.shape[-1] * 32 // bits
    if in_dims != scales.shape[-1] * group_size or weight.shape[:-1] != scales.shape[:-1]:
        raise ConvertError(f"{weight.file.name}: {layer}.weight {weight.shape} and .scales {scales.shape} do not fit "
                           f"{bits}-bit group {group_size} quantization")
    parts = ["weight", "scales"] + (["biases"] if f"{layer}.biases" in index else [])

    def packed() -> dict[str, mx.array]:
        return {part: take(f"{layer}.{part}") for part in parts}

    def load() -> mx.array:
        p = packed()
        return mx.dequantize(p["weight"], p["scales"], p.get("biases"), group_size, bits, mode=mode)

    return SourceTensor((*weight.shape[:-1], in_dims), load, ((group_size, bits, mode), packed))


def _gguf_source(name: str, gguf) -> Source:
    tensors = {n: SourceTensor(shape, load) for n, (shape, load) in gguf.tensors.items()}
    return Source(name, gguf.config, tensors, gguf.files, _default_dtype(gguf.config.get("torch_dtype")))


def _default_dtype(name: object) -> mx.Dtype:
    return DTYPES.get(name, mx.bfloat16) if isinstance(name, str) else mx.bfloat16


def _copy_files(path: Path) -> dict[str, bytes]:
    names = [n for n in TOKENIZER_FILES + ("generation_config.json",) if (path / n).exists()]
    names += sorted(f.name for f in path.glob("*.jinja"))
    return {n: read_bytes(path / n, path) for n in names}  # regular files inside the checkpoint, bounded
