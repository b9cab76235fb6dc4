"""What a user or a hostile file finds at the edges, through the real command line: each case ends with exit status
2, one line on stderr naming the flag, key or file, no traceback, in bounded time and memory, nothing written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

MEMORY_LIMIT = 3 * 2**30  # address space of the child: a hostile file must not get near it
TIME_LIMIT = 60


def limited_cli(*args, input: str | None = None, timeout: float = TIME_LIMIT, cwd: Path | None = None):
    """Run `qwen-mlx ARGS` under a memory limit and a timeout; returns the CompletedProcess and its seconds."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], input=input, capture_output=True, text=True,
                         timeout=timeout, preexec_fn=limit, cwd=cwd)
    return run, time.monotonic() - start


def main_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The same command through cli.main in this process (for the many variants of a case that one subprocess
    run already shows end to end)."""
    from qwen_mlx.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_refused(run: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, one line on stderr containing every word, nothing on stdout, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen-mlx"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    """copy(variant="qwen3") -> a fresh copy of a tiny checkpoint to spoil."""

    def make(variant: str = "qwen3") -> Path:
        return Path(shutil.copytree(tiny_checkpoint(variant), tmp_path / f"ckpt-{variant}"))

    return make


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, **changes}))


# --- flags ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [
    (["generate", "-p", "hi", "--max-tokens", "-1"], "--max-tokens"),
    (["generate", "-p", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "-p", "hi", "--temp", "-1"], "--temp"),
    (["generate", "-p", "hi", "--temp", "nan"], "--temp"),
    (["generate", "-p", "hi", "--top-p", "5"], "--top-p"),
    (["generate", "-p", "hi", "--top-k", "-3"], "--top-k"),
    (["generate", "-p", "hi", "--min-p", "inf"], "--min-p"),
    (["generate", "-p", "hi", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "-p", "hi", "--seed", "-1"], "--seed"),
    (["generate", "-p", "hi", "--max-kv-size", "2"], "--max-kv-size"),
    (["chat", "--max-tokens", "0"], "--max-tokens"),
    (["bench", "--gen-tokens", "0"], "--gen-tokens"),
    (["bench", "--gen-tokens", "2"], "--gen-tokens"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["launch", "--port", "70000", "--", "generate"], "--port"),
    (["info", "-m", "x", "--distributed", "0"], "--distributed"),
])
def test_bad_flag_values_are_refused_naming_the_flag(capsys, args, flag):
    run = main_in_process(capsys, *args)
    assert_refused(run, f"argument {flag}")
    assert "--keep" not in run.stderr


def test_a_bad_flag_value_through_the_command_line():
    run, _ = limited_cli("generate", "-p", "hi", "--temp", "nan")
    assert_refused(run, "argument --temp", "nan")


# --- config.json ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("rope_theta", float("nan")), ("rope_theta", float("inf")), ("rope_theta", -1.0), ("rms_norm_eps", 0.0),
    ("rms_norm_eps", float("nan")), ("max_position_embeddings", 0), ("num_hidden_layers", 100000),
    ("vocab_size", 10**12), ("hidden_size", 2**40),
])
def test_config_values_out_of_range_are_refused_naming_the_key(capsys, copy, key, value):
    ckpt = copy()
    edit_json(ckpt / "config.json", **{key: value})  # json writes NaN / Infinity as Python's json reads them
    assert_refused(main_in_process(capsys, "generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2"),
                   "config.json", key)


def test_absurd_layer_count_through_the_command_line(copy):
    ckpt = copy()
    edit_json(ckpt / "config.json", num_hidden_layers=100000)
    run, seconds = limited_cli("generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2")
    assert_refused(run, "config.json", "num_hidden_layers")
    assert seconds < 30


def test_yarn_factor_out_of_range_is_refused(capsys, copy):
    ckpt = copy("qwen3_yarn")
    raw = json.loads((ckpt / "config.json").read_text())
    edit_json(ckpt / "config.json", rope_scaling={**raw["rope_scaling"], "factor": float("inf")})
    assert_refused(main_in_process(capsys, "info", "-m", str(ckpt)), "rope_scaling.factor")


def test_a_config_that_disagrees_with_the_weights_is_refused_before_building(capsys, copy, monkeypatch):
    from qwen_mlx.weights import loader

    ckpt = copy()
    edit_json(ckpt / "config.json", num_hidden_layers=1000)  # within range, but the files hold 2 layers
    monkeypatch.setattr(loader, "Model", lambda *a: pytest.fail("the model was built"))
    assert_refused(main_in_process(capsys, "generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2"),
                   "num_hidden_layers is 1000", "config.json")


# --- tokenizer ids against the embedding ----------------------------------------------------------------------------

def test_a_token_id_beyond_the_embedding_is_refused_at_load(copy):
    ckpt = copy()
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["model"]["vocab"]["hi"] = 2_000_000_000
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    run, _ = limited_cli("generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2")
    assert_refused(run, "tokenizer.json", "2000000000", "vocab_size")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tiny_checkpoint):
    """config.json and the embedding agree on 1,000 rows; the tokenizer's ids go up to 151,668."""
    ckpt = tiny_checkpoint("qwen3", vocab_size=1000)
    run, _ = limited_cli("generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2")
    assert_refused(run, "tokenizer.json", "151668", "vocabulary of 1000")


# --- files that are not what they say -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", [
    ("config.json", "dev-zero"), ("model.safetensors", "fifo"), ("chat_template.jinja", "outside"),
    ("tokenizer.json", "fifo"), ("generation_config.json", "dev-zero"), ("tokenizer_config.json", "outside"),
    ("model.safetensors", "outside"), ("config.json", "fifo"),
])
def test_checkpoint_files_must_be_regular_files_inside_it(copy, tmp_path, name, kind):
    ckpt = copy()
    target = ckpt / name
    if kind == "outside":  # the file itself, valid, but moved out of the checkpoint and linked back
        outside = tmp_path / "elsewhere" / name
        outside.parent.mkdir()
        if target.exists():
            shutil.move(target, outside)
        else:
            outside.write_text("{}" if name.endswith(".json") else "{{ messages[0].content }}")
        target.symlink_to(outside)
    else:
        target.unlink(missing_ok=True)
        if kind == "dev-zero":
            target.symlink_to("/dev/zero")
        else:
            os.mkfifo(target)
    run, seconds = limited_cli("generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2", timeout=30)
    assert_refused(run, name)
    assert seconds < 20
    words = {"dev-zero": "outside the checkpoint", "fifo": "not a regular file", "outside": "outside the checkpoint"}
    assert words[kind] in run.stderr


def test_convert_copies_no_file_from_outside_the_checkpoint(capsys, copy, tmp_path):
    ckpt = copy()
    secret = tmp_path / "secret.jinja"
    secret.write_text("not for the output")
    (ckpt / "extra.jinja").symlink_to(secret)
    run = main_in_process(capsys, "convert", str(ckpt), str(tmp_path / "out"), "-q")
    assert_refused(run, "extra.jinja", "outside the checkpoint")
    assert not (tmp_path / "out").exists()


def test_the_hub_cache_links_into_its_blob_store_are_followed(copy, tmp_path):
    """A hub snapshot is a directory of links into ../../blobs: those are the checkpoint's own files."""
    from qwen_mlx.untrusted import checked_file

    repo = tmp_path / "models--Qwen--Tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/f00d")
    assert checked_file(snapshot / "config.json", snapshot) == (blobs / "f00d").resolve()


# --- control sequences never reach a terminal raw --------------------------------------------------------------------

TITLE = "\x1b]0;PWNED\x07"  # OSC 0: set the terminal's title


@pytest.fixture
def escaping_checkpoint(copy) -> Path:
    """A checkpoint whose every generated token decodes to an escape sequence that retitles the terminal."""
    ckpt = copy()
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        spec["decoder"], {"type": "Replace", "pattern": {"Regex": "[\\s\\S]+"}, "content": TITLE}]}
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    return ckpt


def run_in_terminal(args: list[str], steps: list[tuple[bytes, bytes]] = (), timeout: float = 90) -> bytes:
    """Run `qwen-mlx ARGS` with a pseudo-terminal as stdin, stdout and stderr; for each (wait_for, keys) step, type
    the keys once the output holds wait_for. Returns every byte written to the terminal; the exit status is
    run_in_terminal.returncode."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    proc = subprocess.Popen([sys.executable, "-m", "qwen_mlx.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm-256color"}, preexec_fn=limit)
    os.close(slave)
    out, steps, deadline = bytearray(), list(steps), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if steps and steps[0][0] in out:
                os.write(master, steps.pop(0)[1])
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"timed out; output so far: {bytes(out[-3000:])!r}")
    finally:
        proc.kill() if proc.poll() is None else None
        run_in_terminal.returncode = proc.wait()
        os.close(master)
    assert not steps, f"never saw {steps[0][0]!r}; output: {bytes(out[-3000:])!r}"
    return bytes(out)


def test_generate_shows_the_models_control_characters_on_a_terminal(escaping_checkpoint):
    out = run_in_terminal(["generate", "-m", str(escaping_checkpoint), "-p", "hi", "--max-tokens", "3", "--temp",
                           "0", "--no-think"])
    assert b"PWNED" in out and b"\x1b]0;PWNED" not in out and b"PWNED\x07" not in out
    assert b"\\x1b]0;PWNED\\x07" in out  # visible instead


def test_generate_keeps_them_in_a_file(escaping_checkpoint, tmp_path):
    with open(tmp_path / "out.txt", "w") as f:
        run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "generate", "-m", str(escaping_checkpoint), "-p",
                              "hi", "--max-tokens", "2", "--temp", "0", "--no-think"], stdout=f, timeout=120)
    assert run.returncode == 0 and (tmp_path / "out.txt").read_text() == TITLE * 2 + "\n"


def test_chat_shows_the_models_control_characters_on_a_terminal(escaping_checkpoint):
    out = run_in_terminal(["chat", "-m", str(escaping_checkpoint), "--no-history", "--max-tokens", "3", "--temp", "0",
                           "--no-think"], [(b"think off", b"hi\r"), (b"tok/s", b"\x11")])
    assert b"PWNED" in out and b"\x1b]0;PWNED" not in out and b"PWNED\x07" not in out


def test_names_from_files_are_printable_in_errors(capsys, copy):
    ckpt = copy()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "\x1b]0;PWNED\x07.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    run = main_in_process(capsys, "info", "-m", str(ckpt))
    assert_refused(run, "\\x1b]0;PWNED\\x07")
    assert "\x1b" not in run.stderr and "\x07" not in run.stderr


# --- the chat app's files ---------------------------------------------------------------------------------------------

def test_another_programs_database_is_refused_untouched(tiny_checkpoint, tmp_path):
    import sqlite3

    other = tmp_path / "notes.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.execute("INSERT INTO notes (body) VALUES ('mine')")
    db.commit()
    db.close()
    before = other.read_bytes()
    run, _ = limited_cli("chat", "-m", str(tiny_checkpoint("qwen3")), "--history", str(other))
    assert_refused(run, str(other), "not a qwen-mlx chat history", "--no-history")
    assert other.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]


def test_a_history_with_wrong_columns_is_refused(tmp_path):
    import sqlite3

    from tui.history import History, HistoryError

    path = tmp_path / "h.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE conversations (id INTEGER PRIMARY KEY, model TEXT, created REAL, extra TEXT)")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation INT, role TEXT, content TEXT, created REAL)")
    db.close()
    with pytest.raises(HistoryError, match="not a qwen-mlx chat history"):
        History(path)


def test_a_blob_in_the_history_ends_resume_with_one_line(tiny_checkpoint, tmp_path):
    """A BLOB where text belongs, resumed with --continue: exit 2 and one line, no traceback with locals."""
    from tui.history import History

    path = tmp_path / "history.sqlite"
    ckpt = tiny_checkpoint("qwen3")
    h = History(path)
    conversation = h.new_conversation(ckpt.name)
    h.add(conversation, "user", "secret-words")
    h.db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (?, 'assistant', ?, 0)",
                 (conversation, b"\x00\x01blob"))
    h.db.commit()
    h.close()
    out = run_in_terminal(["chat", "-m", str(ckpt), "--history", str(path), "--continue"])
    assert run_in_terminal.returncode == 2, out[-2000:]
    assert b"holds a message that is not text" in out
    assert b"Traceback" not in out and b"locals" not in out and b"secret-words" not in out


@pytest.mark.parametrize("content,words", [
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    (json.dumps([{"role": "user", "content": "x"}] * 2000), "2000 messages"),
    (json.dumps([{"role": "user", "content": ["not", "text"]}]), "message 1"),
    ("\udcff", "not valid JSON"),
])
def test_conversation_files_are_bounded_and_checked(tmp_path, content, words):
    from tui.conversation import ConversationError, read_conversation

    (tmp_path / "c.json").write_text(content, errors="surrogateescape")
    with pytest.raises(ConversationError, match=words):
        read_conversation(tmp_path / "c.json")
    with pytest.raises(ConversationError, match="not a regular file"):
        read_conversation(tmp_path)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)
    with pytest.raises(ConversationError, match="larger than"):
        read_conversation(big)


def test_load_runs_off_the_ui_thread_and_shows_a_bounded_transcript(tmp_path):
    import asyncio

    from test_tui import ScriptedEngine, send, wait_until

    from tui.app import SHOWN_TURNS, ChatApp
    from tui.widgets import Turn

    many = [{"role": role, "content": f"{role} {i}"} for i in range(500) for role in ("user", "assistant")]
    (tmp_path / "many.json").write_text(json.dumps(many))
    (tmp_path / "too-many.json").write_text(json.dumps(many * 3))

    async def run():
        engine = ScriptedEngine([("answer", "ok")], delay=0)
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            start = time.monotonic()
            await send(pilot, f"/load {tmp_path / 'too-many.json'}")
            await wait_until(pilot, lambda: any("3000 messages" in str(n.message) for n in app._notifications))
            assert engine.restored is None
            await send(pilot, f"/load {tmp_path / 'many.json'}")
            await wait_until(pilot, lambda: engine.restored == many, timeout=30)
            await wait_until(pilot, lambda: len(app.query(Turn)) == SHOWN_TURNS)
            assert app.query_one(Turn).user_text == f"user {500 - SHOWN_TURNS}"
            assert time.monotonic() - start < 30

    asyncio.run(run())


# --- flags and figures ------------------------------------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused_at_once(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen3", max_position_embeddings=64)
    prompt = "word " * 200
    run, seconds = limited_cli("generate", "-m", str(ckpt), "-p", prompt, "--max-tokens", "2")
    assert_refused(run, "longer than the model's context of 64", "--max-kv-size")
    assert seconds < 30
    rotating, _ = limited_cli("generate", "-m", str(ckpt), "-p", prompt, "--max-tokens", "2", "--max-kv-size", "32",
                              "--temp", "0")
    assert rotating.returncode == 0, rotating.stderr
    assert "keeps its first 4 and the latest 28" in rotating.stderr


def test_generation_config_values_out_of_range_are_refused(capsys, copy):
    ckpt = copy()
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": -1, "top_p": 0.9}))
    assert_refused(main_in_process(capsys, "generate", "-m", str(ckpt), "-p", "hi", "--max-tokens", "2"),
                   "generation_config.json", "temperature")


@pytest.mark.parametrize("delay", [0.0, 0.5, 1.5])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tiny_checkpoint, delay):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "qwen_mlx.cli", "generate", "-m", str(tiny_checkpoint("qwen3")),
                             "-p", "hi", "--max-tokens", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # Past the interpreter's own start-up (a signal there is Python's, not ours): our imports have begun once the
    # package's first module is open; /proc shows it on Linux, elsewhere a second stands in for it.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 30
    if maps.exists():
        while proc.poll() is None and "site-packages/mlx" not in maps.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        time.sleep(1)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # 130 from cli.main; 0 when it had finished; -SIGINT when the signal came during the interpreter's shutdown
    assert proc.returncode in (0, 130, -signal.SIGINT) and "Traceback" not in err, err
