"""`qwen-mlx serve` through the real openai and anthropic clients, on an ephemeral loopback port: greedy answers
equal llm.generate's, streams equal plain answers, usage, thinking, structured output, tool calls."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import mlx.core as mx
import openai
import pytest
from serve_fixtures import ScriptedForward, running

import qwen_mlx
from qwen_mlx.engine.generate import generate_tokens
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.serve.app import ServeOptions, create_app

GREEDY = SamplingParams(temperature=0.0)
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return qwen_mlx.load(tiny_checkpoint("qwen3"))


@pytest.fixture(scope="module")
def server(llm):
    with running(create_app(llm, ServeOptions("tiny-qwen3"))) as url:
        yield url


@pytest.fixture(scope="module")
def scripted(llm):
    """A server whose model says what `forward.script` holds (token ids through the real tokenizer)."""
    forward = ScriptedForward([], llm.config.vocab_size)
    with running(create_app(llm, ServeOptions("scripted"), forward=forward)) as url:
        yield url, forward


def clients(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused"), anthropic.Anthropic(base_url=url, api_key="unused")


def test_models_list_names_the_served_model(server):
    client, _ = clients(server)
    assert [m.id for m in client.models.list()] == ["tiny-qwen3"]


def test_greedy_chat_equals_llm_generate_plain_and_streamed(llm, server):
    reference = llm.generate(QUESTION, sampling=GREEDY, max_tokens=12)
    prompt = llm.prompt_tokens(QUESTION)
    client, _ = clients(server)
    reply = client.chat.completions.create(model="tiny-qwen3", messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == reference.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12

    stream = client.chat.completions.create(model="tiny-qwen3", messages=QUESTION, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 12)
    # the second identical prompt came from the prefix cache: all but its last token
    assert usage.prompt_tokens_details.cached_tokens == len(prompt) - 1


def test_max_completion_tokens_and_logprobs(llm, server):
    client, _ = clients(server)
    reply = client.chat.completions.create(model="tiny-qwen3", messages=QUESTION, temperature=0,
                                           max_completion_tokens=4, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4 and reply.usage.completion_tokens == 4
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:  # greedy: the chosen token is the most likely one, logprobs sorted, all <= 0
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0 and len(values) == 3
    bare = client.chat.completions.create(model="tiny-qwen3", messages=QUESTION, temperature=0, max_tokens=2,
                                          logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], []]


def test_greedy_messages_equal_llm_generate_plain_and_streamed(llm, server):
    reference = llm.generate(QUESTION, sampling=GREEDY, max_tokens=10, think=False)
    prompt = llm.prompt_tokens(QUESTION, think=False)
    _, client = clients(server)
    message = client.messages.create(model="tiny-qwen3", max_tokens=10, messages=QUESTION,
                                     extra_body={"temperature": 0})
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == reference.text
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(prompt)
    assert message.usage.output_tokens == 10
    with client.messages.stream(model="tiny-qwen3", max_tokens=10, messages=QUESTION,
                                extra_body={"temperature": 0}) as stream:
        assert stream.get_final_text() == reference.text
        assert stream.get_final_message().usage.output_tokens == 10


def test_completions_continue_raw_text(llm, server):
    tokens = llm.tokenizer.encode("The sky is")
    expected = llm.tokenizer.decode(list(generate_tokens(llm.model, tokens, llm.new_cache(), max_tokens=6)))
    client, _ = clients(server)
    reply = client.completions.create(model="tiny-qwen3", prompt="The sky is", temperature=0, max_tokens=6)
    assert reply.choices[0].text == expected
    streamed = client.completions.create(model="tiny-qwen3", prompt="The sky is", temperature=0, max_tokens=6,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_json_schema_response_validates_from_random_weights(server):
    client, anthropic_client = clients(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}  # random weights would think to max_tokens
    reply = client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "A person?"}],
                                           response_format=fmt, max_tokens=200, seed=3, temperature=1.0,
                                           extra_body=no_thinking)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    reply = client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "JSON!"}],
                                           response_format={"type": "json_object"}, max_tokens=200, temperature=0,
                                           extra_body=no_thinking)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    message = anthropic_client.messages.create(model="tiny-qwen3", max_tokens=200, messages=QUESTION,
                                               output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
                                               extra_body={"temperature": 0})
    jsonschema.validate(json.loads(message.content[0].text), SCHEMA)


def script(llm, forward, text: str, think: str | None = None) -> None:
    tok = llm.tokenizer
    ids = [tok.think_id, *tok.encode(think), tok.think_end_id] if think is not None else []
    forward.script = ids + tok.encode(text) + [tok.token_id("<|im_end|>")]


def test_thinking_arrives_as_reasoning_content_and_thinking_blocks(llm, scripted):
    url, forward = scripted
    script(llm, forward, "\n\nRed, orange and yellow.", think="The user wants colours.")
    client, anthropic_client = clients(url)
    reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0)
    assert reply.choices[0].message.reasoning_content == "The user wants colours."
    assert reply.choices[0].message.content == "\n\nRed, orange and yellow."
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="x", messages=QUESTION, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants colours."
    assert "".join(d.content or "" for d in deltas) == "\n\nRed, orange and yellow."

    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = anthropic_client.messages.create(model="x", max_tokens=100, messages=QUESTION, thinking=thinking,
                                               extra_body={"temperature": 0})
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "The user wants colours."
    assert message.content[1].text == "\n\nRed, orange and yellow."
    assert message.stop_reason == "end_turn"
    with anthropic_client.messages.stream(model="x", max_tokens=100, messages=QUESTION, thinking=thinking,
                                               extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == \
        [("thinking", "The user wants colours."), ("text", "\n\nRed, orange and yellow.")]


CALLS = {
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
    "qwen3.5": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
               "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
}


@pytest.mark.parametrize("form", sorted(CALLS))
def test_tool_calls_parsed_plain_and_streamed_in_both_apis(llm, scripted, form):
    url, forward = scripted
    script(llm, forward, "Let me look.\n" + CALLS[form])
    client, anthropic_client = clients(url)
    ask = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    reply = client.chat.completions.create(model="x", messages=ask, tools=WEATHER, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.\n"
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 3})

    chunks = list(client.chat.completions.create(model="x", messages=ask, tools=WEATHER, temperature=0, stream=True))
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == \
        [("get_weather", {"city": "Paris", "days": 3})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me look.\n"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": WEATHER[0]["function"]["parameters"]}]
    message = anthropic_client.messages.create(model="x", max_tokens=200, messages=ask, tools=tools,
                                               extra_body={"temperature": 0})
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == \
        [("text", None), ("tool_use", {"city": "Paris", "days": 3})]
    with anthropic_client.messages.stream(model="x", max_tokens=200, messages=ask, tools=tools,
                                               extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris", "days": 3}]

    # The call goes back to the model with its result, rendered by the checkpoint's template.
    script(llm, forward, "It is sunny.")
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    assert client.chat.completions.create(model="x", messages=history, tools=WEATHER, temperature=0).choices[0].message.content \
        == "It is sunny."


def test_malformed_tool_call_comes_back_as_text(llm, scripted):
    url, forward = scripted
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    script(llm, forward, broken)
    client, anthropic_client = clients(url)
    ask = [{"role": "user", "content": "Weather?"}]
    reply = client.chat.completions.create(model="x", messages=ask, tools=WEATHER, temperature=0)
    assert reply.choices[0].message.content == broken and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="x", messages=ask, tools=WEATHER, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == broken
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    message = anthropic_client.messages.create(model="x", max_tokens=100, messages=ask, tools=tools,
                                               extra_body={"temperature": 0})
    assert [(b.type, b.text) for b in message.content] == [("text", broken)]


def test_stop_strings_end_the_answer_in_both_apis(llm, server):
    client, anthropic_client = clients(server)
    for think, ask in ((True, client), (False, anthropic_client)):
        reference = llm.generate(QUESTION, sampling=GREEDY, max_tokens=12, think=think).text
        stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
        expected = reference[: reference.find(stop)]
        if ask is client:
            reply = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=12,
                                                   stop=[stop])
            assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
        else:
            message = anthropic_client.messages.create(model="x", max_tokens=12, messages=QUESTION,
                                                       stop_sequences=[stop], extra_body={"temperature": 0})
            assert (message.content[0].text, message.stop_reason, message.stop_sequence) == \
                (expected, "stop_sequence", stop)


def test_a_seed_makes_sampling_reproducible_alongside_other_requests(server):
    client, _ = clients(server)

    def sample(seed):
        return client.chat.completions.create(model="x", messages=QUESTION, temperature=1.0, top_p=1.0, seed=seed,
                                              max_tokens=8, extra_body={"top_k": 0}).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # decoded in one batch: each sequence keeps its own random key
        first, other, again, _ = pool.map(sample, [7, 8, 7, 9])
    assert first == again and first != other


class Favourite(ScriptedForward):
    """Every step prefers script[0] (logit 3) to script[1] (logit 2): only a repetition penalty ever picks the
    second."""

    def decode(self, tokens, caches):
        first, second = self.script
        row = mx.zeros((self.vocab_size,)).at[first].add(3.0).at[second].add(2.0)
        for (cache,) in caches:
            cache.offset += 1
        return mx.stack([row] * len(caches))


def test_a_repetition_penalty_sees_each_sequences_own_history(llm):
    again, more = llm.tokenizer.encode(" again")[0], llm.tokenizer.encode(" more")[0]
    forward = Favourite([again, more], llm.config.vocab_size)
    with running(create_app(llm, ServeOptions("x"), forward=forward)) as url:
        client, _ = clients(url)

        def ask(penalty):
            return client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=4,
                                                  extra_body={"repetition_penalty": penalty}).choices[0].message.content

        with ThreadPoolExecutor(2) as pool:
            plain, penalized = pool.map(ask, [1.0, 5.0])
    assert plain == " again" * 4
    # " again" seen: 3 / 5 < 2, so " more"; then both seen: 0.6 > 0.4, " again" again
    assert penalized == " again more again again"
