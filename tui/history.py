"""Conversations kept in SQLite (WAL) in the platform's data directory.

Each message is committed on its own: the user's before generation starts, the reply when it ends (a stopped reply
too). A process killed mid-write leaves the database as it was before that transaction. A file that is not a
database, or fails SQLite's quick check, is moved aside (kept for the user, never deleted) and a new one started; a
database another program made (other tables or columns) is refused untouched.
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


APPLICATION_ID = 0x51774D58  # "QwMX" in SQLite's application_id header field: this file is a qwen-mlx history
COLUMNS = {"conversations": ["id", "model", "created"],
           "messages": ["id", "conversation", "role", "content", "created"]}
ROLES = ("system", "user", "assistant")
MAX_RESUMED = 1000  # messages of a resumed conversation


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
        rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY id DESC LIMIT ?",
                               (row[0], MAX_RESUMED)).fetchall()[::-1]  # the most recent ones
        for role, content in rows:
            if role not in ROLES or not isinstance(content, str):
                raise HistoryError(f"{self.path}: conversation {row[0]} holds a message that is not text "
                                   f"({type(content).__name__} for role {str(role)[:20]!r}); start without "
                                   "--continue, or pass another --history FILE")
        return row[0], [{"role": role, "content": content} for role, content in rows]

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
    try:
        _check_ours(db, path)
    except HistoryError:
        db.close()
        raise
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def _check_ours(db: sqlite3.Connection, path: Path) -> None:
    """Refuse, before anything is written to it, a database another program made: it must be empty, or hold
    exactly our tables and columns (marked with our application_id, or from before the mark)."""
    owner = db.execute("PRAGMA application_id").fetchone()[0]
    tables = {name: [column[1] for column in db.execute(f"PRAGMA table_info('{name}')")]
              for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if owner not in (0, APPLICATION_ID) or (tables and tables != COLUMNS):
        raise HistoryError(f"{path}: not a qwen-mlx chat history (another program's database, or other tables and "
                           "columns); pass another --history FILE or --no-history")


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
