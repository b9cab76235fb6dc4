"""Structured output: `response_format` enforced while sampling, by a grammar that masks the logits every step (the
JSON after a think block when thinking is on); and the Constraints tool_choice needs besides its grammar (Banned,
OneCall).

The grammar engine is llguidance (microsoft/llguidance, MIT): a Rust core with no Python dependencies that
computes each step's mask on demand from a lexer over the tokenizer's byte strings, so a new schema costs nothing
up front (a per-request schema is the common case); it is released often and is a grammar backend of llama.cpp,
vLLM and SGLang. xgrammar (0.2.9) needs torch, transformers and triton at run time (its wheel's metadata): too
much for a Mac server. outlines-core builds an index over the whole vocabulary for each schema before the first
token can be sampled.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.engine.thinking import ThinkingSplitter

# JSON as json.dumps writes it: whitespace only in the separators, so a model cannot pad the reply with whitespace
# until max_tokens (which a grammar that allows any whitespace between tokens permits).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(ValueError):
    """A response_format the grammar engine cannot compile; the message says why."""


@functools.cache
def _tokenizer(tokenizer_json: str, vocab_size: int, eos_ids: tuple[int, ...]):
    import llguidance

    return llguidance.LLTokenizer(Path(tokenizer_json).read_text(encoding="utf-8"), n_vocab=vocab_size,
                                  eos_token=list(eos_ids))


def schema_for(response_format: dict) -> dict | None:
    """The JSON schema an OpenAI response_format asks for ({"type": "text" | "json_object" | "json_schema"}); None
    for plain text. A schema the grammar engine cannot compile is a SchemaError."""
    from llguidance import LLMatcher

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise SchemaError("response_format.json_schema.schema must be a JSON schema object")
    else:
        raise SchemaError("response_format.type must be text, json_object or json_schema")
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
    if error:
        raise SchemaError("response_format: " + " ".join(error.split()))
    return schema


def json_grammar(schema: dict, thinking: str, think: int | None, think_end: int | None) -> str:
    """The llguidance grammar of a reply that is the JSON of `schema` (laid out as JSON_LAYOUT), after a think
    block as `thinking` says (see think_first)."""
    return think_first([f"reply: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"], thinking, think,
                       think_end)


def think_first(rules: list[str], thinking: str, think: int | None, think_end: int | None) -> str:
    """The llguidance grammar (lark) of a reply that is the rule `reply` (defined in `rules`) after a think block:
    `thinking` "off" (the reply starts with `reply`), "may" (`<think>` ... `</think>` may come first), "open" (the
    prompt opened the think block: the reply starts inside it and closes it). The think text is not constrained;
    the newlines the templates write after `</think>` are allowed. `think`, `think_end`: the markers' token ids
    (None: spelled as text)."""
    from llguidance import LLMatcher

    close = f"{literal('</think>', think_end)} NEWLINES?"
    start = {"off": "start: reply", "may": f"start: ({literal('<think>', think)} THINK_TEXT {close})? reply",
             "open": f"start: THINK_TEXT {close} reply"}[thinking]
    return LLMatcher.grammar_from_lark("\n".join([start, *rules, "THINK_TEXT: /(?s:.*)/", "NEWLINES: /\\n{1,2}/"]))


def literal(text: str, token: int | None) -> str:
    """A marker in a lark grammar: its token (the tokenizers' added tokens are whole tokens to llguidance, never
    spelled) or, without one, its text."""
    return f"<[{token}]>" if token is not None else json.dumps(text)


class Grammar:
    """The Constraint (see scheduler.py) of one sequence: forbidden tokens at -inf, the grammar advanced by each
    sampled token. When the grammar is complete only an end-of-sequence token is allowed."""

    def __init__(self, grammar: str, tokenizer_json: str | Path, vocab_size: int, eos_ids: tuple[int, ...]):
        import llguidance

        self._matcher = llguidance.LLMatcher(_tokenizer(str(tokenizer_json), vocab_size, tuple(eos_ids)), grammar,
                                             log_level=0)
        if self._matcher.is_error():
            raise SchemaError(f"response_format: {self._matcher.get_error()}")
        self.vocab_size = vocab_size
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def mask(self, logits: mx.array) -> mx.array:
        """logits (1, vocab) -> the same with every token the grammar forbids at -inf."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_))[None], logits, -mx.inf)

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)


class Banned:
    """The Constraint (see scheduler.py) that never lets some tokens be sampled: tool_choice "none" bans the token
    that opens a tool call."""

    def __init__(self, ids: tuple[int, ...], vocab_size: int):
        self._allowed = np.ones(vocab_size, dtype=np.bool_)  # (vocab,); numpy: made here, used on the model's thread
        self._allowed[list(ids)] = False

    def mask(self, logits: mx.array) -> mx.array:
        """logits (1, vocab) -> the same with the banned tokens at -inf."""
        return mx.where(mx.array(self._allowed[: logits.shape[-1]])[None], logits, -mx.inf)

    def accept(self, token: int) -> None:
        pass


class OneCall:
    """The Constraint (see scheduler.py) of tool_choice "auto" with parallel calls off: the model answers or calls
    as it likes until its first call is closed (`</tool_call>` after `<tool_call>`, in the answer, not in a think
    block); after that only an end-of-sequence token is allowed."""

    def __init__(self, call: int, call_end: int, splitter: ThinkingSplitter, eos_ids: tuple[int, ...],
                 vocab_size: int):
        self._call, self._call_end, self._splitter = call, call_end, splitter
        self._eos = np.zeros(vocab_size, dtype=np.bool_)  # (vocab,)
        self._eos[list(eos_ids)] = True
        self._calling = self._called = False

    def mask(self, logits: mx.array) -> mx.array:
        """logits (1, vocab) -> the same, or only the end-of-sequence tokens' once a call is complete."""
        if not self._called:
            return logits
        return mx.where(mx.array(self._eos[: logits.shape[-1]])[None], logits, -mx.inf)

    def accept(self, token: int) -> None:
        if self._splitter.feed(token) != "answer":
            return
        if token == self._call:
            self._calling = True
        elif token == self._call_end and self._calling:
            self._called = True
