"""What both APIs share: a parsed request (Job), its errors (ApiError), and the run of a job as pieces of a reply
(thinking, text, tool calls, then the outcome) that each API shapes into its own JSON and events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.engine.stream import stream_reply
from qwen_mlx.engine.thinking import ThinkingSplitter, prompt_opens_thinking
from qwen_mlx.engine.tokenizer import Tokenizer
from qwen_mlx.serve.scheduler import Scheduler, Sequence, Submitted, TokenLogprob
from qwen_mlx.serve.structured import Banned, Grammar, OneCall, SchemaError, json_grammar
from qwen_mlx.serve.tools import Markers, ToolCall, ToolCallParser, call_format, call_grammar


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-sentence message, the API's error type, the field at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


@dataclass
class Job:
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_strings: tuple[str, ...] = ()
    tools: list[dict] = field(default_factory=list)  # OpenAI-shaped; calls are parsed only when tools are given
    grammar: str | None = None  # llguidance grammar (structured output, or the calls a tool_choice demands)
    banned: tuple[int, ...] = ()  # token ids never sampled (tool_choice "none": the tool-call marker)
    one_call: bool = False  # tool_choice "auto" with parallel calls off: after the first call, only end-of-turn
    json_reply: bool = False  # response_format: the answer is the JSON alone (newlines after thinking dropped)
    top_logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class Outcome:
    finish: str  # "stop" (end of turn), "stop_sequence", "length", "tool_calls"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the prefix cache supplied (not prefilled)
    completion_tokens: int
    stop_sequence: str | None = None


@dataclass
class Piece:
    kind: str  # "thinking", "text", "tool", "done"
    text: str = ""
    call: ToolCall | None = None
    outcome: Outcome | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens handed out since the last piece


class Runner:
    """Submits jobs to the scheduler and turns their tokens into pieces."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, tokenizer_json, vocab_size: int,
                 threads: anyio.CapacityLimiter | None = None):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.tokenizer_json, self.vocab_size = tokenizer_json, vocab_size
        self.threads = threads

    def submit(self, job: Job) -> Sequence:
        """Queue the job (QueueFull when the queue is full: before any response is sent)."""
        constraint = None
        if job.grammar is not None:
            try:
                constraint = Grammar(job.grammar, self.tokenizer_json, self.vocab_size, self.tokenizer.eos_ids)
            except SchemaError as e:
                raise ApiError(400, str(e)) from None
        elif job.banned:
            constraint = Banned(job.banned, self.vocab_size)
        elif job.one_call:
            constraint = self._one_call(job.prompt)
        seq = Sequence(job.prompt, make_sampler(job.sampling), job.max_tokens, constraint, job.top_logprobs)
        return self.scheduler.submit(seq)

    def _one_call(self, prompt: list[int]) -> OneCall | None:
        """The one-call constraint; None when the tokenizer has no `<tool_call>` / `</tool_call>` tokens (every Qwen
        tokenizer since Qwen2.5 has them)."""
        tok = self.tokenizer
        call, call_end = tok.token_id("<tool_call>"), tok.token_id("</tool_call>")
        if call is None or call_end is None:
            return None
        splitter = ThinkingSplitter(tok.think_id, tok.think_end_id,
                                    prompt_opens_thinking(prompt, tok.think_id, tok.think_end_id))
        return OneCall(call, call_end, splitter, tok.eos_ids, self.vocab_size)

    async def pieces(self, job: Job, seq: Sequence, id_prefix: str = "call_") -> AsyncIterator[Piece]:
        """The reply's pieces. Leaving the loop early (a client that disconnected) cancels the sequence."""
        source = Submitted(seq, self.tokenizer)
        events = stream_reply(source, job.prompt, [], job.prompt, job.sampling, max_tokens=job.max_tokens,
                              stop_strings=job.stop_strings)
        parser = ToolCallParser(job.tools, id_prefix) if job.tools else None
        logprobs: list[TokenLogprob] = []  # handed out, not yet attached to a piece
        lead = job.json_reply  # the answer's leading newlines are still to drop
        try:
            while True:
                event = await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True,
                                                       limiter=self.threads)
                logprobs, source.logprobs = logprobs + source.logprobs, []
                if event is None or event.kind == "done":
                    break
                if event.kind == "thinking":
                    yield Piece("thinking", event.text, logprobs=logprobs)
                    logprobs = []
                    continue
                text = event.text.lstrip("\n") if lead else event.text
                if not text:
                    continue  # the newlines before the JSON: their logprobs go with the next piece
                lead = False
                for item in parser.feed(text) if parser else [text]:
                    yield _piece(item, logprobs)
                    logprobs = []
            for item in parser.finish() if parser else []:
                yield _piece(item, logprobs)
                logprobs = []
            if seq.finish == "error":
                raise RuntimeError("the model's step failed")
            yield Piece("done", outcome=self._outcome(job, seq, event.finish_reason if event else "length",
                                                      parser.calls if parser else 0))
        finally:
            seq.stop.set()

    def _outcome(self, job: Job, seq: Sequence, reason: str, calls: int) -> Outcome:
        finish, matched = reason, None
        if reason == "stop" and seq.generated and seq.generated[-1] not in self.tokenizer.eos_ids:
            text = self.tokenizer.decode(seq.generated)
            hits = [(text.find(s), s) for s in job.stop_strings if s in text]
            finish, matched = "stop_sequence", min(hits)[1] if hits else None
        if calls and reason == "stop":
            finish = "tool_calls"
        return Outcome(finish, len(job.prompt), seq.cached_tokens, len(seq.generated), matched)


def _piece(item, logprobs: list[TokenLogprob]) -> Piece:
    if isinstance(item, ToolCall):
        return Piece("tool", call=item, logprobs=logprobs)
    return Piece("text", item, logprobs=logprobs)


# ------------------------------------------------------------------------------------------ request fields

_NUMBER = (int, float)


def value(body: dict, name: str, kind, default=None, *, required: bool = False, low: float | None = None,
          high: float | None = None):
    """body[name] checked against `kind` (a type or tuple; a bool is never a number) and the range [low, high];
    missing or null gives `default`. Any other value is a 400 naming the field."""
    got = body.get(name)
    if got is None:
        if required:
            raise ApiError(400, f"{name} is required", param=name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(got, kinds) or (isinstance(got, bool) and bool not in kinds):
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"{name} must be {names}", param=name)
    if (low is not None and got < low) or (high is not None and got > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ApiError(400, f"{name} must be {bounds}", param=name)
    return got


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def stop_strings(stop, name: str) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"{name} must be a non-empty string or an array of at most 16 of them", param=name)
    return tuple(stop)


def sampling(llm, body: dict, think: bool) -> SamplingParams:
    """The checkpoint's recommended sampling, overridden by the request's temperature, top_p, top_k, min_p,
    repetition_penalty and seed."""
    overrides = {
        "temperature": value(body, "temperature", _NUMBER, low=0, high=2),
        "top_p": value(body, "top_p", _NUMBER, low=0, high=1),
        "top_k": value(body, "top_k", int, low=0),
        "min_p": value(body, "min_p", _NUMBER, low=0, high=1),
        "repetition_penalty": value(body, "repetition_penalty", _NUMBER, low=0.01, high=10),
        "seed": value(body, "seed", int),
    }
    return llm.sampling(think, **{k: v for k, v in overrides.items() if v is not None})


def chat_prompt(llm, messages: list[dict], *, think: bool, tools: list[dict] | None) -> list[int]:
    """The checkpoint's template over the messages; a template that refuses them is the request's fault."""
    from qwen_mlx.engine.tokenizer import TemplateError

    try:
        return llm.tokenizer.encode_chat(messages, enable_thinking=think, tools=tools or None)
    except TemplateError as e:
        raise ApiError(400, str(e), param="messages") from None


@dataclass(frozen=True)
class ToolChoice:
    """What a request's tool_choice asks for: "auto" (the model decides; without `many`, one call at most), "none"
    (no calls: the tools stay in the prompt, the call marker is never sampled, nothing is parsed), or "forced": a
    reply of calls only, to any of `names`, one call or (with `many`) one or more."""

    mode: str
    names: tuple[str, ...] = ()
    many: bool = True


def tool_choice(mode: str, tools: list[dict], *, name: str | None = None, many: bool = True,
                param: str = "tool_choice") -> ToolChoice:
    """A ToolChoice from an API's own words: mode "auto", "none", "any" (a call to any offered tool) or "function"
    (a call to `name`, exactly one). A call demanded without tools, or to a tool not offered, is a 400."""
    if mode == "auto":
        return ToolChoice(mode, many=many)
    if mode == "none":
        return ToolChoice(mode)
    offered = [t["function"]["name"] for t in tools if isinstance(t["function"].get("name"), str)]
    if not offered:
        raise ApiError(400, f"{param} demands a tool call but the request offers no tools", param=param)
    if mode == "any":
        return ToolChoice("forced", tuple(offered), many)
    if name not in offered:
        raise ApiError(400, f"{param} names the tool {name!r}, which is not among the request's tools", param=param)
    return ToolChoice("forced", (name,), False)


def choice_constraint(llm, tools: list[dict], choice: ToolChoice, prompt: list[int],
                      think: bool) -> tuple[str | None, tuple[int, ...]]:
    """(grammar, banned ids) that enforce the choice while sampling: for forced calls, the grammar of the calls in
    the checkpoint's own format (after a think block when thinking is on); for "none", the call marker banned.
    ("auto" with one call at most is Job.one_call: the Runner's OneCall constraint.)"""
    tok = llm.tokenizer
    if choice.mode == "forced":
        marks = Markers(tok.token_id("<tool_call>"), tok.token_id("</tool_call>"), tok.think_id, tok.think_end_id)
        grammar = call_grammar(tools, list(choice.names), call_format(tok.chat_template), marks, many=choice.many,
                               thinking=thinking_mode(tok, prompt, think))
        return grammar, ()
    marker = tok.token_id("<tool_call>")
    return None, (marker,) if choice.mode == "none" and marker is not None else ()


def format_grammar(llm, schema: dict, prompt: list[int], think: bool) -> str:
    """The grammar of a structured reply (response_format, Anthropic's output_config.format): the JSON of
    `schema`, after a think block when thinking is on."""
    tok = llm.tokenizer
    return json_grammar(schema, thinking_mode(tok, prompt, think), tok.think_id, tok.think_end_id)


def thinking_mode(tok: Tokenizer, prompt: list[int], think: bool) -> str:
    """How a constrained reply begins (structured.think_first): "open" when the prompt opened the think block (the
    reply closes it first), else "may" (a think block may come first) with thinking on, "off" without."""
    if prompt_opens_thinking(prompt, tok.think_id, tok.think_end_id):
        return "open"
    return "may" if think else "off"


def token_budget(prompt: list[int], max_tokens: int | None, context: int, name: str) -> int:
    """max_tokens checked against what the context leaves after the prompt (all of it when not given)."""
    room = context - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model's context is {context}",
                       param="messages")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ApiError(400, f"{name} ({max_tokens}) + the prompt ({len(prompt)} tokens) exceeds the model's "
                            f"context of {context} tokens", param=name)
    return max_tokens
