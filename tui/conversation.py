"""Conversation files written by /save: a JSON list of {"role", "content"} messages, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_mlx.files import write_atomically


def save_conversation(path: Path, messages: list[dict]) -> None:
    """Write the messages; a process killed meanwhile leaves the previous file whole (temp, fsync, rename)."""
    write_atomically(path, json.dumps(messages, ensure_ascii=False, indent=1).encode())

