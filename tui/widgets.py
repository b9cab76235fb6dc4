"""A turn of the conversation and the status bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea

from qwen_mlx.engine.generate import GenerationStats


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


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_speculation(stats: GenerationStats) -> str:
    """Speculative decoding's figures: drafted tokens accepted, generated tokens per forward of the model."""
    return f"accepted {stats.acceptance:.0%} · {stats.tokens_per_forward:.1f} tok/forward"


def format_summary(stats: GenerationStats, finish_reason: str | None) -> str:
    parts = [f"{stats.generated_tokens} tokens", f"{stats.decode_tps:.1f} tok/s",
             f"prompt {stats.prompt_tokens} at {stats.prompt_tps:.0f} tok/s",
             f"first token {stats.time_to_first_token:.2f} s"]
    if stats.drafted:
        parts.append(format_speculation(stats))
    if finish_reason == "cancelled":
        parts.append("stopped")
    elif finish_reason == "length":
        parts.append("cut at max tokens")
    return " · ".join(parts)


COMMANDS = ("/think", "/no_think", "/system", "/clear", "/new", "/save", "/load", "/copy", "/help")


class PromptInput(TextArea):
    """Enter sends; ctrl+j (any terminal) or shift+enter adds a newline; up/down on the first/last line recall
    earlier messages; tab completes a slash command."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.past: list[str] = []
        self._recall = 0  # how far back up/down has gone; 0 = the text being written

    async def _on_key(self, event) -> None:
        handled = True
        row, _ = self.cursor_location
        if event.key == "enter":
            text = self.text.strip()
            if text:
                self.past.append(text)
                self._recall = 0
                self.post_message(self.Submitted(text))
                self.clear()
        elif event.key in ("ctrl+j", "shift+enter"):
            self.insert("\n")
        elif event.key == "up" and row == 0 and self._recall < len(self.past):
            self._recall += 1
            self.text = self.past[-self._recall]
        elif event.key == "down" and row == self.document.line_count - 1 and self._recall > 0:
            self._recall -= 1
            self.text = self.past[-self._recall] if self._recall else ""
        elif event.key == "tab" and self.text.startswith("/") and " " not in self.text:
            matches = [c for c in COMMANDS if c.startswith(self.text.strip())]
            if len(matches) == 1:
                self.text = matches[0] + " "
                self.move_cursor(self.document.end)
            elif matches:
                self.notify("  ".join(matches))
        else:
            handled = False
        if handled:
            event.prevent_default()
            event.stop()
            return
        await super()._on_key(event)
