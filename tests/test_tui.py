"""The chat app driven by Textual's Pilot: a scripted engine for the UI behaviour, the tiny model for the seam."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from qwen_mlx.api import Event
from qwen_mlx.engine.generate import GenerationStats
from tui.app import ChatApp
from tui.widgets import Turn


class ScriptedEngine:
    """Replays (kind, text) pieces with a delay, updating stats like the real engine."""

    name = "scripted"
    details = "bf16 · kernels: reference"
    restored = None  # the last conversation handed to restore()

    def __init__(self, script, delay=0.01):
        self.script, self.delay = script, delay
        self.sent: list[tuple[str, bool]] = []
        self.used = 0

    def send(self, text, *, think, stop):
        self.sent.append((text, think))
        stats = GenerationStats(prompt_tokens=12, prompt_seconds=0.1, time_to_first_token=0.1)
        first = time.perf_counter()
        for i, (kind, piece) in enumerate(self.script):
            if stop.is_set():
                yield Event("done", "", stats, "cancelled")
                return
            time.sleep(self.delay)
            stats.generated_tokens = i + 1
            stats.decode_seconds = time.perf_counter() - first
            self.used += 1
            yield Event(kind, piece, stats)
        yield Event("done", "", stats, "stop")

    def context(self):
        return self.used, 4096

    def restore(self, messages):
        self.used = 0
        self.restored = messages

    def messages(self):
        return [{"role": "user", "content": t} for t, _ in self.sent]

    def set_system(self, text):
        self.system = text


SCRIPT = [("thinking", "Let me "), ("thinking", "think."), ("answer", "**Hello**"), ("answer", " world"),
          ("answer", "\n\n```python\nprint(1)\n```\n")]


async def wait_until(pilot, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.02)


async def send(pilot, text):
    await pilot.click("#prompt")
    if len(text) <= 12:  # typed, key by key
        for ch in text:
            await pilot.press(ch if ch != " " else "space")
    else:  # pasted
        pilot.app.query_one("#prompt").insert(text)
    await pilot.press("enter")


def test_message_streams_and_thinking_collapses_when_the_answer_starts():
    async def run():
        app = ChatApp(ScriptedEngine(SCRIPT))
        async with app.run_test(size=(100, 40)) as pilot:
            await send(pilot, "hi")
            await wait_until(pilot, lambda: not app.generating and app.query(Turn))
            turn = app.query_one(Turn)
            assert turn.answer_text == "**Hello** world\n\n```python\nprint(1)\n```\n"
            assert turn.thinking_text == "Let me think."
            block = turn.query_one("Collapsible")
            assert block.display and block.collapsed  # auto-collapsed once the answer started
            await pilot.press("ctrl+t")  # hides (already collapsed) ...
            await pilot.press("ctrl+t")  # ... and shows all think blocks
            assert not block.collapsed
            await pilot.press("ctrl+t")
            assert block.collapsed
            assert "5 tokens" in str(turn.query_one(".summary").render())

    asyncio.run(run())


def test_status_bar_shows_live_tokens_per_second_while_generating():
    async def run():
        engine = ScriptedEngine([("answer", f"w{i} ") for i in range(60)], delay=0.03)
        app = ChatApp(engine)
        async with app.run_test(size=(120, 30)) as pilot:
            await send(pilot, "go")
            seen = set()
            deadline = time.monotonic() + 10
            while app.generating or not seen:
                status = str(app.query_one("#status").render())
                if "decoding" in status:
                    seen.add(status.split("decoding")[1].split("tok/s")[0].strip())
                await pilot.pause(0.1)
                assert time.monotonic() < deadline
            assert len(seen) >= 2  # the figure changes as tokens arrive
            assert "ttft" in str(app.query_one("#status").render())  # the finished turn's figures

    asyncio.run(run())


def test_escape_stops_and_keeps_the_partial_answer_and_keys_respond():
    async def run():
        engine = ScriptedEngine([("answer", f"w{i} ") for i in range(500)], delay=0.02)
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "long")
            await wait_until(pilot, lambda: app.query(Turn) and len(app.query_one(Turn).answer_text) > 20)
            await pilot.press("ctrl+t")  # keys respond while generating
            assert app.show_thinking is False
            await pilot.press("escape")
            await wait_until(pilot, lambda: not app.generating, timeout=2)
            turn = app.query_one(Turn)
            assert 20 < len(turn.answer_text) < len("".join(f"w{i} " for i in range(500)))
            assert "stopped" in str(turn.query_one(".summary").render())

    asyncio.run(run())


def test_no_think_command_switches_the_next_turn():
    async def run():
        engine = ScriptedEngine([("answer", "ok")])
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "/no_think")
            assert app.think is False and "think off" in str(app.query_one("#status").render())
            await send(pilot, "hello")
            await wait_until(pilot, lambda: engine.sent and not app.generating)
            assert engine.sent[-1] == ("hello", False)

    asyncio.run(run())


def test_no_think_changes_the_rendered_prompt_of_the_real_model(tiny_checkpoint):
    import qwen_mlx
    from tui.engine import ModelEngine

    async def run():
        engine = ModelEngine(qwen_mlx.load(tiny_checkpoint("qwen3")), max_tokens=4)
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "hi")
            await wait_until(pilot, lambda: not app.generating and app.query(Turn), timeout=30)
            thinking_prompt = list(engine.last_prompt)
            await send(pilot, "/no_think")
            await send(pilot, "hi")
            await wait_until(pilot, lambda: not app.generating and len(app.query(Turn)) == 2, timeout=30)
        tok = engine.llm.tokenizer
        close = tok.encode("<think>\n\n</think>\n\n")
        assert thinking_prompt[-len(close):] != close
        assert engine.last_prompt[-len(close):] == close

    asyncio.run(run())


def test_status_counts_the_tokens_a_window_holds(tiny_checkpoint):
    """ctx USED/CAPACITY: under --max-kv-size USED is what the window holds, never more than its size."""
    import threading

    import qwen_mlx
    from tui.engine import ModelEngine

    engine = ModelEngine(qwen_mlx.load(tiny_checkpoint("qwen3")), max_kv_size=16, max_tokens=12)
    for text in ("hi", "and again"):
        list(engine.send(text, think=False, stop=threading.Event()))
    assert engine.session.cache[0].offset > 16  # the window has moved on
    assert engine.context() == (16, 16)


class FixedClockEngine(ScriptedEngine):
    """Deterministic stats (a fixed 25 ms per token), so the screen is the same on every run."""

    def send(self, text, *, think, stop):
        for event in super().send(text, think=think, stop=stop):
            event.stats.decode_seconds = 0.025 * max(0, event.stats.generated_tokens - 1)
            event.stats.peak_memory = 3 * 2**29
            yield event


SNAPSHOT = __import__("pathlib").Path(__file__).with_name("snapshots") / "chat_main.svg"


def test_main_screen_snapshot(monkeypatch):
    """The main screen after a scripted reply, against a reviewed SVG (regenerate: UPDATE_SNAPSHOTS=1)."""
    import os

    monkeypatch.delenv("NO_COLOR", raising=False)  # set on some CI runners: Textual would draw in monochrome

    async def run():
        app = ChatApp(FixedClockEngine(SCRIPT, delay=0))
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "hi")
            await wait_until(pilot, lambda: not app.generating and app.query(Turn))
            app.set_focus(None)  # no cursor: its blink phase would make the picture flicker
            await pilot.pause(0.3)
            return app.export_screenshot(title="qwen-mlx")

    svg = asyncio.run(run())
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(svg)
    assert normalized(svg) == normalized(SNAPSHOT.read_text())


def normalized(svg: str) -> str:
    """Textual names its SVG classes after a hash of the render; the drawing itself is what matters."""
    import re

    return re.sub(r"terminal-\d+", "terminal", svg)


def test_history_keeps_messages_and_continue_restores_them(tmp_path):
    from tui.history import History

    path = tmp_path / "history.sqlite"

    async def first():
        app = ChatApp(ScriptedEngine(SCRIPT), history=History(path))
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "hi")
            # the user's message is in the database before the reply is done
            assert History(path).latest("scripted")[1][0] == {"role": "user", "content": "hi"}
            await wait_until(pilot, lambda: not app.generating and app.query(Turn))

    async def second():
        engine = ScriptedEngine(SCRIPT)
        app = ChatApp(engine, history=History(path), resume=True)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            turn = app.query_one(Turn)
            assert (turn.user_text, turn.thinking_text) == ("hi", "Let me think.")
            assert turn.answer_text.startswith("**Hello** world")
            return engine.restored

    asyncio.run(first())
    restored = asyncio.run(second())
    assert restored == [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\n**Hello** world\n\n"
                                                         "```python\nprint(1)\n```\n"}]


def test_history_survives_a_killed_writer(tmp_path):
    """A process killed in the middle of writing leaves every committed message readable."""
    import subprocess
    import sys

    from tui.history import History

    path = tmp_path / "history.sqlite"
    h = History(path)
    conv = h.new_conversation("m")
    h.add(conv, "user", "kept")
    h.close()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[1])!r})
from tui.history import History
h = History(__import__('pathlib').Path({str(path)!r}))
while True:
    with h.db:
        for i in range(1000):
            h.db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (1, 'assistant', ?, 0)", ("x" * 1000,))
"""])
    time.sleep(1.5)
    writer.kill()
    writer.wait()
    rows = History(path).db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows[0] == ("user", "kept")
    assert (len(rows) - 1) % 1000 == 0  # whole transactions only (a resume reads the last MAX_RESUMED of them)


def test_recall_completion_and_conversation_files(tmp_path):
    async def run():
        engine = ScriptedEngine([("answer", "ok")], delay=0)
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            box = app.query_one("#prompt")
            await send(pilot, "first message")
            await wait_until(pilot, lambda: not app.generating and app.query(Turn))
            await pilot.press("up")
            assert box.text == "first message"
            await pilot.press("down")
            assert box.text == ""
            for ch in "/no_t":
                await pilot.press(ch)
            await pilot.press("tab")
            assert box.text == "/no_think "
            box.clear()
            await send(pilot, f"/save {tmp_path / 'conv.json'}")
            assert json.loads((tmp_path / "conv.json").read_text()) == [{"role": "user", "content": "first message"}]
            (tmp_path / "bad.json").write_text('{"not": "a list"}')
            await send(pilot, f"/load {tmp_path / 'bad.json'}")
            assert engine.restored is None  # refused, nothing replaced
            saved = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nt\n</think>\n\na"}]
            (tmp_path / "good.json").write_text(json.dumps(saved))
            await send(pilot, f"/load {tmp_path / 'good.json'}")
            await pilot.pause(0.1)
            assert engine.restored == saved
            turn = app.query_one(Turn)
            assert (turn.user_text, turn.thinking_text, turn.answer_text) == ("q", "t", "a")

    asyncio.run(run())


def corrupt_database(path):
    """A real history database whose third page is overwritten: SQLite reports it malformed."""
    from tui.history import History

    h = History(path)
    conv = h.new_conversation("m")
    for i in range(300):
        h.add(conv, "user", "x" * 200 + str(i))
    h.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    h.close()
    raw = bytearray(path.read_bytes())
    raw[2 * 4096 : 2 * 4096 + 100] = b"\xff" * 100
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["not_a_database", "malformed_page"])
def test_corrupt_history_is_moved_aside_and_a_new_one_started(tmp_path, damage):
    import re

    from tui.history import History

    path = tmp_path / "history.sqlite"
    if damage == "not_a_database":
        path.write_bytes(b"these are not the bytes of a database" * 100)
        (tmp_path / "history.sqlite-wal").write_bytes(b"a stale write-ahead log")
    else:
        corrupt_database(path)
    before = path.read_bytes()
    h = History(path)
    assert h.moved_aside is not None and h.moved_aside.parent == tmp_path
    assert re.fullmatch(r"history\.sqlite\.corrupt-\d{8}-\d{6}", h.moved_aside.name)
    assert h.moved_aside.read_bytes() == before  # kept for the user, untouched
    wal = tmp_path / "history.sqlite-wal"  # the old log (SQLite drops an invalid one) is not the new database's
    assert not wal.exists() or b"stale" not in wal.read_bytes()
    conv = h.new_conversation("m")
    h.add(conv, "user", "hello again")
    h.close()
    again = History(path)
    assert again.moved_aside is None and again.latest("m")[1] == [{"role": "user", "content": "hello again"}]
    again.close()


def test_a_second_corruption_in_the_same_second_gets_its_own_name(tmp_path):
    from tui.history import History

    path = tmp_path / "history.sqlite"
    moved = []
    for _ in range(2):
        path.write_bytes(b"junk" * 1000)
        h = History(path)
        moved.append(h.moved_aside)
        h.close()
    assert moved[0] != moved[1] and moved[0].exists() and moved[1].exists()


def test_history_that_cannot_be_opened_is_one_clear_error(tmp_path):
    from tui.history import History, HistoryError

    with pytest.raises(HistoryError, match=f"^{tmp_path}: cannot open the chat history .*--no-history$"):
        History(tmp_path)  # a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_app_tells_the_user_the_history_was_moved_aside(tmp_path):
    from tui.history import History

    path = tmp_path / "history.sqlite"
    path.write_bytes(b"junk" * 1000)
    history = History(path)
    app = ChatApp(ScriptedEngine(SCRIPT), history=history)
    shown = []
    app.notify = lambda message, **kwargs: shown.append((message, kwargs.get("severity")))

    async def run():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.1)

    asyncio.run(run())
    assert shown[0] == (f"The chat history {path} was corrupt: it was moved to {history.moved_aside} and a new one "
                        "started.", "warning")


WRITER = r"""
import os, signal, sys
from pathlib import Path
from qwen_mlx import files
from tui.conversation import save_conversation

path, point, first = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if point == "mid_write":  # half of the bytes written, then killed
    def half(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    files.Path.write_bytes = half
elif point == "before_rename":  # written and synced, not yet renamed
    files.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
for version in range(first, first + 10000):
    save_conversation(path, conversation(version))
    print(version, flush=True)
"""


def conversation(version: int) -> list[dict]:
    """A long conversation that says which version it is in every message (about 2 MB of JSON)."""
    return [{"role": ("user", "assistant")[i % 2], "content": f"{version} {i} " + "é" * 1000} for i in range(1000)]


def test_a_saved_conversation_survives_a_killed_save(tmp_path):
    """/save's writer killed at fixed points and at random moments: the file is always one whole version."""
    import inspect
    import random
    import subprocess
    import sys

    from tui.conversation import save_conversation

    path = tmp_path / "conversation.json"
    save_conversation(path, conversation(0))
    script = inspect.getsource(conversation) + WRITER
    rng = random.Random(0)
    version = 0
    for run, point in enumerate(["mid_write", "before_rename", "random", "random", "random", "random"]):
        first = 10000 * (run + 1)
        child = subprocess.Popen([sys.executable, "-c", script, str(path), point, str(first)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if point == "random":
            assert child.stdout.readline().strip() == str(first), child.stderr.read()
            time.sleep(rng.uniform(0, 0.3))
            child.kill()
        printed = [int(line) for line in child.communicate(timeout=60)[0].split()]
        assert child.returncode == -9
        saved = json.loads(path.read_text(encoding="utf-8"))
        got = int(saved[0]["content"].split()[0])
        if point == "random":
            last = ([first] + printed)[-1]
            assert last <= got <= last + 1
        else:
            assert got == version and not printed
        assert saved == conversation(got)
        version = got
