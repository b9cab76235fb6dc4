"""Tool-call parsing on its own: both Qwen formats, any split of the streamed text, malformed calls as text."""

from __future__ import annotations

import random

import pytest

from qwen_mlx.serve.tools import ToolCall, ToolCallParser

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"},
                                     "exact": {"type": "boolean"}, "code": {"type": "string"}}}}}]
QWEN3 = '<tool_call>\n{"name": "search", "arguments": {"query": "mlx", "limit": 5}}\n</tool_call>'
QWEN35 = ("<tool_call>\n<function=search>\n<parameter=query>\nmlx\n</parameter>\n<parameter=limit>\n5\n"
          "</parameter>\n<parameter=exact>\ntrue\n</parameter>\n<parameter=code>\n42\n</parameter>\n</function>\n"
          "</tool_call>")


def parse(text: str, pieces: list[int] | None = None) -> list:
    """Feed the text split at the given cut points (default: whole); strings merged, calls as (name, arguments)."""
    parser, out = ToolCallParser(TOOLS), []
    cuts = [0, *(pieces or []), len(text)]
    for a, b in zip(cuts, cuts[1:]):
        out += parser.feed(text[a:b])
    out += parser.finish()
    merged = []
    for item in out:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append((item.name, item.arguments) if isinstance(item, ToolCall) else item)
    return merged


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_the_stream_gives_the_same_result(seed):
    text = f"Searching.\n{QWEN3}\n{QWEN35}\nDone <tool"
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
    assert parse(text, cuts) == parse(text) == [
        "Searching.\n", ("search", {"query": "mlx", "limit": 5}), "\n",
        ("search", {"query": "mlx", "limit": 5, "exact": True, "code": "42"}), "\nDone <tool"]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "search", "arguments": {"query": </tool_call>',  # truncated JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',  # not an offered tool
    '<tool_call>\n{"name": "search", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    "<tool_call>\n<function=search>\n<parameter=query>\nmlx\n</function>\n</tool_call>",  # parameter unclosed
    "<tool_call>\n<function=search>\nstray text\n</function>\n</tool_call>",
    '<tool_call>\n{"name": "search", "arguments": {"query": "mlx"}}',  # never closed
])
def test_malformed_calls_come_back_as_their_text(text):
    assert parse("Before " + text) == ["Before " + text]


def test_arguments_given_as_a_json_string_are_accepted():
    text = '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}</tool_call>'
    assert parse(text) == [("search", {"query": "x"})]
