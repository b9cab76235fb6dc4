"""Conversations kept in SQLite (WAL) in the platform's data directory.

Each message is committed on its own: the user's before generation starts, the reply when it ends (a stopped reply
too). A process killed mid-write leaves the database as it was before that transaction. A file that is not a
database, or fails SQLite's quick check, is moved aside (kept for the user, never deleted) and a new one started.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from qwen_mlx.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, model TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation INTEGER NOT NULL REFERENCES conversations(id),
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL
);
"""


def default_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("qwen-mlx")) / "history.sqlite"


_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}  # not "locked" or "busy": a database in use is not corrupt


class HistoryError(UserError):
    """The history file cannot be opened at all (a directory, no permission, locked): one sentence naming it."""


class History:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.moved_aside: Path | None = None  # where a corrupt database was moved, if it was (tell the user)
        db = _open(path)
        if db is None:
            self.moved_aside = _move_aside(path)
            db = _open(path)
        self.db = db

    def new_conversation(self, model: str) -> int:
        with self.db:
            return self.db.execute("INSERT INTO conversations (model, created) VALUES (?, ?)",
                                   (model, time.time())).lastrowid

    def add(self, conversation: int, role: str, content: str) -> None:
        with self.db:
            self.db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (?, ?, ?, ?)",
                            (conversation, role, content, time.time()))

    def latest(self, model: str) -> tuple[int, list[dict]] | None:
        """The most recent conversation with this model that has messages, and its messages."""
        row = self.db.execute(
            "SELECT c.id FROM conversations c WHERE c.model = ? AND EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation = c.id) ORDER BY c.id DESC LIMIT 1", (model,)).fetchone()
        if row is None:
            return None
        messages = [{"role": r, "content": c} for r, c in self.db.execute(
            "SELECT role, content FROM messages WHERE conversation = ? ORDER BY id", (row[0],))]
        return row[0], messages

    def close(self) -> None:
        self.db.close()


def _open(path: Path) -> sqlite3.Connection | None:
    """The database, ready; None when the file is not a database or fails SQLite's quick check."""
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        except sqlite3.Error:
            db.close()
            raise
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorname", None) in _CORRUPT:
            return None
        raise HistoryError(f"{path}: cannot open the chat history ({e}); pass --history FILE or --no-history") \
            from None
    if problems != ["ok"]:
        db.close()
        return None
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def _move_aside(path: Path) -> Path:
    """Rename the database (and its WAL and shared-memory files, which belong to it) to <name>.corrupt-<time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(path, target)
    return target
