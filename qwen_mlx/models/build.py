"""The model class a config describes."""

from __future__ import annotations

import mlx.nn as nn

from qwen_mlx.models import qwen3, qwen3_5
from qwen_mlx.models.config import HYBRID_MODEL_TYPES, ModelConfig


def build_model(cfg: ModelConfig, layers: range | None = None, mtp: bool = False) -> nn.Module:
    """The decoder for cfg.model_type with random (lazy) weights: qwen3_5.Model for the hybrid family, else
    qwen3.Model. `layers` builds only those decoder layers (a pipeline stage); `mtp` adds the hybrid models' MTP
    head (qwen3_5.MTP)."""
    if cfg.model_type in HYBRID_MODEL_TYPES:
        return qwen3_5.Model(cfg, layers, mtp)
    return qwen3.Model(cfg, layers)
