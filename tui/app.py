"""`qwen-mlx chat`: a streaming terminal chat with a live think block and live speed."""

from __future__ import annotations

import threading

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Collapsible, Footer, Markdown, Static

from qwen_mlx.api import Event
from qwen_mlx.engine.chat import reply_content, split_reply_content
from qwen_mlx.errors import UserError, one_line
from qwen_mlx.terminal import printable

from .conversation import read_conversation, save_conversation
from .engine import Engine
from .history import History
from .widgets import PromptInput, Turn, format_bytes, format_speculation, format_summary

SHOWN_TURNS = 50  # of a resumed or loaded conversation, in the transcript
HELP = ("Enter sends · ctrl+j newline · ↑↓ recall · Esc stops · ctrl+t shows/hides thinking · ctrl+q quits · "
        "/think /no_think · /system TEXT · /new · /save FILE · /load FILE · /copy · /help (tab completes)")


class Piece(Message):
    """One event of a reply, posted from the generation thread (post_message is thread-safe, never waits)."""

    def __init__(self, turn: Turn, event: Event):
        super().__init__()
        self.turn, self.event = turn, event


class Failed(Message):
    """Generation raised: the message is shown in the turn and the app stays usable."""

    def __init__(self, turn: Turn, error: str):
        super().__init__()
        self.turn, self.error = turn, error


class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "qwen-mlx"
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True, id="stop"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="toggle_thinking"),
        Binding("ctrl+q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, engine: Engine, *, think: bool = True, auto_collapse: bool = True,
                 history: History | None = None, resume: bool = False):
        super().__init__()
        self.engine = engine
        self.history = history
        self.conversation = None  # id in the history database
        self.resume = resume
        self.think = think
        self.show_thinking = True
        self.auto_collapse = auto_collapse  # collapse a turn's thinking when its answer starts
        self.stop_event = threading.Event()
        self.generating = False
        self.live = None  # GenerationStats of the reply being generated
        self.last = None  # (stats, finish_reason) of the last finished reply
        self._streams = {}
        self.failure: Exception | None = None  # the unhandled error that ended the app, if one did

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="transcript"):
            yield Static(HELP, id="help", markup=False)
        yield PromptInput(id="prompt", show_line_numbers=False)
        with Horizontal(id="status-bar"):
            yield Static("", id="status", markup=False)
            yield Static(printable(f"{self.engine.name} · {self.engine.details}"), id="model", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        if self.history is not None and self.history.moved_aside is not None:
            self.notify(f"The chat history {self.history.path} was corrupt: it was moved to "
                        f"{self.history.moved_aside} and a new one started.", severity="warning", timeout=15)
        if self.history is not None:
            earlier = self.history.latest(self.engine.name) if self.resume else None
            if earlier is not None:
                self.conversation, messages = earlier
                self.engine.restore(messages)
                await self.show_earlier(messages)
            else:
                self.conversation = self.history.new_conversation(self.engine.name)
        self.query_one("#transcript").anchor()
        self.query_one(PromptInput).focus()
        self.set_interval(0.25, self.refresh_status)
        self.refresh_status()

    def _handle_exception(self, error: Exception) -> None:
        # An error that ends the app is kept for the command to report in one line (cli._chat re-raises it).
        self.failure = self.failure or error
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        # Textual's own prints a traceback with local variables (message contents, paths) and rings the bell.
        self._close_messages_no_wait()

    def notify(self, message: str, **options) -> None:
        """A notice, shown as plain text with control characters made visible (paths, errors and file contents
        come from outside)."""
        super().notify(printable(message) if isinstance(message, str) else message, **{**options, "markup": False})

    # --- input ---------------------------------------------------------------------------------------------
    async def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        text = message.text
        if text.startswith("/"):
            await self.command(text)
            return
        if self.generating:
            self.notify("Still answering: press Esc to stop first.", severity="warning")
            return
        if self.history is not None:
            self.history.add(self.conversation, "user", text)  # stored before generation starts
        turn = Turn(text, self.show_thinking)
        await self.query_one("#transcript").mount(turn)
        self.generating = True
        self.stop_event.clear()
        self.generate(turn, text)

    async def command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/think", "/no_think"):
            self.think = name == "/think"
            self.notify(f"Thinking {'on' if self.think else 'off'} for the next turns.")
        elif name in ("/clear", "/new", "/load") and self.generating:
            self.notify("Stop the answer first (Esc).", severity="warning")
        elif name in ("/clear", "/new"):
            await self.start_over([])
            self.notify("New conversation.")
        elif name == "/system":
            self.engine.set_system(arg or None)
            self.notify(f"System prompt {'set' if arg else 'removed'}.")
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            if not arg:
                self.notify("Usage: /load FILE", severity="error")
            else:
                self.load(arg)
        elif name == "/copy":
            answers = [t.answer_text for t in self.query(Turn) if t.answer_text]
            if answers:
                self.copy(answers[-1])
        elif name == "/help":
            self.notify(HELP, timeout=10)
        else:
            self.notify(f"Unknown command {name}: /help lists them.", severity="error")
        self.refresh_status()

    async def start_over(self, messages: list[dict]) -> None:
        """A new conversation, empty or loaded from a file."""
        self.engine.restore(messages)
        await self.query(Turn).remove()
        await self.query(".earlier").remove()
        await self.show_earlier(messages)
        if self.history is not None:
            self.conversation = self.history.new_conversation(self.engine.name)
            for message in messages:
                self.history.add(self.conversation, message["role"], message["content"])

    def save(self, path: str) -> None:
        from pathlib import Path

        if not path:
            self.notify("Usage: /save FILE", severity="error")
            return
        target = Path(path).expanduser()
        try:
            save_conversation(target, self.engine.messages())
        except OSError as e:
            self.notify(f"Could not save to {target}: {e.strerror}.", severity="error")
            return
        self.notify(f"Saved to {target}.")

    @work(thread=True, exclusive=True, group="load")
    def load(self, path: str) -> None:
        """Read, check and show a saved conversation, off the UI thread."""
        from pathlib import Path

        try:
            messages = read_conversation(Path(path).expanduser())
        except UserError as e:
            self.call_from_thread(self.notify, one_line(e), severity="error")
            return
        self.call_from_thread(self.loaded, messages, path)

    async def loaded(self, messages: list[dict], path: str) -> None:
        if self.generating:
            self.notify("Stop the answer first (Esc).", severity="warning")
            return
        await self.start_over(messages)
        self.notify(f"Loaded {len(messages)} messages from {path}.")

    def copy(self, text: str) -> None:
        import shutil
        import subprocess
        import sys

        self.copy_to_clipboard(text)  # OSC 52: most terminals, not macOS Terminal.app
        if sys.platform == "darwin" and shutil.which("pbcopy"):
            subprocess.run(["pbcopy"], input=text.encode(), check=False)
        self.notify("Copied the last answer.")

    def action_stop(self) -> None:
        if self.generating:
            self.stop_event.set()

    def action_toggle_thinking(self) -> None:
        self.show_thinking = not self.show_thinking
        for block in self.query("Collapsible.thinking"):
            block.collapsed = not self.show_thinking

    # --- generation (worker thread) -----------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="generate")
    def generate(self, turn: Turn, text: str) -> None:
        try:
            done = None
            for event in self.engine.send(text, think=self.think, stop=self.stop_event):
                if event.kind == "done":
                    done = event  # told once the session has filed the reply: the next turn may start then
                else:
                    self.post_message(Piece(turn, event))
            if done is not None:
                self.post_message(Piece(turn, done))
        except Exception as e:  # shown to the user; the app stays usable
            self.post_message(Failed(turn, f"{type(e).__name__}: {e}"))

    async def on_failed(self, message: Failed) -> None:
        message.turn.query_one(".summary", Static).update(f"error: {printable(message.error)}")
        self.notify(message.error, severity="error")
        self.generating = False
        self.live = None

    async def on_piece(self, piece: Piece) -> None:
        turn, event = piece.turn, piece.event
        if event.kind == "done":
            await self.finish(turn, event)
            return
        self.live = event.stats
        if event.kind == "thinking":
            block = turn.query_one(Collapsible)
            block.display = True
            turn.thinking_text += event.text
            await self.stream_to(turn, turn.query_one(".thinking-text", Markdown), printable(event.text))
        else:
            if not turn.answer_text and turn.thinking_text and self.auto_collapse:
                turn.query_one(Collapsible).collapsed = True
                turn.query_one(Collapsible).title = "Thought"
            turn.answer_text += event.text
            await self.stream_to(turn, turn.query_one(".answer", Markdown), printable(event.text))

    async def stream_to(self, turn: Turn, markdown: Markdown, text: str) -> None:
        stream = self._streams.get(markdown)
        if stream is None:
            stream = self._streams[markdown] = Markdown.get_stream(markdown)
        await stream.write(text)

    async def finish(self, turn: Turn, event: Event) -> None:
        for markdown in turn.query(Markdown):
            stream = self._streams.pop(markdown, None)
            if stream is not None:
                await stream.stop()
        # one full render at the end: the streamed tail parse is an approximation while text arrives
        await turn.query_one(".answer", Markdown).update(printable(turn.answer_text))
        if turn.thinking_text:
            await turn.query_one(".thinking-text", Markdown).update(printable(turn.thinking_text))
            if not turn.answer_text:
                turn.query_one(Collapsible).title = ("Thinking (stopped)" if event.finish_reason == "cancelled"
                                                     else "Thinking (cut off at max tokens)")
        turn.query_one(".summary", Static).update(format_summary(event.stats, event.finish_reason))
        if self.history is not None:
            self.history.add(self.conversation, "assistant", reply_content(turn.thinking_text, turn.answer_text))
        self.last = (event.stats, event.finish_reason)
        self.generating = False
        self.live = None
        self.refresh_status()

    async def show_earlier(self, messages: list[dict]) -> None:
        """Mount the turns of a resumed or loaded conversation, finished, in one batch: the last SHOWN_TURNS of
        them (the model reads them all)."""
        transcript = self.query_one("#transcript")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) > SHOWN_TURNS:
            first = users[-SHOWN_TURNS]
            await transcript.mount(Static(f"({first} earlier messages not shown)", classes="earlier summary",
                                          markup=False))
            messages = messages[first:]
        turns: list[Turn] = []
        for message in messages:
            if message["role"] == "user":
                turns.append(Turn(message["content"], self.show_thinking))
            elif message["role"] == "assistant" and turns:
                turns[-1].thinking_text, turns[-1].answer_text = split_reply_content(message["content"])
        await transcript.mount_all(turns)

    # --- status bar ------------------------------------------------------------------------------------------
    def refresh_status(self) -> None:
        statuses = self.query("#status")
        if not statuses:  # the timer can fire once more while the app shuts down
            return
        used, capacity = self.engine.context()
        parts = [f"think {'on' if self.think else 'off'}", f"ctx {used}" + (f"/{capacity}" if capacity else "")]
        if self.live is not None:
            parts.append(f"decoding {self.live.decode_tps:.1f} tok/s" if self.live.generated_tokens > 1
                         else "reading the prompt…")
            if self.live.drafted:
                parts.append(format_speculation(self.live))
        elif self.last is not None:
            stats, _ = self.last
            parts.append(f"{stats.decode_tps:.1f} tok/s · prompt {stats.prompt_tps:.0f} tok/s · "
                         f"ttft {stats.time_to_first_token:.2f}s · peak {format_bytes(stats.peak_memory)}")
            if stats.drafted:
                parts.append(format_speculation(stats))
        statuses.first(Static).update(" │ ".join(parts))
