"""qwen-mlx: fast, faithful Qwen3 inference on MLX.

    import qwen_mlx
    llm = qwen_mlx.load("Qwen/Qwen3-4B")           # or a local checkpoint directory
    print(llm.generate("Why is the sky blue?", think=False).text)
    for event in llm.stream("Explain RoPE briefly"):  # events: "thinking" / "answer" text, then "done"
        print(event.text, end="", flush=True)
    chat = llm.chat(system="You are terse.")
    for event in chat.send("hi"): ...
"""

from qwen_mlx.api import LLM, Event, Reply, load
from qwen_mlx.engine.chat import ChatSession
from qwen_mlx.engine.generate import GenerationStats
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.errors import UserError
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.weights.loader import load_model
from qwen_mlx.weights.names import LoadError

__version__ = "0.1.0"

__all__ = ["ChatSession", "Event", "GenerationStats", "LLM", "LoadError", "ModelConfig", "Reply", "SamplingParams",
           "UserError", "__version__", "load", "load_model"]
