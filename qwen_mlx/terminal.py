"""Text from a model or a file, made safe to show on a terminal: control characters (ESC, BEL, CR, the C1 range,
bidirectional overrides) become visible escapes such as `\\x1b`, so no sequence in them can retitle the terminal,
move the cursor or write the clipboard. Newlines and tabs stay. Files and JSON keep the text as it is."""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)
