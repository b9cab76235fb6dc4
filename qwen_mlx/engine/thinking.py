"""Split a stream of generated tokens into thinking and answer, by the `<think>` / `</think>` token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Channel = Literal["thinking", "answer"]


def prompt_opens_thinking(prompt: list[int], think_id: int | None, think_end_id: int | None) -> bool:
    """True when the prompt ends inside an open think block (thinking-only templates end with `<think>\\n`)."""
    if think_id is None or think_id not in prompt:
        return False
    last_open = len(prompt) - 1 - prompt[::-1].index(think_id)
    return think_end_id not in prompt[last_open:]


@dataclass
class ThinkingSplitter:
    """Feed generated tokens one by one; each comes back tagged with its channel, the markers themselves as None.

    The four cases: the model opens `<think>` itself; the prompt already opened it (`in_thinking=True`); the
    model never thinks (everything is answer); thinking is cut off (`unfinished` after the last token).
    """

    think_id: int | None
    think_end_id: int | None
    in_thinking: bool = False
    thought: bool = False  # a think block was seen (opened by the prompt or the model)

    def __post_init__(self):
        self.thought = self.in_thinking

    def feed(self, token: int) -> Channel | None:
        if token == self.think_id:
            self.in_thinking = self.thought = True
            return None
        if token == self.think_end_id and self.in_thinking:
            self.in_thinking = False
            return None
        return "thinking" if self.in_thinking else "answer"

    @property
    def unfinished(self) -> bool:
        """Thinking was still open when generation stopped (e.g. max_tokens)."""
        return self.in_thinking
