"""Find a checkpoint (local directory or hub id), check its files, and load its weights lazily into a Model.

Safetensors files are untrusted: each header is parsed and checked by the `safetensors` package (its Rust parser
validates offsets, sizes and the file length) and every tensor's name, dtype and shape is checked against the
model before `mx.load` sees the file. Code in a checkpoint (`*.py`, `auto_map`) is never downloaded or run.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from qwen_mlx.errors import one_line
from qwen_mlx.kernels.ops import choose_backend
from qwen_mlx.models.build import build_model
from qwen_mlx.models.config import HYBRID_MODEL_TYPES, ConfigError, ModelConfig
from qwen_mlx.models.fused import fuse
from qwen_mlx.models.qwen3 import Model, checkpoint_names
from qwen_mlx.untrusted import checked_file, read_json
from qwen_mlx.weights.memory import Footprint, MemoryPlan, attention_layer_bytes, check_fits, kv_cache_bytes
from qwen_mlx.weights.names import LoadError, hybrid_hf_layout, is_mtp, is_vision_tower, model_name, sanitize
from qwen_mlx.weights.quant import quantize_model

# What a model needs from the hub: weights, configs, tokenizer and template. Never code.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "vocab.json", "merges.txt"]

# The safetensors dtypes a checkpoint may hold (and convert writes). U8: the scales of the mxfp4/mxfp8/nvfp4 modes.
SAFETENSORS_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # where its data starts in the file, in bytes


def resolve(path_or_repo: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded (only the files a model needs) into the HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise LoadError(f"{text}: not a directory (pass the checkpoint directory, or a .gguf file to `convert`)")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise LoadError(f"{text}: no such checkpoint directory")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise LoadError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise LoadError(
            f"{repo_id}: could not download it from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}); download it where you have a connection, or pass --model PATH to a local "
            "checkpoint directory"
        ) from None


def load_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_file(path / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_against_index(cfg: ModelConfig, index: dict[str, TensorInfo], path: Path) -> None:
    """The config's layer count and vocabulary agree with the tensors the files hold: checked before a model is
    built, so a config.json claiming 100,000 layers is refused at once instead of built."""
    held = sorted({int(m[1]) for m in map(_LAYER.match, index) if m})
    if held != list(range(cfg.num_hidden_layers)):
        what = f"layers {held[0]}..{held[-1]}" if held else "no layers"
        raise LoadError(f"{path / 'config.json'}: num_hidden_layers is {cfg.num_hidden_layers} but the weight files "
                        f"hold {what} ({len(held)} numbers)")
    embed = index.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != cfg.vocab_size:
        raise LoadError(f"{path / 'config.json'}: vocab_size is {cfg.vocab_size} but the embedding "
                        f"model.embed_tokens.weight has {embed.shape[0]} rows")


class Part(Protocol):
    """A share of a checkpoint loaded instead of all of it (distributed.shard makes them: a pipeline stage, a rank's
    experts). Only the tensors it names are read."""

    experts: range | None  # the experts read from every expert stack, stacked from 0; None: all of them

    def build(self, cfg: ModelConfig) -> Model:
        """The modules the share holds, before quantization and weights."""
        ...

    def names(self, index: dict[str, TensorInfo], model: Model) -> dict[str, str] | None:
        """Checkpoint name -> model name of every tensor held (None: all, under their own names)."""
        ...

    def quantization(self, quantization: dict) -> dict:
        """The checkpoint's quantization settings with per-layer overrides renamed like the names."""
        ...


def load_model(path_or_repo: str | Path, *, dtype: mx.Dtype | None = None, part: Part | None = None,
               prepare: Callable[[Model], None] | None = None, memory: MemoryPlan | None = None,
               mtp: bool = False) -> tuple[Model, Path]:
    """Build the model described by config.json and load its weights; returns the model and the checkpoint dir.

    Weights keep the checkpoint's dtype unless `dtype` is given (quantized weights keep theirs). They are read
    lazily and materialized once.

    `part` builds and reads only a share of the checkpoint (see Part); `prepare(model)` runs once the weights are in
    place but not yet read (tensor and expert parallel swap modules there, slicing what they split; a model holding
    some experts needs its router's expert ids mapped to them, as distributed.shard.ExpertShard does).

    The kernels backend is chosen here, once (kernels.ops.choose_backend: the device and QWEN_MLX_KERNELS), and the
    model comes back in its layer forms (models.fused.fuse: the fused kernels on a GPU, the plain page otherwise).

    `memory`: refuse (memory.MemoryCheckError), before anything is built or read, a model whose weights plus the KV
    cache of the plan (with `mtp`, its MTP head's too) exceed the GPU's recommended working set (Apple silicon;
    unless the plan says force): see check_memory. The whole checkpoint is counted, not a `part`'s share.

    `mtp`: load the checkpoint's multi-token-prediction head too (`model.mtp`; refused for a checkpoint without
    one). Without it the head's tensors are never read.
    """
    path = resolve(path_or_repo)
    cfg = load_config(path)
    index = read_index(path)
    hf_layout = hybrid_hf_layout(index)
    if mtp:
        check_mtp(cfg, index, path)
    if memory is not None:
        _check_run(path, cfg, index, memory, dtype, mtp)
    renamed = model_names(index, mtp)  # checkpoint name -> model name, of the tensors the model may read
    index = {renamed[k]: v for k, v in index.items() if k in renamed}
    check_config_against_index(cfg, index, path)
    quantization = cfg.quantization and {model_name(k, mtp) or k: v for k, v in cfg.quantization.items()}
    model = part.build(cfg) if part is not None else build_model(cfg, mtp=mtp)
    names = part.names(index, model) if part is not None else None  # model name -> part's name, when renamed
    if names is not None:
        index = {names[k]: v for k, v in index.items() if k in names}
        renamed = {k: names[v] for k, v in renamed.items() if v in names}
    if part is not None and quantization:
        quantization = part.quantization(quantization)
    experts = part.experts if part is not None else None
    if quantization:
        quantize_model(model, quantization, present=set(index))
    _check_dtypes(index)
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    weights = _load_weights(index, cfg, set(expected), renamed, experts, hf_layout)
    check_weights(expected, index, weights, cfg)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if prepare is not None:
        prepare(model)
    fuse(model, choose_backend())  # the kernels backend, decided here once for every op of every token
    # One tensor at a time: a stacked MoE projection then exists once plus its experts' pieces, never more.
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    model.eval()
    return model, path


def check_memory(path: Path, plan: MemoryPlan, *, dtype: mx.Dtype | None = None, mtp: bool = False,
                 draft: Path | None = None) -> None:
    """Refuse (memory.MemoryCheckError) a run of the checkpoint at `path` whose weights and KV caches under `plan`
    exceed the GPU's recommended working set: the model's, with `mtp` its MTP head's, with `draft` (a checkpoint
    directory) the draft model's, its cache under the same plan. From config.json and the headers alone: nothing
    is built or read, so it runs before either model loads."""
    cfg, index = load_config(path), read_index(path)
    if mtp:
        check_mtp(cfg, index, path)  # a head that is not there is not counted, it is refused
    _check_run(path, cfg, index, plan, dtype, mtp, draft)


def _check_run(path: Path, cfg: ModelConfig, index: dict[str, TensorInfo], plan: MemoryPlan, dtype: mx.Dtype | None,
               mtp: bool, draft: Path | None = None) -> None:
    """check_memory with the checkpoint's config and index in hand (a head asked for already checked present)."""
    model, head = footprint(cfg, index, plan, dtype)
    if draft is not None:
        beside = footprint(load_config(draft), read_index(draft), plan, dtype)[0]
        check_fits(f"{path} with the draft model {draft}", model, plan.force, {"draft": beside})
    elif mtp:
        check_fits(f"{path} with its MTP head", model, plan.force, {"MTP head": head})
    else:
        check_fits(str(path), model, plan.force)


def footprint(cfg: ModelConfig, index: dict[str, TensorInfo], plan: MemoryPlan,
              dtype: mx.Dtype | None = None) -> tuple[Footprint, Footprint]:
    """(the model's, its MTP head's) bytes in a run of `plan`, from a checkpoint's config and tensor index
    (read_index): weights once loaded (floats cast to `dtype`) and the most the caches reach (the head's: its one
    attention layer, a cache of the model's kind). The head's is zero for a checkpoint without one."""
    _check_dtypes(index)
    renamed = model_names(index, mtp=True)
    index = {renamed[k]: v for k, v in index.items() if k in renamed}
    weights, element = _weight_bytes({k: v for k, v in index.items() if not is_mtp(k)}, dtype)
    head = {k: v for k, v in index.items() if is_mtp(k)}
    head_weights = _weight_bytes(head, dtype)[0]
    head_cache = attention_layer_bytes(cfg, plan, element) if head else 0
    return Footprint(weights, kv_cache_bytes(cfg, plan, element)), Footprint(head_weights, head_cache)


def model_names(index: dict[str, TensorInfo], mtp: bool = False) -> dict[str, str]:
    """Checkpoint tensor name -> model name, for every tensor of `index` that the text model (and with `mtp`, its
    MTP head) may read."""
    names = {k: model_name(k, mtp) for k in index}
    return {k: v for k, v in names.items() if v is not None}


def check_mtp(cfg: ModelConfig, index: dict[str, TensorInfo], path: Path) -> None:
    """The checkpoint holds a multi-token-prediction head that qwen-mlx runs."""
    if cfg.model_type not in HYBRID_MODEL_TYPES:
        raise LoadError(f"{path}: --mtp needs a Qwen3.5 or Qwen3-Next checkpoint with an MTP head; this one is "
                        f"{cfg.model_type} (use --draft-model instead)")
    if not any(is_mtp(name) for name in index):
        raise LoadError(f"{path}: the checkpoint has no MTP head (no mtp.* tensors), so --mtp cannot draft with it "
                        "(convert it again from the original checkpoint, or use --draft-model)")


def has_vision_tower(index: dict[str, TensorInfo]) -> bool:
    """Whether the checkpoint holds an image-text model's vision tower (which qwen-mlx does not run)."""
    return any(is_vision_tower(name) for name in index)


def read_index(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its file, dtype, shape and offset, read from the headers only."""
    from safetensors import safe_open

    files = [checked_file(file, path) for file in _weight_files(path)]
    index: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                found = {name: f.get_slice(name) for name in f.keys()}
                found = {name: (piece.get_dtype(), tuple(piece.get_shape())) for name, piece in found.items()}
        except Exception as e:  # the Rust parser's errors: bad header, offsets, sizes, truncated file
            raise LoadError(f"{file}: not a valid safetensors file ({one_line(e) or type(e).__name__})") from None
        length, header = _read_header(file)
        for name, (dtype, shape) in found.items():
            if name in index:
                raise LoadError(f"{file.name}: tensor {name} also appears in {index[name].file.name}")
            index[name] = TensorInfo(file, dtype, shape, 8 + length + header[name]["data_offsets"][0])
    return index


def _read_header(file: Path) -> tuple[int, dict]:
    """The header's length and entries, refusing duplicate names: the Rust parser keeps the last of two entries
    with one name; another reader may keep the first and read an entry nobody checked. The header's size, offsets
    and shapes were checked by safe_open already."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = f.read(length)

    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise LoadError(f"{file}: not a valid safetensors file (tensor {dup} appears twice in the header)")
        return dict(items)

    return length, json.loads(header, object_pairs_hook=pairs)


def _weight_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{path}: no *.safetensors weight files in this directory")
        return files
    try:
        weight_map = read_json(index_file, path)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError):
        raise LoadError(f"{index_file}: not a valid safetensors index (expected a 'weight_map' object)") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise LoadError(f"{index_file}: shard name {name!r} is not a .safetensors file in this directory")
        if not (path / name).is_file():
            raise LoadError(f"{index_file}: shard {name} is listed but missing")
    return [path / name for name in names]


def _check_dtypes(index: dict[str, TensorInfo]) -> None:
    for name, info in index.items():
        if info.dtype not in SAFETENSORS_DTYPES:
            raise LoadError(f"{info.file.name}: tensor {name} has dtype {info.dtype}, which qwen-mlx does not load")


def _weight_bytes(index: dict[str, TensorInfo], dtype: mx.Dtype | None) -> tuple[int, int]:
    """(bytes of the weights once loaded, bytes per element of the activations), from the headers alone. The
    activations take the embedding's dtype (a quantized one's scales), or `dtype` when the weights are cast."""
    total = 0
    for info in index.values():
        stored = SAFETENSORS_DTYPES[info.dtype]
        cast = dtype if dtype is not None and mx.issubdtype(stored, mx.floating) else stored
        total += cast.size * math.prod(info.shape)
    embed = index.get("model.embed_tokens.scales") or index.get("model.embed_tokens.weight")
    element = dtype or (SAFETENSORS_DTYPES[embed.dtype] if embed is not None else mx.float32)
    return total, element.size


def _load_weights(index: dict[str, TensorInfo], cfg: ModelConfig, params: set[str], names: dict[str, str],
                  experts: range | None = None, hf_layout: bool = False) -> dict[str, mx.array]:
    weights: dict[str, mx.array | ExpertRows] = {}
    for file in sorted({info.file for info in index.values()}):
        loaded = mx.load(str(file))  # lazy: read when evaluated, so the tensors left out here are never read
        weights.update({names[k]: v for k, v in loaded.items() if k in names})
        del loaded  # sanitize frees each expert piece once stacked: no other reference may keep it alive
    if experts is not None:  # mx.load would read a whole stack of experts to slice some: read those alone
        weights.update({name: ExpertRows(index[name]) for name in weights if ".switch_mlp." in name})
    return sanitize(weights, cfg, params, experts, hf_layout)


@dataclass(frozen=True)
class ExpertRows:
    """A stack of experts (E, ...) in a safetensors file, read one expert at a time: `rows[e]`."""

    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> mx.Dtype:
        return SAFETENSORS_DTYPES[self.info.dtype]

    def __getitem__(self, e: int) -> mx.array:
        size = self.dtype.size * math.prod(self.shape[1:])
        data = np.fromfile(self.info.file, np.uint8, count=size, offset=self.info.offset + e * size)
        return mx.array(data).view(self.dtype).reshape(self.shape[1:])


def check_weights(expected: dict[str, tuple[int, ...]], index: dict[str, TensorInfo], weights: dict[str, mx.array],
                  cfg: ModelConfig) -> None:
    """Every parameter present with the `expected` shape, nothing unexpected; errors name the tensor and file."""
    for name, shape in expected.items():
        parts = checkpoint_names(name)
        if name not in weights:
            missing = next((part for part in parts if part not in weights), name)
            raise LoadError(f"checkpoint has no tensor {missing} (needed by this {cfg.model_type} config)")
        got = tuple(weights[name].shape)
        if got != tuple(shape):
            where = index[parts[0]].file.name if parts[0] in index else "the checkpoint"
            what = f"tensor {name} has" if len(parts) == 1 else f"tensors {' and '.join(parts)} joined have"
            raise LoadError(f"{where}: {what} shape {got}, the config needs {tuple(shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise LoadError(f"checkpoint has tensor {extra[0]}{more} that this {cfg.model_type} config does not use")


def check_finite(model: nn.Module) -> None:
    """Raise naming the first tensor that holds NaN or infinity (quantized weights: their scales and biases)."""
    for name, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            bad = (~mx.isfinite(p)).sum().item()
            if bad:
                raise LoadError(f"tensor {name} has {bad} non-finite values (NaN or infinity): the checkpoint is "
                                "corrupt")
