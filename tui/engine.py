"""What the chat app needs from a model: one seam, so the app can be driven by a scripted engine in tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from qwen_mlx.api import LLM, Event

SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class Engine(Protocol):
    name: str  # shown in the status bar, e.g. "Qwen3-4B"
    details: str  # weights and kernels, e.g. "4-bit g64 · kernels: metal"

    def send(self, text: str, *, think: bool, stop: threading.Event) -> Iterator[Event]:
        """Add a user message and stream the reply; called on a worker thread."""
        ...

    def context(self) -> tuple[int, int | None]:
        """(tokens in the KV cache, its capacity: the rotating window or the model's context length)."""
        ...

    def restore(self, messages: list[dict]) -> None:
        """Replace the conversation (empty: start over). The system prompt stays unless `messages` has one."""
        ...

    def messages(self) -> list[dict]:
        """The conversation so far, system prompt first if there is one."""
        ...

    def set_system(self, text: str | None) -> None: ...


class ModelEngine:
    """A real model: a ChatSession over a loaded LLM (qwen_mlx.load(), or rank 0's share of a model split over
    several ranks, distributed.DistributedLLM: the same interface)."""

    def __init__(self, llm: LLM, *, system: str | None = None, max_kv_size: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int | None = None, max_tokens: int = 4096,
                 sampling_overrides: dict | None = None):
        from qwen_mlx.kernels import ops as kernels

        self.llm = llm
        self.name = self.llm.path.name
        quant = self.llm.config.quantization
        weights = f"{quant['bits']}-bit g{quant['group_size']}" if quant else SHORT_DTYPES.get(
            self.llm.config.torch_dtype, self.llm.config.torch_dtype)
        self.details = f"{weights} · kernels: {kernels.BACKEND}"
        self.capacity = max_kv_size or self.llm.config.max_position_embeddings
        self.max_kv_size, self.max_tokens = max_kv_size, max_tokens
        self.sampling_overrides = sampling_overrides or {}
        self.session = self.llm.chat(system=system, max_kv_size=max_kv_size, kv_bits=kv_bits,
                                     kv_group_size=kv_group_size)
        self.last_prompt: list[int] = []

    def send(self, text: str, *, think: bool, stop: threading.Event) -> Iterator[Event]:
        self.session.sampling = self.llm.sampling(think, **self.sampling_overrides)
        self.last_prompt = self.llm.prompt_tokens(self.session.messages + [{"role": "user", "content": text}],
                                                  think=think)
        yield from self.session.send(text, think=think, max_tokens=self.max_tokens, stop=stop)

    def context(self) -> tuple[int, int | None]:
        """(tokens the KV cache holds, its capacity): under a window, what the window keeps of the tokens seen."""
        return min(self.session.cache[0].offset, self.capacity), self.capacity

    def restore(self, messages: list[dict]) -> None:
        self.session.reset()
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            self.set_system(system[0])
        self.session.messages.extend(m for m in messages if m["role"] != "system")

    def messages(self) -> list[dict]:
        return list(self.session.messages)

    def set_system(self, text: str | None) -> None:
        rest = [m for m in self.session.messages if m["role"] != "system"]
        self.session.messages = ([{"role": "system", "content": text}] if text else []) + rest
