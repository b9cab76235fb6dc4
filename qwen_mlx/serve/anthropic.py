"""The Anthropic Messages API's shapes: /v1/messages requests into Jobs, pieces into a message and its streaming
events (message_start, content_block_start / delta / stop per block, message_delta, message_stop)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from qwen_mlx.serve.job import (
    ApiError,
    Job,
    Outcome,
    Piece,
    ToolChoice,
    chat_prompt,
    choice_constraint,
    format_grammar,
    sampling,
    stop_strings,
    token_budget,
    tool_choice,
    value,
)
from qwen_mlx.serve.structured import SchemaError, schema_for

KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "request_too_large", 429: "rate_limit_error", 500: "api_error"}


def error_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": KINDS.get(error.status, "api_error"), "message": error.message}}


# ------------------------------------------------------------------------------------------------- request

def parse_messages(llm, body: dict, *, max_messages: int, context: int) -> Job:
    max_tokens = value(body, "max_tokens", int, required=True, low=1)
    given = value(body, "messages", list, required=True)
    if not given or len(given) > max_messages:
        raise ApiError(400, f"messages must hold 1 to {max_messages} messages", param="messages")
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _blocks_text(system, "system")})
    for i, message in enumerate(given):
        messages += _message(message, i)
    thinking = value(body, "thinking", dict, {"type": "disabled"})
    think = thinking.get("type") in ("enabled", "adaptive")
    tools = [_tool(t, i) for i, t in enumerate(value(body, "tools", list, []))]
    choice = _tool_choice(value(body, "tool_choice", dict, {}), tools)
    schema = None
    output = value(body, "output_config", dict, {}).get("format")
    if output is not None:  # structured output: {"type": "json_schema", "schema": {...}}
        if not isinstance(output, dict) or output.get("type") != "json_schema":
            raise ApiError(400, "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}",
                           param="output_config")
        try:
            schema = schema_for({"type": "json_schema", "json_schema": {"schema": output.get("schema")}})
        except SchemaError as e:
            raise ApiError(400, str(e).replace("response_format.json_schema", "output_config.format")
                           .replace("response_format", "output_config.format"),
                           param="output_config") from None
        if choice.mode == "forced":
            raise ApiError(400, "output_config.format cannot be combined with a tool_choice that demands a tool call",
                           param="output_config")
    prompt = chat_prompt(llm, messages, think=think, tools=tools)
    if schema is not None:
        grammar, banned = format_grammar(llm, schema, prompt, think), ()
    else:
        grammar, banned = choice_constraint(llm, tools, choice, prompt, think)
    return Job(prompt, sampling(llm, body, think), token_budget(prompt, max_tokens, context, "max_tokens"),
               stop_strings(body.get("stop_sequences"), "stop_sequences"), [] if choice.mode == "none" else tools,
               grammar, banned, one_call=choice.mode == "auto" and not choice.many, json_reply=schema is not None,
               stream=value(body, "stream", bool, False))


def _tool_choice(choice: dict, tools: list[dict]) -> ToolChoice:
    """{"type": "auto"} (the default), {"type": "none"}, {"type": "any"} (one or more calls) or {"type": "tool",
    "name": NAME} (one call to NAME); "disable_parallel_tool_use": true allows one call at most."""
    kind = choice.get("type", "auto")
    if kind not in ("auto", "none", "any", "tool"):
        raise ApiError(400, "tool_choice.type must be auto, any, tool or none", param="tool_choice")
    name = choice.get("name")
    if kind == "tool" and not isinstance(name, str):
        raise ApiError(400, "tool_choice of type tool needs the tool's name", param="tool_choice")
    single = choice.get("disable_parallel_tool_use")
    if single is not None and not isinstance(single, bool):
        raise ApiError(400, "tool_choice.disable_parallel_tool_use must be a boolean", param="tool_choice")
    many = single is not True
    return tool_choice("function" if kind == "tool" else kind, tools, name=name, many=many)


def _message(message, i: int) -> list[dict]:
    """One Anthropic message as the template's messages: tool_use blocks become the assistant's tool_calls,
    tool_result blocks become tool messages."""
    where = f"messages.{i}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise ApiError(400, f"{where}: role must be user or assistant", param=where)
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": message["role"], "content": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise ApiError(400, f"{where}.content must be a string or an array of content blocks", param=where)
    text, calls, results = [], [], []
    for block in content:
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and message["role"] == "assistant" and isinstance(block.get("name"), str):
            arguments = block.get("input") if isinstance(block.get("input"), dict) else {}
            calls.append({"type": "function", "id": block.get("id"),
                          "function": {"name": block["name"], "arguments": arguments}})
        elif kind == "tool_result" and message["role"] == "user":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _blocks_text(block.get("content") or "", f"{where}.tool_result")})
        elif kind in ("thinking", "redacted_thinking") and message["role"] == "assistant":
            continue  # Qwen's templates drop earlier turns' thinking anyway
        else:
            raise ApiError(400, f"{where}: unsupported content block {kind!r}", param=where)
    out = list(results)
    if text or calls or not results:
        out.append({"role": message["role"], "content": "".join(text), **({"tool_calls": calls} if calls else {})})
    return out


def _blocks_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise ApiError(400, f"{where} must be a string or an array of text blocks", param=where)


def _tool(tool, i: int) -> dict:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise ApiError(400, f"tools.{i} must be an object with a name and an input_schema", param="tools")
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                             "parameters": tool.get("input_schema") or {}}}


# ------------------------------------------------------------------------------------------------ response

def _stop_reason(outcome: Outcome) -> str:
    return {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}.get(outcome.finish, outcome.finish)


def _usage(outcome: Outcome) -> dict:
    return {"input_tokens": outcome.prompt_tokens - outcome.cached_tokens, "output_tokens": outcome.completion_tokens,
            "cache_read_input_tokens": outcome.cached_tokens, "cache_creation_input_tokens": 0}


def _head(model: str) -> dict:
    return {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant", "model": model}


async def message_response(pieces: AsyncIterator[Piece], model: str) -> dict:
    blocks: list[dict] = []
    async for piece in pieces:
        if piece.kind == "done":
            outcome = piece.outcome
        elif piece.kind == "tool":
            blocks.append({"type": "tool_use", "id": piece.call.id, "name": piece.call.name,
                           "input": piece.call.arguments})
        else:
            kind, key = ("thinking", "thinking") if piece.kind == "thinking" else ("text", "text")
            if blocks and blocks[-1]["type"] == kind:
                blocks[-1][key] += piece.text
            else:
                blocks.append({"type": kind, key: piece.text, **({"signature": ""} if kind == "thinking" else {})})
    blocks = [b for b in blocks if b["type"] != "text" or b["text"].strip() or len(blocks) == 1]
    return {**_head(model), "content": blocks, "stop_reason": _stop_reason(outcome),
            "stop_sequence": outcome.stop_sequence, "usage": _usage(outcome)}


async def message_stream(pieces: AsyncIterator[Piece], model: str, prompt_tokens: int) -> AsyncIterator[str]:
    start = {**_head(model), "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
    yield event("message_start", {"type": "message_start", "message": start})
    index, open_kind = -1, None
    async for piece in pieces:
        if piece.kind in ("text", "thinking") and piece.kind == open_kind:
            delta = {"type": "text_delta", "text": piece.text} if piece.kind == "text" else \
                {"type": "thinking_delta", "thinking": piece.text}
            yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            continue
        if open_kind is not None:
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
            open_kind = None
        if piece.kind == "done":
            outcome = piece.outcome
            delta = {"stop_reason": _stop_reason(outcome), "stop_sequence": outcome.stop_sequence}
            yield event("message_delta", {"type": "message_delta", "delta": delta, "usage": _usage(outcome)})
            yield event("message_stop", {"type": "message_stop"})
            return
        index += 1
        if piece.kind == "tool":
            block = {"type": "tool_use", "id": piece.call.id, "name": piece.call.name, "input": {}}
            yield event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
            delta = {"type": "input_json_delta", "partial_json": piece.call.arguments_json}
            yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
            continue
        open_kind = piece.kind
        block = {"type": "text", "text": ""} if piece.kind == "text" else \
            {"type": "thinking", "thinking": "", "signature": ""}
        yield event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        delta = {"type": "text_delta", "text": piece.text} if piece.kind == "text" else \
            {"type": "thinking_delta", "thinking": piece.text}
        yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
