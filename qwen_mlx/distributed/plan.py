"""Where a model splits over n ranks: pipeline stages balanced by bytes, the tensor split's conditions, each rank's
experts, the bytes each rank holds in each mode, and `--distributed auto`'s choice. Reads checkpoint headers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_mlx.errors import UserError
from qwen_mlx.models.config import HYBRID_MODEL_TYPES, ModelConfig
from qwen_mlx.weights.loader import load_config, model_names, read_index

MODES = ("pipeline", "tensor", "expert")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


class DistributedError(UserError):
    """A model cannot be split as asked (the message names the flag and the values that work)."""

def plan_stages(costs: list[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Split layers with these byte costs into n contiguous non-empty stages minimizing the largest stage; the first
    stage also holds `first_extra` bytes (the embedding), the last `last_extra` (norm and head)."""
    L = len(costs)
    if not 1 <= n <= L:
        raise DistributedError(f"a pipeline over {n} ranks needs at least {n} layers; this model has {L}: "
                               f"use -n 1 to {L}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> int:  # layers i..j-1 as one stage
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0) + (last_extra if j == L else 0)

    # best[k][j]: the smallest largest stage when the first j layers form k stages; cut[k][j]: where the last starts
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, L + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    stages, j = [], L
    for k in range(n, 0, -1):
        stages.append(range(cut[k][j], j))
        j = cut[k][j]
    return stages[::-1]


def pipeline_plan(path: Path, cfg: ModelConfig, n: int) -> list[range]:
    """The stages for n ranks, balanced by the checkpoint's tensor bytes (read from the headers only)."""
    costs = [0] * cfg.num_hidden_layers
    first = last = 0
    for name, info in _text_index(path).items():
        size = _DTYPE_BYTES.get(info.dtype, 4) * int(np.prod(info.shape))
        if name.startswith("model.layers."):
            costs[int(name.split(".")[2])] += size
        elif name.startswith("model.embed_tokens."):
            first += size
            last += size if cfg.tie_word_embeddings else 0
        else:  # final norm, LM head
            last += size
    return plan_stages(costs, n, first, last)


def _text_index(path: Path) -> dict:
    """The checkpoint's tensors that the text model reads, by the model's names (a hybrid image-text file's
    `model.language_model.*` as `model.*`; its vision tower and MTP head left out)."""
    index = read_index(path)
    names = model_names(index)
    return {names[k]: v for k, v in index.items() if k in names}


def memory_plan(path: Path, n: int) -> dict[str, list[int] | str]:
    """Weight bytes each of n ranks holds in each mode (from the checkpoint headers, nothing read), or the reason a
    mode does not apply; plus "kv_per_token": KV-cache bytes per token of context on each rank, per mode."""
    cfg = load_config(path)
    index = _text_index(path)
    size = {name: _DTYPE_BYTES.get(info.dtype, 4) * int(np.prod(info.shape)) for name, info in index.items()}
    norm = next((info for name, info in index.items() if name.endswith("input_layernorm.weight")), None)
    kv_item = _DTYPE_BYTES.get(norm.dtype, 2) if norm else 2  # the cache holds the activations' dtype
    kv_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_item  # keys and values of one token, one layer

    def attention(layers: range) -> int:  # layers with a KV cache (a linear layer's state does not grow)
        return sum(not cfg.is_linear_layer(i) for i in layers)
    plan: dict = {}
    try:
        stages = pipeline_plan(path, cfg, n)
        per = [0] * n
        owner = {i: r for r, st in enumerate(stages) for i in st}
        for name, b in size.items():
            if name.startswith("model.layers."):
                per[owner[int(name.split(".")[2])]] += b
            elif name.startswith("model.embed_tokens."):
                per[0] += b
                if cfg.tie_word_embeddings and n > 1:
                    per[-1] += b
            else:
                per[-1] += b
        plan["pipeline"] = per
        plan["pipeline_kv_per_token"] = [attention(st) * kv_layer for st in stages]
    except DistributedError as e:
        plan["pipeline"] = str(e)
    expert_share = max(len(expert_range(cfg.num_experts, r, n)) for r in range(n)) / cfg.num_experts \
        if cfg.num_experts and cfg.num_experts >= n else 1.0

    def share(split_dense: bool) -> int:
        total = 0
        for name, b in size.items():
            if ".mlp.experts." in name or ".mlp.switch_mlp." in name:
                total += b * expert_share
            elif split_dense and any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj")):
                total += b / n
            else:
                total += b
        return int(total)

    try:
        check_tensor_split(cfg, n)
        plan["tensor"] = [share(True)] * n
        plan["tensor_kv_per_token"] = [cfg.num_hidden_layers * kv_layer // n] * n
    except DistributedError as e:
        plan["tensor"] = str(e)
    if not cfg.num_experts:
        plan["expert"] = "no experts in this model"
    elif cfg.num_experts < n:
        plan["expert"] = f"{cfg.num_experts} experts cannot be split over {n} ranks"
    else:
        plan["expert"] = [share(False)] * n
        plan["expert_kv_per_token"] = [attention(range(cfg.num_hidden_layers)) * kv_layer] * n
    return plan


def check_tensor_split(cfg: ModelConfig, n: int) -> None:
    """Raise naming the -n values that work when the heads (or MLP columns) of this model do not split n ways."""
    if cfg.model_type in HYBRID_MODEL_TYPES:
        raise DistributedError(f"--mode tensor does not split a {cfg.model_type} model's Gated DeltaNet layers: use "
                               "--mode pipeline" + (" or expert" if cfg.num_experts else ""))

    def ok(k: int) -> bool:
        if cfg.num_key_value_heads % k:
            return False
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        if dense and cfg.intermediate_size % k:
            return False
        if cfg.num_experts and cfg.num_experts < k:
            return False
        group = (cfg.quantization or {}).get("group_size")
        if group and ((cfg.num_attention_heads // k * cfg.head_dim) % group
                      or (dense and (cfg.intermediate_size // k) % group)):
            return False  # a rank's slice of O or down must hold whole quantization groups
        return True

    if not ok(n):
        valid = [k for k in range(1, cfg.num_key_value_heads + 1) if ok(k)]
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        raise DistributedError(
            f"--mode tensor cannot split this model over -n {n}: each rank needs whole KV heads (with their "
            f"{rep} query heads each) of the {cfg.num_key_value_heads}, an equal share of the MLP columns and whole "
            f"quantization groups; use -n {' or '.join(map(str, valid))}, or --mode pipeline"
            + (" or expert" if cfg.num_experts else ""))


def expert_range(num_experts: int, rank: int, n: int) -> range:
    """This rank's experts: contiguous, the first num_experts % n ranks hold one more."""
    base, extra = divmod(num_experts, n)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def choose_mode(cfg: ModelConfig, n: int) -> tuple[str, str]:
    """`--distributed auto`: (mode, why). A mixture of experts splits its experts (one exchange per layer); a dense
    model splits its heads when they divide n ways (each rank reads 1/n of every layer), else its layers."""
    if cfg.num_experts >= n > 1 and cfg.num_experts:
        return "expert", f"a mixture-of-experts model: its {cfg.num_experts} experts split over {n} ranks"
    try:
        check_tensor_split(cfg, n)
        return "tensor", f"a dense model whose {cfg.num_key_value_heads} KV heads split over {n} ranks"
    except DistributedError:
        return "pipeline", f"its {cfg.num_key_value_heads} KV heads do not split over {n} ranks: layers do"

