"""Write an MLX checkpoint (mlx-lm's layout) from a Hugging Face checkpoint, an MLX checkpoint or a GGUF file
(read by sources.py; quality.py measures the result).

One tensor at a time: each source tensor is read lazily, cast, quantized and streamed into its shard file, so peak
memory stays near the largest tensor (an expert stack for MoE), not the model. The output appears complete or not
at all: it is written into a hidden directory beside OUT, fsynced, and renamed to OUT when complete; a later run
removes what an interrupted one left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from qwen_mlx.files import fsync_dir
from qwen_mlx.models.build import build_model
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import checkpoint_weights
from qwen_mlx.weights.loader import SAFETENSORS_DTYPES, check_weights
from qwen_mlx.weights.names import is_mtp, mlx_lm_name
from qwen_mlx.weights.quant import layer_settings, plan_quantization, quantizable_layers
from qwen_mlx.weights.sources import DTYPES, ConvertError, Source, SourceTensor, open_source

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes; the hub's and mlx-lm's limit
_DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # what the loader reads we write


@dataclass
class ConvertResult:
    path: Path
    quantization: dict | None
    total_bytes: int
    shards: int
    seconds: float
    tensor_errors: dict[str, float]  # relative error of each quantized tensor (with report=True)


def convert(src: str | Path, out: str | Path, *, bits: int | None = None, group_size: int | None = None,
            mode: str = "affine", recipe: str | None = None, dtype: str | None = None, dequantize: bool = False,
            shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, progress: bool = True,
            report: bool = False) -> ConvertResult:
    """Convert `src` (checkpoint directory, hub id or .gguf file) into an MLX checkpoint at `out`.

    Quantizes to `bits`/`group_size`/`mode` (default 4-bit affine, group 64), or with a mixed `recipe`
    (quant.RECIPES); `dequantize` writes floating-point weights instead. `dtype` (bf16/fp16/fp32) is the type of
    the unquantized tensors and of the scales; by default the source's. With `report`, the relative error of every
    quantized tensor is measured as it is written.
    """
    start = time.perf_counter()
    out = Path(out).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unsupported --dtype {dtype} (choose bf16, fp16 or fp32)")
    if shard_size <= 0:
        raise ConvertError(f"--shard-size must be positive, got {shard_size}")
    if dequantize and (bits is not None or recipe is not None or mode != "affine"):
        raise ConvertError("--dequantize writes unquantized weights; it cannot be combined with --bits, --mode "
                           "or --recipe")
    _refuse_existing(out, force)
    source = open_source(src)
    cfg = ModelConfig.from_dict(source.config, f"{src} (config)")
    # A skeleton for names and shapes (with the MTP head when the source has one); its random weights are lazy and
    # never computed.
    model = build_model(cfg, mtp=any(is_mtp(name) for name in source.tensors))
    check_weights(_checkpoint_shapes(model), source.index, source.tensors, cfg)
    quantization = None if dequantize else plan_quantization(model, bits, group_size, mode, recipe)
    out_dtype = DTYPES[dtype] if dtype else source.dtype

    config = {**source.config, "torch_dtype": _DTYPE_NAMES[out_dtype]}
    if isinstance(config.get("text_config"), dict):  # mlx-lm reads the text config's tie, transformers the top's
        config["text_config"] = {**config["text_config"], "tie_word_embeddings": cfg.tie_word_embeddings}
    if quantization:
        quantization = {mlx_lm_name(k, cfg.model_type): v for k, v in quantization.items()}
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx-lm writes both names (transformers reads the second)
    ModelConfig.from_dict(config, "the converted config.json")  # what we write must load

    jobs = _plan(source, model, quantization, out_dtype, cfg.model_type)
    errors: dict[str, float] = {}
    with _output_dir(out, force) as tmp:
        weight_map, total = _write_weights(tmp, jobs, shard_size, progress, errors if report else None)
        shards = sorted(set(weight_map.values()))
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", dict(sorted(config.items())))
        files = dict(source.files)
        files.setdefault("generation_config.json", _generation_config(config))
        for name, data in files.items():
            _write_file(tmp / name, data)
        _write_file(tmp / "README.md", _card(source.name, out.name, cfg, quantization, out_dtype, total,
                                             _quantized_bits(jobs)).encode())
    return ConvertResult(out, quantization, total, len(shards), time.perf_counter() - start, errors)

# --- the plan: which arrays go into the output ---------------------------------------------------------------

@dataclass(frozen=True)
class _Out:
    name: str  # the model's checkpoint name (mlx-lm's layout)
    shape: tuple[int, ...]
    dtype: mx.Dtype
    stored: str  # the name written, mlx-lm's own (names.mlx_lm_name)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.size


@dataclass(frozen=True)
class _Job:
    """One source tensor and what it becomes: an unquantized tensor, or a packed weight with scales (+ biases)."""

    name: str
    tensor: SourceTensor
    settings: tuple[int, int, str] | None  # quantized to (group_size, bits, mode), or kept in floating point
    dtype: mx.Dtype
    outs: tuple[_Out, ...]

    def arrays(self, errors: dict[str, float] | None) -> dict[str, mx.array]:
        """The output arrays, lazily; with `errors`, records this tensor's relative quantization error."""
        prefix = self.name.removesuffix(".weight")
        if self.settings is None:
            return {self.name: self.tensor.load().astype(self.dtype)}
        group_size, bits, mode = self.settings
        packed = self.tensor.packed
        if packed is not None and packed[0] == self.settings:
            parts = packed[1]()  # the source's own packing: copied, not quantized twice
            return {f"{prefix}.{k}": v if k == "weight" or v.dtype == mx.uint8 else v.astype(self.dtype)
                    for k, v in parts.items()}
        w = self.tensor.load().astype(self.dtype)
        q = mx.quantize(w, group_size, bits, mode=mode)
        if errors is not None:
            back = mx.dequantize(*q, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
            w32 = w.astype(mx.float32)
            errors[self.name] = (mx.linalg.norm((back - w32).flatten()) / mx.linalg.norm(w32.flatten())).item()
        return dict(zip((o.name for o in self.outs), q))


def _checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of `model` in the checkpoint layout (mlx-lm's), which is what we write."""
    return {name: tuple(p.shape) for name, p in checkpoint_weights(dict(tree_flatten(model.parameters()))).items()}


def _plan(source: Source, model: nn.Module, quantization: dict | None, dtype: mx.Dtype,
          model_type: str) -> list[_Job]:
    layers = quantizable_layers(model)
    jobs = []

    def stored(name: str) -> str:
        return mlx_lm_name(name, model_type)

    for name in sorted(_checkpoint_shapes(model), key=lambda n: (is_mtp(n), n)):  # the MTP head last
        tensor = source.tensors[name]
        layer, kind = name.rsplit(".", 1)
        settings = layer_settings(quantization, stored(layer)) if quantization and kind == "weight" and \
            layer in layers else None
        if settings is None:
            # A_log stays float32 whatever --dtype says: exp(A_log) is the decay rate (mlx-lm's cast_predicate)
            own = mx.float32 if name.endswith(".A_log") else dtype
            outs = (_Out(name, tensor.shape, own, stored(name)),)
        else:
            group_size, bits, mode = settings
            *rows, cols = tensor.shape
            scale_dtype = dtype if mode == "affine" else mx.uint8
            outs = (_Out(f"{layer}.weight", (*rows, cols * bits // 32), mx.uint32, stored(f"{layer}.weight")),
                    _Out(f"{layer}.scales", (*rows, cols // group_size), scale_dtype, stored(f"{layer}.scales")))
            if mode == "affine":
                outs += (_Out(f"{layer}.biases", (*rows, cols // group_size), dtype, stored(f"{layer}.biases")),)
        jobs.append(_Job(name, tensor, settings, outs[0].dtype if settings is None else dtype, outs))
    return jobs


def _quantized_bits(jobs: list[_Job]) -> float | None:
    """Stored bits per weight of the quantized tensors, scales and biases included."""
    quantized = [j for j in jobs if j.settings is not None]
    params = sum(int(np.prod(j.tensor.shape)) for j in quantized)
    return 8 * sum(o.nbytes for j in quantized for o in j.outs) / params if params else None


# --- writing -------------------------------------------------------------------------------------------------

def _write_weights(tmp: Path, jobs: list[_Job], shard_size: int, progress: bool,
                   errors: dict[str, float] | None) -> tuple[dict[str, str], int]:
    """Stream every output tensor into safetensors shards of at most `shard_size` bytes (a bigger tensor gets a
    shard of its own); returns the weight map and the total size."""
    from tqdm import tqdm

    outs = [o for job in jobs for o in job.outs]
    # The MTP head (last in the plan; quantized like the rest, its norms float) goes into a file of its own,
    # outside the model*.safetensors that mlx-lm globs: mlx-lm has no MTP module and would refuse its tensors;
    # the index lists it, so qwen-mlx reads it.
    head = [o for o in outs if is_mtp(o.stored)]
    shards: list[list[_Out]] = []
    size = 0
    for o in outs[:len(outs) - len(head)]:
        if not shards or size + o.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if head:
        shards.append(head)
        names.append("mtp.safetensors")
    weight_map = {o.stored: names[i] for i, shard in enumerate(shards) for o in shard}
    total = sum(o.nbytes for o in outs)

    writer = _ShardWriter(tmp, shards, names)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress,
              dynamic_ncols=True) as bar:
        for job in jobs:
            arrays = job.arrays(errors)
            for o in job.outs:
                a = mx.contiguous(arrays.pop(o.name))  # row-major, as safetensors stores it
                mx.eval(a)
                if tuple(a.shape) != o.shape or a.dtype != o.dtype:
                    raise RuntimeError(f"{o.name}: planned {o.shape} {o.dtype}, computed {a.shape} {a.dtype}")
                writer.write(o, a)
                del a  # written: free it before the next one is computed
                bar.set_postfix_str(o.name, refresh=False)
                bar.update(o.nbytes)
    return weight_map, total


class _ShardWriter:
    """Writes safetensors files tensor by tensor: each shard's header first (every shape and offset is known from
    the plan), then the data as it is computed; a finished shard is fsynced and closed."""

    def __init__(self, directory: Path, shards: list[list[_Out]], names: list[str]):
        self._queue = [(directory / name, shard) for name, shard in zip(names, shards)]
        self._file = None
        self._left: list[_Out] = []

    def write(self, out: _Out, a: mx.array) -> None:
        if self._file is None:
            path, self._left = self._queue.pop(0)
            self._file = open(path, "wb")
            self._file.write(_safetensors_header(self._left))
        if self._left[0] != out:
            raise RuntimeError(f"{out.name} written out of order")
        self._left.pop(0)
        self._file.write(memoryview(a))
        if not self._left:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _safetensors_header(outs: list[_Out]) -> bytes:
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for o in outs:
        header[o.stored] = {"dtype": _SAFETENSORS_NAMES[o.dtype], "shape": list(o.shape),
                          "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value: dict) -> None:
    _write_file(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists (choose another output, or pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory")


@contextmanager
def _output_dir(out: Path, force: bool) -> Iterator[Path]:
    """A fresh hidden directory beside `out` that becomes `out` when the block completes (fsynced, renamed).

    A lock file beside `out` keeps two converts from writing the same output; whatever an interrupted convert left
    (its partial directory) is removed first, so a killed run never needs cleaning up by hand."""
    import fcntl

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    lock_path = parent / f".{out.name}.convert-lock"
    lock = open(lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConvertError(f"{out}: another convert is writing this output right now") from None
    try:
        for stale in list(parent.glob(f".{out.name}.partial-*")) + list(parent.glob(f".{out.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: their writer is gone
        _refuse_existing(out, force)
        tmp = parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            fsync_dir(tmp)
            old = None
            if out.exists():
                old = parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, old)
            os.rename(tmp, out)
            fsync_dir(parent)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock_path.unlink(missing_ok=True)
        lock.close()


# --- small files ---------------------------------------------------------------------------------------------

def _generation_config(config: dict) -> bytes:
    keys = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return (json.dumps(keys, indent=2) + "\n").encode()


def _card(source: str, name: str, cfg: ModelConfig, quantization: dict | None, dtype: mx.Dtype, total: int,
          bits: float | None) -> str:
    if quantization:
        overrides = sum(1 for k in quantization if k not in ("group_size", "bits", "mode"))
        what = (f"{quantization['bits']}-bit {quantization['mode']} quantization, group size "
                f"{quantization['group_size']}" + (f", {overrides} layers with their own settings (see config.json)"
                                                   if overrides else "")
                + (f"; {bits:.2f} bits per quantized weight" if bits else ""))
    else:
        what = f"unquantized {_DTYPE_NAMES[dtype]} weights"
    return f"""---
library_name: mlx
tags: [mlx, qwen-mlx]
base_model: {source}
---
# {name}

{cfg.model_type} ({cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}) converted from `{source}` by
qwen-mlx: {what}. Weights: {_human(total)}.

```bash
qwen-mlx chat --model {name}
```

```python
from mlx_lm import load  # mlx-lm reads the same layout
model, tokenizer = load("{name}")
```
"""


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
