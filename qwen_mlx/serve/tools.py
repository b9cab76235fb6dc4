"""Tool calls in the model's answer text, in both Qwen formats, parsed as the text streams:

    Qwen3:     <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    Qwen3.5+:  <tool_call><function=get_weather><parameter=city>Paris</parameter></function></tool_call>

(with newlines around each part, which the parser allows).

A call that does not parse, names a function the request did not offer, or is never closed is handed back as the
text it was, never an error.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def tool_schemas(tools: list[dict]) -> dict[str, dict]:
    """Function name -> its JSON-schema `parameters`, from OpenAI-shaped tools ({"type": "function", "function":
    {...}})."""
    out = {}
    for tool in tools:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def parse_call(body: str, schemas: dict[str, dict], id_prefix: str = "call_") -> ToolCall | None:
    """The call between <tool_call> and </tool_call>, in either format; None when it is not a call to an offered
    function."""
    body = body.strip()
    if body.startswith("<function="):
        match = _FUNCTION.fullmatch(body)
        if match is None:
            return None
        name = match.group(1).strip()
        properties = schemas.get(name, {}).get("properties", {})
        arguments = {}
        for param in _PARAMETER.finditer(match.group(2)):
            key = param.group(1).strip()
            arguments[key] = _value(_strip_newline(param.group(2)), properties.get(key, {}))
        leftover = _PARAMETER.sub("", match.group(2))
        if leftover.strip():
            return None
    else:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        name, arguments = call["name"], call.get("arguments", {})
        if isinstance(arguments, str):  # some fine-tunes write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
    if name not in schemas:
        return None
    return ToolCall(name, arguments, id_prefix + secrets.token_hex(12))


def _strip_newline(text: str) -> str:
    """The template writes each parameter's value between newlines: drop exactly those."""
    text = text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text


def _value(text: str, schema: dict):
    """A parameter value: the text itself for a string parameter, else its JSON value (or the text if it is not
    JSON)."""
    if schema.get("type") == "string":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ToolCallParser:
    """Feed the answer text as it streams; get back, in order, the plain text (str) and the calls (ToolCall).
    Text that could be the start of `<tool_call>` is held until it is known not to be."""

    def __init__(self, tools: list[dict], id_prefix: str = "call_"):
        self.schemas, self.id_prefix = tool_schemas(tools), id_prefix
        self._buffer = ""
        self._inside = False
        self.calls = 0

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buffer += text
        out: list[str | ToolCall] = []
        while True:
            if not self._inside:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    _add_text(out, self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return out
                _add_text(out, self._buffer[:at])
                self._buffer, self._inside = self._buffer[at + len(OPEN) :], True
            at = self._buffer.find(CLOSE)
            if at < 0:
                return out
            body, self._buffer, self._inside = self._buffer[:at], self._buffer[at + len(CLOSE) :], False
            call = parse_call(body, self.schemas, self.id_prefix)
            if call is None:
                _add_text(out, OPEN + body + CLOSE)
            else:
                self.calls += 1
                out.append(call)

    def finish(self) -> list[str | ToolCall]:
        """What is still held at the end: an unclosed call comes back as its text."""
        text = (OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return [text] if text else []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _add_text(out: list, text: str) -> None:
    if text:
        out.append(text)
