"""A multi-turn conversation that keeps its KV cache, so each turn prefills only what changed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from qwen_mlx.cache.prefix import common_prefix
from qwen_mlx.cache.recurrent import keep_snapshots, restore_point
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.engine.stream import Event, Generator, check_context, stream_reply


def reply_content(thinking: str, answer: str) -> str:
    """An assistant message as the chat template reads it back: the think block first (Qwen3's template parses it
    out, and drops it from earlier turns)."""
    if not thinking:
        return answer
    return "<think>\n" + thinking.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")


def split_reply_content(content: str) -> tuple[str, str]:
    """(thinking, answer) of a stored assistant message; the inverse of reply_content."""
    if content.startswith("<think>") and "</think>" in content:
        thinking, answer = content[len("<think>"):].split("</think>", 1)
        return thinking.strip("\n"), answer.lstrip("\n")
    return "", content


class ChatSession:
    """Message history plus the KV cache of the tokens last run.

    Each turn renders the whole history with the chat template, keeps the longest common token prefix of that and
    what the cache holds, trims the rest, and prefills only the difference. (Qwen3's template drops earlier turns'
    reasoning, so the previous answer is re-read without its think block: that is the template's choice, and the
    cache follows it exactly.) A hybrid model's recurrent layers cannot forget tokens, so each turn keeps a
    snapshot of their state where its generation prompt begins (where the next rendering may part from this
    one) and the next turn goes back to the latest snapshot within the common prefix.
    """

    def __init__(self, llm: Generator, *, system: str | None = None, think: bool = True, max_kv_size: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int | None = None,
                 sampling: SamplingParams | None = None):
        self.llm = llm
        self.think = think
        self.sampling = sampling
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._cache_options = {"max_size": max_kv_size, "bits": kv_bits, "group_size": kv_group_size}
        self.cache = self._new_cache()
        self._cached: list[int] = []  # the tokens the cache holds, in order
        self.last_prefill = 0  # tokens prefilled by the last turn

    def _new_cache(self):
        return self.llm.new_cache(**self._cache_options)

    def send(self, text: str, *, think: bool | None = None, max_tokens: int = 1024,
             stop: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply; the reply (even a cut-off one) joins the history."""
        think = self.think if think is None else think
        self.messages.append({"role": "user", "content": text})
        prompt = self.llm.prompt_tokens(self.messages, think=think)
        check_context(prompt, self.llm.config, self.cache)
        keep = self._reuse(prompt)
        keep_snapshots(self.cache, self._parting_points(prompt, think))
        new = prompt[keep:]
        self.last_prefill = len(new)
        sampling = self.sampling or self.llm.sampling(think)
        generated: list[int] = []
        answer, thinking = [], []
        for event in stream_reply(self.llm, prompt, self.cache, new, sampling, max_tokens=max_tokens, stop=stop,
                                  generated=generated):
            (answer if event.kind == "answer" else thinking if event.kind == "thinking" else []).append(event.text)
            yield event
        self.messages.append({"role": "assistant", "content": reply_content("".join(thinking), "".join(answer))})
        self._cached = (prompt + generated)[: self.cache[0].offset]

    def _parting_points(self, prompt: list[int], think: bool) -> list[int]:
        """Where the next turn's rendering may part from `prompt`: where the generation prompt begins, and where
        this turn's reply, once it is history followed by another question, is rendered differently from the
        generation prompt (after `<|im_start|>assistant\n` for a template that drops the reasoning)."""
        tok = self.llm.tokenizer
        history = tok.encode_chat(self.messages, enable_thinking=think, add_generation_prompt=False)
        later = [*self.messages, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
        as_history = tok.encode_chat(later, enable_thinking=think, add_generation_prompt=False)
        return [common_prefix(history, prompt), common_prefix(as_history, prompt)]

    def _reuse(self, prompt: list[int]) -> int:
        """Trim the cache to the longest prefix it shares with `prompt` that it can go back to (leaving at least
        one token to run; a recurrent layer, to its latest snapshot within that prefix); returns its length."""
        common = restore_point(self.cache, min(common_prefix(self._cached, prompt), len(prompt) - 1))
        held = self.cache[0].offset
        if held - common > 0 and any(c.trim(held - common) != held - common for c in self.cache):
            self.cache, common = self._new_cache(), 0  # this cache cannot forget that far back: start over
        return common

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cache, self._cached = self._new_cache(), []

