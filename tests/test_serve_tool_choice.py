"""tool_choice enforced while sampling: "required" / a named function (OpenAI) and "any" / "tool" (Anthropic) always
give a call whose arguments validate against the tool's schema, even from random weights, in the checkpoint's own
format (Qwen3's JSON, Qwen3.5's XML-like); "none" never gives one; a tool_choice naming no offered tool is a 400."""

from __future__ import annotations

import json
import shutil

import anthropic
import httpx
import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest
from serve_fixtures import ScriptedForward, running
from test_chat_template import QWEN35_STYLE

import qwen_mlx
from qwen_mlx.serve.app import ServeOptions, create_app
from qwen_mlx.serve.job import choice_constraint, format_grammar, tool_choice
from qwen_mlx.serve.structured import Grammar

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                               "unit": {"type": "string", "enum": ["C", "F"]}},
              "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": TIME}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
ASK = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module", params=["json", "xml"])
def llm(request, tiny_checkpoint, tmp_path_factory):
    """The tiny random-weight Qwen3 checkpoint with Qwen3's template (JSON calls) or a Qwen3.5-style one (XML)."""
    path = tiny_checkpoint("qwen3")
    if request.param == "xml":
        copy = tmp_path_factory.mktemp("qwen35-template") / "model"
        shutil.copytree(path, copy)
        (copy / "chat_template.jinja").write_text(QWEN35_STYLE)
        path = copy
    return qwen_mlx.load(path)


@pytest.fixture(scope="module")
def server(llm):
    with running(create_app(llm, ServeOptions("tiny"))) as url:
        yield url


def clients(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused"), anthropic.Anthropic(base_url=url, api_key="unused")


# ------------------------------------------------------------------------------------------------ the grammar

def allowed(grammar: Grammar, vocab_size: int) -> set[int]:
    """The token ids the grammar lets through now."""
    return set(np.flatnonzero(np.array(mx.isfinite(grammar.mask(mx.zeros((1, vocab_size))))[0])).tolist())


def run_grammar(llm, grammar: str, text: str) -> bool:
    """True when the grammar lets every token of `text` through and then allows the end of the turn."""
    matcher = Grammar(grammar, llm.path / "tokenizer.json", llm.config.vocab_size, llm.tokenizer.eos_ids)
    for token in llm.tokenizer.encode(text):
        if token not in allowed(matcher, llm.config.vocab_size):
            return False
        matcher.accept(token)
    return set(llm.tokenizer.eos_ids) <= allowed(matcher, llm.config.vocab_size)


def template_call(llm, name: str, arguments: dict) -> str:
    """The call as the checkpoint's own template writes it in an earlier assistant turn."""
    call = {"type": "function", "id": "c1", "function": {"name": name, "arguments": arguments}}
    text = llm.tokenizer.apply_chat_template(ASK + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                             add_generation_prompt=False, enable_thinking=False, tools=TOOLS)
    return text[text.index("<tool_call>", text.rindex("<|im_start|>assistant")) : text.rindex("</tool_call>") + 12]


def test_the_grammar_takes_the_templates_own_calls_and_nothing_else(llm):
    think = False
    prompt = llm.tokenizer.encode_chat(ASK, enable_thinking=think, tools=TOOLS)
    required, _ = choice_constraint(llm, TOOLS, tool_choice("any", TOOLS), prompt, think)
    named, _ = choice_constraint(llm, TOOLS, tool_choice("function", TOOLS, name="get_time"), prompt, think)
    weather = template_call(llm, "get_weather", {"city": "Paris", "days": 3, "unit": "C"})
    clock = template_call(llm, "get_time", {"zone": "UTC"})
    assert ("<function=" in weather) == (llm.tokenizer.chat_template == QWEN35_STYLE)  # the XML form
    assert run_grammar(llm, required, weather) and run_grammar(llm, required, clock)
    assert run_grammar(llm, named, clock) and not run_grammar(llm, named, weather)
    assert not run_grammar(llm, required, "Sure! " + weather)  # text before the call
    assert not run_grammar(llm, required, template_call(llm, "get_weather", {"city": "Paris", "unit": "K"}))
    assert not run_grammar(llm, required, template_call(llm, "get_weather", {"unit": "C"}))  # city is required
    assert not run_grammar(llm, required, template_call(llm, "delete_all", {}))


# ----------------------------------------------------------------------------- live, random weights

def check_openai(message, name: str | None) -> None:
    assert message.content in (None, "")
    [call] = message.tool_calls
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# 2-4 s a case (a request sampled to its end): one choice per API by default, both with the slow marker (CI).
@pytest.mark.parametrize("choice", ["required", pytest.param({"type": "function", "function": {"name": "get_time"}},
                                                             marks=pytest.mark.slow)])
def test_openai_required_and_named_choice_always_give_a_valid_call(server, choice):
    client, _ = clients(server)
    name = None if choice == "required" else "get_time"
    ask = dict(model="x", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=200,
               extra_body=NO_THINKING)
    for seed in (0, 1):
        reply = client.chat.completions.create(**ask, temperature=1.0, seed=seed)
        assert reply.choices[0].finish_reason == "tool_calls"
        check_openai(reply.choices[0].message, name)
    chunks = list(client.chat.completions.create(**ask, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    [call] = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", [pytest.param({"type": "any", "disable_parallel_tool_use": True},
                                                 marks=pytest.mark.slow),
                                    {"type": "tool", "name": "get_weather"}])
def test_anthropic_any_and_tool_choice_always_give_a_valid_call(server, choice):
    _, client = clients(server)
    ask = dict(model="x", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS, tool_choice=choice)
    for seed in (0, 1):
        message = client.messages.create(**ask, extra_body={"temperature": 1.0, "seed": seed})
        assert message.stop_reason == "tool_use"
        [block] = [b for b in message.content if b.type == "tool_use"]
        assert choice["type"] == "any" or block.name == "get_weather"
        jsonschema.validate(block.input, SCHEMAS[block.name])
    with client.messages.stream(**ask, extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [block] = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_none_never_gives_a_call(server):
    client, anthropic_client = clients(server)
    for seed in range(2):
        reply = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="none",
                                               max_tokens=16, temperature=1.0, seed=seed, extra_body=NO_THINKING)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
        assert "<tool_call>" not in reply.choices[0].message.content
        message = anthropic_client.messages.create(model="x", max_tokens=16, messages=ASK, tools=ANTHROPIC_TOOLS,
                                                   tool_choice={"type": "none"},
                                                   extra_body={"temperature": 1.0, "seed": seed})
        assert [b.type for b in message.content] == ["text"] and message.stop_reason != "tool_use"


# ------------------------------------------------------------------------------- scripted replies

@pytest.fixture(scope="module")
def scripted(llm):
    forward = ScriptedForward([], llm.config.vocab_size)
    with running(create_app(llm, ServeOptions("scripted"), forward=forward)) as url:
        yield url, forward


def test_a_think_block_may_come_before_the_demanded_calls_and_several_calls_are_allowed(llm, scripted):
    url, forward = scripted
    tok = llm.tokenizer
    weather = template_call(llm, "get_weather", {"city": "Paris", "unit": "C"})
    clock = template_call(llm, "get_time", {"zone": "CET"})
    opens = llm.tokenizer.chat_template == QWEN35_STYLE  # its prompt opens the think block itself
    forward.script = ([] if opens else [tok.think_id]) + tok.encode("Two calls.") + [tok.think_end_id] + \
        tok.encode("\n\n" + weather + "\n" + clock) + [tok.token_id("<|im_end|>")]
    client, _ = clients(url)
    reply = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0)
    message = reply.choices[0].message
    assert message.reasoning_content == "Two calls." and reply.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]


def test_the_call_marker_is_never_sampled_under_none(llm, scripted):
    url, forward = scripted
    call = template_call(llm, "get_time", {"zone": "UTC"})
    forward.script = llm.tokenizer.encode(call) + [llm.tokenizer.token_id("<|im_end|>")]
    client, _ = clients(url)
    chosen = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, temperature=0, max_tokens=4,
                                            extra_body=NO_THINKING)
    assert chosen.choices[0].message.content.startswith("<tool_call>")  # "auto": the model opens its call
    reply = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                           max_tokens=4, logprobs=True, extra_body=NO_THINKING)
    assert reply.choices[0].message.tool_calls is None
    assert "<tool_call>" not in [e.token for e in reply.choices[0].logprobs.content]


def opens_thinking(llm) -> bool:
    """The Qwen3.5-style template opens the think block in the prompt itself; Qwen3's leaves it to the model."""
    return llm.tokenizer.chat_template == QWEN35_STYLE


def thought(llm, text: str) -> list[int]:
    """A think block as the model writes it (its opening marker only where the prompt did not write it)."""
    tok = llm.tokenizer
    return ([] if opens_thinking(llm) else [tok.think_id]) + tok.encode(text) + [tok.think_end_id]


def test_auto_with_parallel_calls_off_gives_one_call(llm, scripted):
    """The model wants two calls; with parallel calls off the turn ends after the first (a call written inside
    the think block does not count), with them on both come back."""
    url, forward = scripted
    tok = llm.tokenizer
    weather = template_call(llm, "get_weather", {"city": "Paris", "unit": "C"})
    clock = template_call(llm, "get_time", {"zone": "CET"})
    both = tok.encode("\n\n" + weather + "\n" + clock) + [tok.token_id("<|im_end|>")]
    client, anthropic_client = clients(url)
    forward.script = thought(llm, "Maybe " + clock) + both
    for parallel, names in ((False, ["get_weather"]), (True, ["get_weather", "get_time"])):
        reply = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, parallel_tool_calls=parallel,
                                               temperature=0)
        message = reply.choices[0].message
        assert message.reasoning_content == "Maybe " + clock and reply.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in message.tool_calls] == names
    chunks = list(client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                                 temperature=0, stream=True))
    assert [tc.function.name for c in chunks for tc in c.choices[0].delta.tool_calls or []] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    forward.script = both  # Anthropic: thinking off by default
    for choice, names in (({"type": "auto", "disable_parallel_tool_use": True}, ["get_weather"]),
                          ({"type": "auto"}, ["get_weather", "get_time"])):
        message = anthropic_client.messages.create(model="x", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS,
                                                   tool_choice=choice, extra_body={"temperature": 0})
        assert [b.name for b in message.content if b.type == "tool_use"] == names
        assert message.stop_reason == "tool_use"


PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "age": {"type": "integer", "minimum": 0}},
                 "required": ["name", "age"], "additionalProperties": False}
PERSON = {"name": "Ada", "age": 36}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}


def test_response_format_lets_the_model_think_first(llm, scripted):
    """With thinking on, a think block may come before the JSON: the thinking arrives apart, the content is the
    JSON alone (the newlines the model writes after the think block are not part of it)."""
    url, forward = scripted
    tok = llm.tokenizer
    forward.script = thought(llm, "A mathematician.") + tok.encode("\n\n" + json.dumps(PERSON)) + \
        [tok.token_id("<|im_end|>")]
    client, anthropic_client = clients(url)
    reply = client.chat.completions.create(model="x", messages=ASK, response_format=PERSON_FORMAT, temperature=0)
    message = reply.choices[0].message
    assert message.reasoning_content == "A mathematician." and reply.choices[0].finish_reason == "stop"
    assert message.content == json.dumps(PERSON)
    jsonschema.validate(json.loads(message.content), PERSON_SCHEMA)
    chunks = list(client.chat.completions.create(model="x", messages=ASK, response_format=PERSON_FORMAT,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == json.dumps(PERSON)
    message = anthropic_client.messages.create(
        model="x", max_tokens=200, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"format": {"type": "json_schema", "schema": PERSON_SCHEMA}}, extra_body={"temperature": 0})
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in message.content] == \
        [("thinking", "A mathematician."), ("text", json.dumps(PERSON))]


def test_response_format_without_thinking_masks_the_think_token(llm, scripted):
    tok = llm.tokenizer
    for think in (False, True):
        prompt = tok.encode_chat(ASK, enable_thinking=think)
        first = allowed(Grammar(format_grammar(llm, PERSON_SCHEMA, prompt, think), llm.path / "tokenizer.json",
                                llm.config.vocab_size, tok.eos_ids), llm.config.vocab_size)
        assert (tok.think_id in first) == (think and not opens_thinking(llm))
        assert tok.encode(json.dumps(PERSON))[0] in first  # (with the block open: as think text)
    url, forward = scripted
    forward.script = thought(llm, "Hmm.") + tok.encode(json.dumps(PERSON)) + [tok.token_id("<|im_end|>")]
    client, _ = clients(url)
    reply = client.chat.completions.create(model="x", messages=ASK, response_format=PERSON_FORMAT, temperature=0,
                                           max_tokens=3, logprobs=True, extra_body=NO_THINKING)
    assert "reasoning_content" not in reply.choices[0].message.model_extra
    assert reply.choices[0].message.content.startswith("{")
    assert "<think>" not in [e.token for e in reply.choices[0].logprobs.content]


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("body", [
    {"tool_choice": {"type": "function", "function": {"name": "delete_all"}}, "tools": TOOLS},
    {"tool_choice": "required"},
    {"tool_choice": "sometimes", "tools": TOOLS},
    {"tool_choice": {"type": "function"}, "tools": TOOLS},
    {"tool_choice": "required", "tools": TOOLS, "response_format": {"type": "json_object"}},
])
def test_openai_bad_tool_choice_is_a_400(server, body):
    response = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] in ("tool_choice", "response_format")
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "delete_all"}, {"type": "tool"}, {"type": "maybe"},
                                    {"type": "maybe", "disable_parallel_tool_use": True},
                                    {"type": "auto", "disable_parallel_tool_use": "yes"}])
def test_anthropic_bad_tool_choice_is_a_400(server, choice):
    response = httpx.post(server + "/v1/messages", json={"max_tokens": 10, "messages": ASK, "tools": ANTHROPIC_TOOLS,
                                                         "tool_choice": choice})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
