"""qwen-mlx: fast, faithful Qwen3 inference on MLX."""

from .config import ModelConfig
from .errors import UserError
from .loader import LoadError, load_model

__version__ = "0.1.0"

__all__ = ["LoadError", "ModelConfig", "UserError", "__version__", "load_model"]
