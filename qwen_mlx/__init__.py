"""qwen-mlx: fast, faithful Qwen3 inference on MLX.

    import qwen_mlx
    llm = qwen_mlx.load("Qwen/Qwen3-4B")           # or a local checkpoint directory
    print(llm.generate("Why is the sky blue?", think=False).text)
    for event in llm.stream("Explain RoPE briefly"):  # events: "thinking" / "answer" text, then "done"
        print(event.text, end="", flush=True)
    chat = llm.chat(system="You are terse.")
    for event in chat.send("hi"): ...
"""

import importlib

__version__ = "0.1.0"

# Imported when first used, so that `import qwen_mlx.cli` (and `qwen-mlx --help`) stays light and a Ctrl-C during
# start-up lands in cli.main, which turns it into exit status 130 instead of a traceback.
_EXPORTS = {"LLM": "qwen_mlx.api", "Event": "qwen_mlx.api", "Reply": "qwen_mlx.api", "load": "qwen_mlx.api",
            "ChatSession": "qwen_mlx.engine.chat", "GenerationStats": "qwen_mlx.engine.generate",
            "SamplingParams": "qwen_mlx.engine.sampling", "UserError": "qwen_mlx.errors",
            "ModelConfig": "qwen_mlx.models.config", "LoadError": "qwen_mlx.weights.names",
            "load_model": "qwen_mlx.weights.loader"}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen_mlx' has no attribute {name!r}")
