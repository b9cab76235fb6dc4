"""The hybrid models' GGUF files (llama.cpp's qwen35, qwen35moe, qwen3next): their config keys, and their tensors
with llama.cpp's converter's transforms undone into the model's values (models/qwen3_5.py):
  - ssm_a is -exp(A_log): A_log = log(-ssm_a); dt_bias is written as ssm_dt.bias;
  - ssm_conv1d is (channels, width), squeezed: the model's (channels, width, 1);
  - the zero-centred norms hold 1 + w, as the model does (the gated ssm_norm is a plain scale in both);
  - qwen35/qwen35moe with more value heads than key heads: the value heads are tiled ([v0 of every key head, v1 of
    every key head, ...]) rather than grouped by key head, in attn_qkv's v rows, attn_gate, ssm_beta, ssm_alpha,
    ssm_a, ssm_dt, ssm_conv1d's v channels and ssm_out's columns; they are grouped again;
  - qwen3next's in_proj_qkvz (q, k, v, z interleaved per key head) is written as attn_qkv ([q | k | v]) and
    attn_gate (z): interleaved again; ssm_ba is in_proj_ba as it is.
Which layers are linear comes from the tensors each block holds (full_attention_interval cannot say another order).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.models.config import LAYER_TYPES
from qwen_mlx.weights.gguf_file import GGUFError, Metadata, TensorInfo, load_tensor


def hybrid_config(path: Path, get: Metadata, tensors: dict[str, TensorInfo], n_layers: int, cfg: dict,
                   dense: list[int]) -> dict:
    """The Gated DeltaNet and gated-attention keys of a qwen35 / qwen35moe / qwen3next file."""
    model_type = cfg["model_type"]
    layer_types = []
    for i in range(n_layers):
        linear, full = f"blk.{i}.ssm_out.weight" in tensors, f"blk.{i}.attn_q.weight" in tensors
        if linear == full:
            raise GGUFError(f"{path}: block {i} holds {'both' if linear else 'neither'} a linear-attention "
                            "(ssm_out) and a full-attention (attn_q) projection")
        layer_types.append(LAYER_TYPES[full])
    head_dim, rotary = cfg["head_dim"], get("rope.dimension_count", int)
    factor = rotary / head_dim if head_dim else 0.0
    if not 0 < rotary <= head_dim or int(head_dim * factor) != rotary:
        raise GGUFError(f"{path}: {get.arch}.rope.dimension_count {rotary} is not a share of the head dim {head_dim}")
    linear = {key: get(key, int) for key in ("ssm.group_count", "ssm.time_step_rank", "ssm.state_size",
                                              "ssm.inner_size", "ssm.conv_kernel")}
    for key, value in linear.items():
        if value <= 0:
            raise GGUFError(f"{path}: {get.arch}.{key} must be positive, got {value}")
    heads_k, heads_v, inner = linear["ssm.group_count"], linear["ssm.time_step_rank"], linear["ssm.inner_size"]
    if heads_v % heads_k or inner % heads_v:
        raise GGUFError(f"{path}: {get.arch}.ssm.time_step_rank {heads_v} (value heads) must be a multiple of "
                        f"ssm.group_count {heads_k} (key heads) and divide ssm.inner_size {inner}")
    out = {
        "layer_types": layer_types,
        "full_attention_interval": get("full_attention_interval", int, 4),  # what mlx-lm reads instead
        "linear_num_key_heads": heads_k,
        "linear_num_value_heads": heads_v,
        "linear_key_head_dim": linear["ssm.state_size"],
        "linear_value_head_dim": inner // heads_v,
        "linear_conv_kernel_dim": linear["ssm.conv_kernel"],
    }
    if model_type == "qwen3_next":  # mlx-lm's Qwen3-Next reads these at the top level, and needs every key
        out.update(partial_rotary_factor=factor, intermediate_size=cfg.get("intermediate_size", 0))
    else:  # mlx-lm's Qwen3.5 reads rope_parameters only
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                                  "partial_rotary_factor": factor}
    if model_type in ("qwen3_5_moe", "qwen3_next"):
        if model_type == "qwen3_5_moe":
            if dense:
                raise GGUFError(f"{path}: block {dense[0]} has no router (ffn_gate_inp); every layer of a "
                                f"{get.arch} model is a mixture of experts")
            out.update(num_experts=get("expert_count", int), num_experts_per_tok=get("expert_used_count", int),
                       moe_intermediate_size=get("expert_feed_forward_length", int))
        out["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length", int)
    return out


def hybrid_tensors(path: Path, infos: dict[str, TensorInfo], cfg: dict) -> dict:
    """The hybrid model's tensors (name -> (shape, load)) from the file's, llama.cpp's transforms undone."""
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    Dk, Dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    tiled = cfg["model_type"] != "qwen3_next" and Hv != Hk  # llama.cpp's Qwen3.5 converter tiles value heads
    key_dim, value_dim, hidden = Hk * Dk, Hv * Dv, cfg["hidden_size"]
    width = cfg["linear_conv_kernel_dim"]
    # the shapes the metadata implies, as the file holds them
    shapes = {"in_proj_qkv.weight": (2 * key_dim + value_dim, hidden), "in_proj_z.weight": (value_dim, hidden),
              "in_proj_b.weight": (Hv, hidden), "in_proj_a.weight": (Hv, hidden),
              "in_proj_ba.weight": (2 * Hv, hidden), "conv1d.weight": (2 * key_dim + value_dim, width),
              "A_log": (Hv,), "dt_bias": (Hv,), "norm.weight": (Dv,), "out_proj.weight": (hidden, value_dim)}

    def grouped(x: np.ndarray, axis: int, d: int) -> np.ndarray:
        """Value heads along `axis` (heads x d) from llama.cpp's tiled order (Hv / Hk, Hk, d) to grouped (Hk, ...)."""
        if not tiled:
            return x
        shape = x.shape
        x = x.reshape(*shape[:axis], Hv // Hk, Hk, d, *shape[axis + 1:])
        return np.swapaxes(x, axis, axis + 1).reshape(shape)

    def value(name: str, x: np.ndarray) -> np.ndarray:
        leaf = name.rpartition(".linear_attn.")[2]
        if leaf == "in_proj_qkv.weight":
            return np.concatenate([x[:2 * key_dim], grouped(x[2 * key_dim:], 0, Dv)])
        if leaf == "in_proj_z.weight":
            return grouped(x, 0, Dv)
        if leaf in ("in_proj_b.weight", "in_proj_a.weight", "dt_bias"):
            return grouped(x, 0, 1)
        if leaf == "A_log":
            return grouped(np.log(-x), 0, 1)
        if leaf == "conv1d.weight":
            x = np.concatenate([x[:2 * key_dim], grouped(x[2 * key_dim:], 0, Dv)])
            return x[:, :, None]  # (C, width) -> (C, width, 1)
        if leaf == "out_proj.weight":
            return grouped(x, 1, Dv)
        return x

    out = {}
    for name, info in infos.items():
        leaf = name.rpartition(".linear_attn.")[2] if ".linear_attn." in name else None
        expected = shapes.get(leaf)
        if expected is not None and info.shape != expected:
            raise GGUFError(f"{path}: tensor {info.name} has shape {info.shape}; the metadata makes it {expected}")
        if leaf == "A_log" and not (load_tensor(path, info) < 0).all():  # a few floats, checked before any write
            raise GGUFError(f"{path}: tensor {info.name} must be negative (llama.cpp stores -exp(A_log))")
        shape = (*info.shape, 1) if leaf == "conv1d.weight" else info.shape
        out[name] = (shape, lambda n=name, i=info: mx.array(value(n, load_tensor(path, i))))
    if cfg["model_type"] == "qwen3_next":
        _interleave_qkvz(path, infos, out, Hk)
    return out


def _interleave_qkvz(path: Path, infos: dict[str, TensorInfo], out: dict, Hk: int) -> None:
    """qwen3next: attn_qkv ([q | k | v], all heads each) and attn_gate (z) -> in_proj_qkvz, [q, k, v, z] for each
    key head in turn (the order Qwen3-Next's checkpoints and the model use), in place."""
    for qkv_name in [n for n in out if n.endswith(".linear_attn.in_proj_qkv.weight")]:
        z_name = qkv_name.replace(".in_proj_qkv.", ".in_proj_z.")
        if z_name not in out:
            raise GGUFError(f"{path}: tensor {infos[qkv_name].name.replace('attn_qkv', 'attn_gate')} is missing")
        (qkv_shape, qkv), (z_shape, z) = out.pop(qkv_name), out.pop(z_name)
        value_rows, hidden = z_shape
        key_rows = (qkv_shape[0] - value_rows) // 2

        def join(qkv=qkv, z=z, k=key_rows, hidden=hidden) -> mx.array:
            w, gate = qkv(), z()
            parts = (w[:k], w[k:2 * k], w[2 * k:], gate)  # q, k, v, z: each (heads * dim, hidden)
            return mx.concatenate([p.reshape(Hk, -1, p.shape[-1]) for p in parts], axis=1).reshape(-1, hidden)

        out[qkv_name.replace(".in_proj_qkv.", ".in_proj_qkvz.")] = ((2 * key_rows + 2 * value_rows, hidden), join)
    unpaired = [n for n in out if n.endswith(".linear_attn.in_proj_z.weight")]
    if unpaired:
        raise GGUFError(f"{path}: tensor {infos[unpaired[0]].name.replace('attn_gate', 'attn_qkv')} is missing")
