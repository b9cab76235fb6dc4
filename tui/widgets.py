"""A turn of the conversation and the status bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Markdown, Static, TextArea
from textual.message import Message

from qwen_mlx.generate import GenerationStats


class Turn(Vertical):
    """The user's message, the model's thinking (collapsible, dimmed), its answer and a one-line summary."""

    def __init__(self, user_text: str, show_thinking: bool):
        super().__init__(classes="turn")
        self.user_text = user_text
        self.show_thinking = show_thinking
        self.thinking_text, self.answer_text = "", ""

    def compose(self) -> ComposeResult:
        yield Static(self.user_text, classes="user", markup=False)
        with Collapsible(title="Thinking…", collapsed=not self.show_thinking, classes="thinking"):
            yield Markdown(classes="thinking-text")
        yield Markdown(classes="answer")
        yield Static("", classes="summary", markup=False)

    def on_mount(self) -> None:
        self.query_one(Collapsible).display = False  # shown once thinking arrives; empty blocks stay hidden


def format_summary(stats: GenerationStats, finish_reason: str | None) -> str:
    parts = [f"{stats.generated_tokens} tokens", f"{stats.decode_tps:.1f} tok/s",
             f"prompt {stats.prompt_tokens} at {stats.prompt_tps:.0f} tok/s",
             f"first token {stats.time_to_first_token:.2f} s"]
    if finish_reason == "cancelled":
        parts.append("stopped")
    elif finish_reason == "length":
        parts.append("cut at max tokens")
    return " · ".join(parts)


class PromptInput(TextArea):
    """Enter sends; ctrl+j (any terminal) or shift+enter adds a newline."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            text = self.text.strip()
            if text:
                self.post_message(self.Submitted(text))
                self.clear()
            return
        if event.key in ("ctrl+j", "shift+enter"):
            event.prevent_default()
            event.stop()
            self.insert("\n")
            return
        await super()._on_key(event)
