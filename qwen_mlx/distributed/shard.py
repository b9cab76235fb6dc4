"""What each rank holds, swapped in from outside the model page (like weights/quant.py): its experts of each MoE
layer (`expert`), its heads and MLP columns of each layer (`tensor`), and for a pipeline stage the modules that
receive the previous rank's hidden states and send its own to the next, in place of the embedding and final norm,
so that every rank runs the model's own forward. And what a rank reads of the checkpoint (weights.loader.Part): its
pipeline stage's tensors, or its experts of every expert stack."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from qwen_mlx.distributed.plan import DistributedError, check_tensor_split, expert_range, pipeline_plan
from qwen_mlx.models.build import build_model
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import MLP, Model, SparseMoE, SwitchMLP
from qwen_mlx.weights.loader import TensorInfo, load_config, load_model
from qwen_mlx.weights.names import LoadError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Stage:
    """What a pipeline stage reads (a weights.loader.Part): decoder layers `layers`, numbered from 0 in its model,
    plus the embedding if it is first (or last with a tied head) and the final norm and head if it is last."""

    layers: range
    experts = None  # every expert of its layers

    def build(self, cfg: ModelConfig) -> Model:
        layers = self.layers
        if not (0 <= layers.start < layers.stop <= cfg.num_hidden_layers and layers.step == 1):
            raise LoadError(f"layers {layers.start}..{layers.stop - 1} are not a stage of this "
                            f"{cfg.num_hidden_layers}-layer model")
        model = build_model(cfg, layers)
        first, last = layers.start == 0, layers.stop == cfg.num_hidden_layers
        if not first and not (last and cfg.tie_word_embeddings):
            del model.model["embed_tokens"]
        if not last:
            del model.model["norm"]
            if "lm_head" in model:
                del model["lm_head"]
        return model

    def names(self, index: dict[str, TensorInfo], model: Model) -> dict[str, str]:
        modules = {path for path, _ in model.named_modules()}
        names = {}
        for name in index:
            m = _LAYER.match(name)
            if m:
                if int(m[1]) in self.layers:
                    names[name] = f"model.layers.{int(m[1]) - self.layers.start}.{m[2]}"
            elif name.rsplit(".", 1)[0] in modules:
                names[name] = name
        return names

    def quantization(self, quantization: dict) -> dict:
        out = {}
        for key, value in quantization.items():
            m = _LAYER.match(key)
            if not m:
                out[key] = value
            elif int(m[1]) in self.layers:
                out[f"model.layers.{int(m[1]) - self.layers.start}.{m[2]}"] = value
        return out


@dataclass(frozen=True)
class HeldExperts:
    """What a rank of a split mixture of experts reads (a weights.loader.Part): these experts of every MoE layer,
    stacked from 0 (its router still scores all of them: ExpertShard maps the ids), and every other tensor."""

    experts: range

    def build(self, cfg: ModelConfig) -> Model:
        experts = self.experts
        if not (cfg.num_experts and 0 <= experts.start < experts.stop <= cfg.num_experts and experts.step == 1):
            raise LoadError(f"experts {experts.start}..{experts.stop - 1} are not a range of this model's "
                            f"{cfg.num_experts} experts")
        model = build_model(cfg)
        for layer in model.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.switch_mlp = SwitchMLP(cfg.hidden_size, cfg.moe_intermediate_size, len(experts))
        return model

    def names(self, index: dict[str, TensorInfo], model: Model) -> None:
        return None

    def quantization(self, quantization: dict) -> dict:
        return quantization


class ExpertShard(nn.Module):
    """The experts of an MoE layer that this rank holds (loaded alone: load_model(part=HeldExperts(...))), in the
    layer's place for its SwitchMLP: the layer's router runs on every rank, each rank applies the selected experts it
    holds (weighted; the others weigh zero) and one all_sum adds the ranks' parts."""

    def __init__(self, held: SwitchMLP, experts: range, group: mx.distributed.Group):
        super().__init__()
        count = held.down_proj.weight.shape[0]
        if count != len(experts):
            raise ValueError(f"an ExpertShard of experts {experts.start}..{experts.stop - 1} needs a layer holding "
                             f"those {len(experts)} experts, not {count}: load it with HeldExperts")
        self.held = held
        self._first, self._count, self._group = experts.start, len(experts), group

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """As SwitchMLP's: x (B, L, dim), the router's experts (ids of all ranks' experts) and weights (B, L, k)."""
        local = experts - self._first
        mine = (local >= 0) & (local < self._count)
        # Pairs routed elsewhere run through local expert 0 and weigh zero (a gather needs a valid index).
        y = self.held(x, mx.where(mine, local, 0).astype(experts.dtype), mx.where(mine, weights, 0.0))
        return mx.distributed.all_sum(y, group=self._group)  # (B, L, dim)


def shard_experts(model: Model, group: mx.distributed.Group) -> None:
    """The MoE layers of a model that holds this rank's experts (load_model(part=HeldExperts(...))) route
    over all the ranks' experts."""
    mine = rank_experts(model.config, group)
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp.switch_mlp = ExpertShard(layer.mlp.switch_mlp, mine, group)


def rank_experts(cfg: ModelConfig, group: mx.distributed.Group) -> range | None:
    """The experts this rank holds (None for a model without experts)."""
    if not cfg.num_experts:
        return None
    if cfg.num_experts < group.size():
        raise DistributedError(f"--mode expert splits {cfg.num_experts} experts: use -n 1 to {cfg.num_experts}")
    return expert_range(cfg.num_experts, group.rank(), group.size())


def shard_tensor(model: Model, group: mx.distributed.Group) -> None:
    """Attention heads and dense MLP columns split over the group; MoE layers (loaded with this rank's experts
    only, see shard_experts) split their experts."""
    n = group.size()
    check_tensor_split(model.config, n)
    for layer in model.layers:
        a = layer.self_attn
        a.q_proj, a.k_proj, a.v_proj = (shard_linear(p, "all-to-sharded", group=group)
                                        for p in (a.q_proj, a.k_proj, a.v_proj))
        a.o_proj = shard_linear(a.o_proj, "sharded-to-all", group=group)  # all_sum after the attention
        a.n_heads, a.n_kv_heads = a.n_heads // n, a.n_kv_heads // n  # contiguous slices keep GQA groups whole
        if isinstance(layer.mlp, MLP):
            m = layer.mlp
            m.gate_proj = shard_linear(m.gate_proj, "all-to-sharded", group=group)
            m.up_proj = shard_linear(m.up_proj, "all-to-sharded", group=group)
            m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)  # all_sum after the MLP
    shard_experts(model, group)



class Receive(nn.Module):
    """A pipeline stage's input after the first: the previous rank's hidden states (B, L, dim) stand in for the
    token embedding. The last stage of a tied model keeps the embedding here, for its head (`as_linear`)."""

    def __init__(self, dim: int, dtype: mx.Dtype, group: mx.distributed.Group, embedding: nn.Module | None):
        super().__init__()
        if embedding is not None:
            self.embedding = embedding
        self._dim, self._dtype, self._group = dim, dtype, group

    def __call__(self, tokens: mx.array) -> mx.array:
        return mx.distributed.recv((*tokens.shape, self._dim), self._dtype, self._group.rank() - 1, group=self._group)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.embedding.as_linear(h)


class Send(nn.Module):
    """A pipeline stage's output before the last: its hidden states (B, L, dim) go to the next rank, in place of
    the final norm; returns them (evaluating the result sends them)."""

    def __init__(self, dtype: mx.Dtype, group: mx.distributed.Group):
        super().__init__()
        self._dtype, self._group = dtype, group

    def __call__(self, h: mx.array) -> mx.array:
        return mx.distributed.send(h.astype(self._dtype), self._group.rank() + 1, group=self._group)


def pipeline_stage(model: Model, group: mx.distributed.Group) -> None:
    """A stage model (load_model(part=Stage(...))) of this rank joined to its neighbours: it receives its input from the
    rank before (unless first) and sends its output to the rank after (unless last)."""
    rank, n = group.rank(), group.size()
    m = model.model
    dtype = m.layers[0].input_layernorm.weight.dtype  # what the residual stream is held in
    if rank > 0:
        m.embed_tokens = Receive(model.config.hidden_size, dtype, group, m.get("embed_tokens"))
    if rank < n - 1:
        m.norm = Send(dtype, group)


def load_rank(path: Path, mode: str, group: mx.distributed.Group,
              dtype: mx.Dtype | None = None) -> tuple[Model, range | None]:
    """This rank's share of the model: its pipeline stage (returned too), or its slices of every layer."""
    cfg = load_config(path)
    if mode == "pipeline":
        stage = pipeline_plan(path, cfg, group.size())[group.rank()]
        return load_model(path, dtype=dtype, part=Stage(stage), prepare=lambda m: pipeline_stage(m, group))[0], stage
    if mode == "expert" and not cfg.num_experts:
        raise DistributedError(f"--mode expert needs a mixture-of-experts model; {cfg.model_type} has no experts: "
                               "use --mode pipeline or tensor")
    if mode == "tensor":
        check_tensor_split(cfg, group.size())  # before reading anything
    experts = rank_experts(cfg, group)
    share = shard_tensor if mode == "tensor" else shard_experts
    return load_model(path, dtype=dtype, part=HeldExperts(experts) if experts is not None else None,
                      prepare=lambda m: share(m, group))[0], None
