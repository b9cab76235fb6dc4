"""Tool calls in the model's answer text, in both Qwen formats, parsed as the text streams:

    Qwen3:     <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    Qwen3.5+:  <tool_call><function=get_weather><parameter=city>Paris</parameter></function></tool_call>

(with newlines around each part, which the parser allows).

A call that does not parse, names a function the request did not offer, or is never closed is handed back as the
text it was, never an error.

A tool_choice that demands calls ("required", a named function) is enforced by a grammar of the checkpoint's own
format (`call_grammar`), so that the reply can be nothing else.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from qwen_mlx.serve.structured import JSON_LAYOUT, literal, think_first

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


@dataclass(frozen=True)
class Markers:
    """The ids of the tokens that write `<tool_call>`, `</tool_call>`, `<think>`, `</think>` (None: the tokenizer
    has no such token, the grammar spells the text)."""

    call: int | None
    call_end: int | None
    think: int | None
    think_end: int | None


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


# ------------------------------------------------------------------------------------------ forced calls

def call_format(chat_template: str | None) -> str:
    """The tool-call format the checkpoint was trained on, as its chat template writes earlier calls: "xml" for
    Qwen3.5+ (`<function=NAME>`), else "json" (Qwen3)."""
    return "xml" if chat_template and "<function=" in chat_template else "json"


def call_grammar(tools: list[dict], names: list[str], form: str, marks: Markers, *, many: bool,
                 thinking: str) -> str:
    """The llguidance grammar of a reply that is only tool calls: one call (or, with `many`, one or more, a newline
    between them, as the templates write them) to one of `names`, in `form` ("json" or "xml"), its arguments by the
    tool's JSON schema where llguidance can compile it (else any JSON object), after a think block as `thinking`
    says ("off", "may", "open": see structured.think_first). After the calls only an end-of-turn token is
    allowed."""
    schemas = tool_schemas(tools)
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(names)))}",
             "reply: call" + (' ("\\n" call)*' if many else "")]
    ends = literal("<tool_call>", marks.call), literal("</tool_call>", marks.call_end)
    for i, name in enumerate(names):
        rules += (_xml_call if form == "xml" else _json_call)(i, name, schemas[name], *ends)
    return think_first(rules, thinking, marks.think, marks.think_end)


def _json_call(i: int, name: str, schema: dict, open_: str, close: str) -> list[str]:
    """Qwen3: <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>"""
    head = '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
    arguments = _compiled({**schema, "type": "object"}, {"type": "object"})
    return [f'call_{i}: {open_} {json.dumps(head)} args_{i} "}}\\n" {close}',
            f"args_{i}: %json {json.dumps(arguments)}"]


def _xml_call(i: int, name: str, schema: dict, open_: str, close: str) -> list[str]:
    """Qwen3.5+: <tool_call>\\n<function=NAME>\\n then per parameter <parameter=P>\\nVALUE\\n</parameter>\\n, then
    </function>\\n</tool_call>. The declared parameters in their schema's order, the required ones always; a string
    is written as itself (an enum's values, or any text up to its maxLength without "</parameter>"), any other
    value as JSON."""
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}  # a parameter's $ref may point here
    parts, rules = [], []
    for j, (param, spec) in enumerate(properties.items()):
        spec = spec if isinstance(spec, dict) else {}
        rule = f"p_{i}_{j}"
        parts.append(rule if param in required else f"{rule}?")
        start = json.dumps(f"<parameter={param}>\n")
        if spec.get("type") == "string":
            enum = [v for v in spec.get("enum", []) if isinstance(v, str)]
            if enum:
                values = " | ".join(json.dumps(v) for v in enum)
                rules.append(f'{rule}: {start} ({values}) "\\n</parameter>\\n"')
            else:
                most = spec.get("maxLength")
                repeat = f"{{0,{most}}}" if isinstance(most, int) and not isinstance(most, bool) and most >= 0 else "*"
                rules += [f"{rule}: {start} text_{i}_{j}",
                          f"text_{i}_{j}[lazy]: /(?s:.{repeat})\\n<\\/parameter>\\n/ & {_ONE_CLOSE}"]
        else:
            rules += [f'{rule}: {start} value_{i}_{j} "\\n</parameter>\\n"',
                      f"value_{i}_{j}: %json {json.dumps(_compiled({**spec, **defs}, {}))}"]
    if not properties:  # nothing declared: any parameters, as text
        parts.append(f"p_{i}_any*")
        rules += [f'p_{i}_any: "<parameter=" /[A-Za-z0-9_.\\-]+/ ">\\n" text_{i}_any',
                  f"text_{i}_any[lazy]: /(?s:.*)\\n<\\/parameter>\\n/ & {_ONE_CLOSE}"]
    head = json.dumps(f"\n<function={name}>\n")
    return [f'call_{i}: {open_} {head} {" ".join(parts)} "</function>\\n" {close}', *rules]


# A string value ends at the first "\\n</parameter>\\n" and holds no other "</parameter>" (the parser ends a value at
# the first one it meets).
_ONE_CLOSE = "~/(?s:.*<\\/parameter>.*<\\/parameter>.*)/"


def _compiled(schema: dict, fallback: dict) -> dict:
    """The schema with the JSON layout of structured.py, or `fallback` when llguidance cannot compile it."""
    from llguidance import LLMatcher

    for candidate in (schema, fallback):
        if not LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(candidate, defaults=JSON_LAYOUT)):
            return {**candidate, "x-guidance": JSON_LAYOUT}
    return {"x-guidance": JSON_LAYOUT}
