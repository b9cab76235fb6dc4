"""qwen-mlx: fast, faithful Qwen3 inference on MLX.

    import qwen_mlx
    llm = qwen_mlx.load("Qwen/Qwen3-4B")           # or a local checkpoint directory
    print(llm.generate("Why is the sky blue?", think=False).text)
    for event in llm.stream("Explain RoPE briefly"):  # events: "thinking" / "answer" text, then "done"
        print(event.text, end="", flush=True)
    chat = llm.chat(system="You are terse.")
    for event in chat.send("hi"): ...
"""

from .api import LLM, Event, Reply, load
from .chat import ChatSession
from .config import ModelConfig
from .errors import UserError
from .generate import GenerationStats
from .loader import LoadError, load_model
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["ChatSession", "Event", "GenerationStats", "LLM", "LoadError", "ModelConfig", "Reply", "SamplingParams",
           "UserError", "__version__", "load", "load_model"]
