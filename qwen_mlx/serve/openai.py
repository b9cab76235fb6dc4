"""The OpenAI API's shapes: /v1/chat/completions and /v1/completions requests into Jobs, pieces into responses
and server-sent events (`data: {...}` lines, then `data: [DONE]`)."""

from __future__ import annotations

import json
import secrets
import time
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
from qwen_mlx.serve.tools import ToolCall

ROLES = ("system", "developer", "user", "assistant", "tool")


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}


# ------------------------------------------------------------------------------------------------ requests

def parse_chat(llm, body: dict, *, max_messages: int, context: int) -> Job:
    messages = value(body, "messages", list, required=True)
    if not messages or len(messages) > max_messages:
        raise ApiError(400, f"messages must hold 1 to {max_messages} messages", param="messages")
    if value(body, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    kwargs = value(body, "chat_template_kwargs", dict, {})
    think = kwargs.get("enable_thinking", True)
    if not isinstance(think, bool):
        raise ApiError(400, "chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
    tools = value(body, "tools", list, [])
    if not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        raise ApiError(400, "tools must be an array of {\"type\": \"function\", \"function\": {...}}", param="tools")
    choice = _tool_choice(body, tools)
    schema = None
    response_format = value(body, "response_format", dict)
    if response_format is not None:
        try:
            schema = schema_for(response_format)
        except SchemaError as e:
            raise ApiError(400, str(e), param="response_format") from None
        if schema is not None and choice.mode == "forced":
            raise ApiError(400, "response_format cannot be combined with a tool_choice that demands a tool call",
                           param="response_format")
    prompt = chat_prompt(llm, [_message(m, i) for i, m in enumerate(messages)], think=think, tools=tools)
    if schema is not None:
        grammar, banned = format_grammar(llm, schema, prompt, think), ()
    else:
        grammar, banned = choice_constraint(llm, tools, choice, prompt, think)
    max_tokens = value(body, "max_completion_tokens", int, low=1)
    max_tokens = value(body, "max_tokens", int, max_tokens, low=1)
    logprobs = value(body, "logprobs", bool, False)
    top = value(body, "top_logprobs", int, 0, low=0, high=20)
    options = value(body, "stream_options", dict, {})
    return Job(prompt, sampling(llm, body, think), token_budget(prompt, max_tokens, context, "max_tokens"),
               stop_strings(body.get("stop"), "stop"), [] if choice.mode == "none" else tools, grammar,
               banned, one_call=choice.mode == "auto" and not choice.many, json_reply=schema is not None,
               top_logprobs=top if logprobs else None, stream=value(body, "stream", bool, False),
               include_usage=options.get("include_usage") is True)


def _tool_choice(body: dict, tools: list[dict]) -> ToolChoice:
    """The request's tool_choice: "auto" (the default), "none", "required" (one or more calls) or {"type":
    "function", "function": {"name": NAME}} (one call to NAME); parallel_tool_calls false allows one call at most."""
    choice = value(body, "tool_choice", (str, dict), "auto")
    many = value(body, "parallel_tool_calls", bool, True)
    if choice in ("auto", "none"):
        return tool_choice(choice, tools, many=many)
    if choice == "required":
        return tool_choice("any", tools, many=many)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": NAME}}', param="tool_choice")
    return tool_choice("function", tools, name=function["name"])


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"{where} must be an object with a role of {', '.join(ROLES)}", param=where)
    role = "system" if message["role"] == "developer" else message["role"]
    out = {"role": role, "content": _text(message.get("content"), where)}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise ApiError(400, f"{where}.tool_calls must be an array of function calls", param=where)
        out["tool_calls"] = [{"type": "function", "id": c.get("id"),
                              "function": {"name": c["function"].get("name"),
                                           "arguments": _arguments(c["function"].get("arguments"))}}
                             for c in calls]
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _text(content, where: str) -> str:
    """A message's content as text: a string, or the text parts of an array of parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}.content: only text parts are supported", param=where)
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or an array of text parts", param=where)


def _arguments(arguments):
    """A call's arguments as the templates want them: a mapping (Qwen3.5's iterates them)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments if isinstance(arguments, dict) else {}


def parse_completion(llm, body: dict, *, context: int) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    tokens = llm.tokenizer.encode(prompt)
    max_tokens = value(body, "max_tokens", int, 16, low=1)
    options = value(body, "stream_options", dict, {})
    return Job(tokens, sampling(llm, body, False), token_budget(tokens, max_tokens, context, "max_tokens"),
               stop_strings(body.get("stop"), "stop"), stream=value(body, "stream", bool, False),
               include_usage=options.get("include_usage") is True)


# ----------------------------------------------------------------------------------------------- responses

def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}}


def _finish(outcome: Outcome) -> str:
    return {"stop_sequence": "stop"}.get(outcome.finish, outcome.finish)


def _call(call: ToolCall, index: int) -> dict:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}


def _logprobs(tokenizer, entries) -> list[dict]:
    def one(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


async def chat_response(pieces: AsyncIterator[Piece], model: str, tokenizer, want_logprobs: bool) -> dict:
    text, thinking, calls, logprobs = [], [], [], []
    async for piece in pieces:
        logprobs += piece.logprobs
        if piece.kind == "text":
            text.append(piece.text)
        elif piece.kind == "thinking":
            thinking.append(piece.text)
        elif piece.kind == "tool":
            calls.append(_call(piece.call, len(calls)))
        else:
            outcome = piece.outcome
    content = "".join(text)
    message = {"role": "assistant", "content": content if content.strip() or not calls else None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    choice = {"index": 0, "message": message, "finish_reason": _finish(outcome),
              "logprobs": {"content": _logprobs(tokenizer, logprobs)} if want_logprobs else None}
    return {"id": _id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(outcome)}


async def chat_stream(pieces: AsyncIterator[Piece], model: str, tokenizer, job: Job) -> AsyncIterator[str]:
    head = {"id": _id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    async for piece in pieces:
        logprobs = {"content": _logprobs(tokenizer, piece.logprobs)} if job.top_logprobs is not None else None
        if piece.kind == "text":
            yield chunk({"content": piece.text}, logprobs=logprobs)
        elif piece.kind == "thinking":
            yield chunk({"reasoning_content": piece.text}, logprobs=logprobs)
        elif piece.kind == "tool":
            yield chunk({"tool_calls": [_call(piece.call, calls)]}, logprobs=logprobs)
            calls += 1
        else:
            yield chunk({}, _finish(piece.outcome))
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(piece.outcome)})
    yield "data: [DONE]\n\n"


async def completion_response(pieces: AsyncIterator[Piece], model: str) -> dict:
    text = []
    async for piece in pieces:
        if piece.kind == "done":
            outcome = piece.outcome
        else:
            text.append(piece.text)
    choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": _finish(outcome)}
    return {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(outcome)}


async def completion_stream(pieces: AsyncIterator[Piece], model: str, job: Job) -> AsyncIterator[str]:
    head = {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
    async for piece in pieces:
        if piece.kind == "done":
            yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                            "finish_reason": _finish(piece.outcome)}]})
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(piece.outcome)})
        else:
            yield sse({**head, "choices": [{"index": 0, "text": piece.text, "logprobs": None, "finish_reason": None}]})
    yield "data: [DONE]\n\n"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)
