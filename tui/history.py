"""Conversations kept in SQLite (WAL) in the platform's data directory.

Each message is committed on its own: the user's before generation starts, the reply when it ends (a stopped reply
too). A process killed mid-write leaves the database as it was before that transaction.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

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


class History:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

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
