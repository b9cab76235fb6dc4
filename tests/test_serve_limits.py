"""What the server refuses, in each API's error JSON (400, 401, 413, 429), and that nothing it answers or logs
holds a traceback unless --debug."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from serve_fixtures import ScriptedForward, running

import qwen_mlx
from qwen_mlx.cli import main
from qwen_mlx.serve.app import ServeOptions, bind_warning, create_app

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return qwen_mlx.load(tiny_checkpoint("qwen3"))


@pytest.fixture(scope="module")
def server(llm):
    with running(create_app(llm, ServeOptions("tiny", max_body_bytes=4096))) as url:
        yield url


def openai_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error["type"]


def anthropic_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["message"]
    return body["error"]["type"]


@pytest.mark.parametrize("body, field", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": "hi"}), "messages"),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0]"),
    (json.dumps({"messages": HELLO, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"messages": HELLO, "max_tokens": 10**6}), "max_tokens"),  # more than the context of 4096
    (json.dumps({"messages": HELLO, "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": HELLO, "stop": [1]}), "stop"),
    (json.dumps({"messages": HELLO, "response_format": {"type": "yaml"}}), "response_format"),
    (json.dumps({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
     "response_format"),
    (json.dumps({"messages": HELLO, "response_format": {"type": "json_schema",
                                                        "json_schema": {"schema": {"type": "decimal"}}}}),
     "response_format"),  # a schema the grammar engine cannot compile
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0]"),
])
def test_openai_bad_requests_get_400_with_the_field(server, body, field):
    response = httpx.post(server + CHAT, content=body, headers={"content-type": "application/json"})
    assert openai_error(response, 400) == "invalid_request_error"
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("body", [
    {"messages": HELLO},  # max_tokens is required
    {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
    {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    {"max_tokens": 10**6, "messages": HELLO},
    {"max_tokens": 10, "messages": HELLO, "output_config": {"format": {"type": "regex"}}},
])
def test_anthropic_bad_requests_get_400(server, body):
    assert anthropic_error(httpx.post(server + MESSAGES, json=body), 400) == "invalid_request_error"


def test_anthropic_bad_output_schema_names_its_own_field(server):
    body = {"max_tokens": 10, "messages": HELLO, "output_config": {"format": {"type": "json_schema", "schema": 5}}}
    response = httpx.post(server + MESSAGES, json=body)
    assert anthropic_error(response, 400) == "invalid_request_error"
    assert response.json()["error"]["message"] == "output_config.format.schema must be a JSON schema object"


def test_bodies_over_the_limit_get_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 10}
    assert openai_error(httpx.post(server + CHAT, json=big), 413) == "request_too_large"
    assert anthropic_error(httpx.post(server + MESSAGES, json=big), 413) == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert openai_error(httpx.post(server + CHAT, content=chunked()), 413) == "request_too_large"


def test_too_many_messages_get_400(llm):
    with running(create_app(llm, ServeOptions("tiny", max_messages=3))) as url:
        response = httpx.post(url + CHAT, json={"messages": HELLO * 4, "max_tokens": 1})
        assert openai_error(response, 400) == "invalid_request_error"
        assert "1 to 3 messages" in response.json()["error"]["message"]


def test_a_full_queue_gets_429_with_retry_after(llm):
    forward = ScriptedForward([llm.tokenizer.encode(" again")[0]], llm.config.vocab_size)  # never ends by itself
    app = create_app(llm, ServeOptions("tiny", max_batch=1, max_queue=1, retry_after=7), forward=forward)
    body = {"messages": HELLO, "max_tokens": 4000, "stream": True, "temperature": 0}
    with running(app) as url, httpx.Client(base_url=url) as client:
        with client.stream("POST", CHAT, json=body) as first:
            lines = first.iter_lines()  # one iterator: dropping it would close the response
            data = [line for line, _ in zip(lines, range(4)) if line.startswith("data:")]
            assert '"content": " again"' in data[-1]  # decoding: it holds the one place in the batch
            with client.stream("POST", CHAT, json=body) as second:
                assert second.status_code == 200  # waits in the queue's one place
                third = client.post(CHAT, json={**body, "stream": False})
                assert openai_error(third, 429) == "rate_limit_error"
                assert third.headers["retry-after"] == "7"
                fourth = client.post(MESSAGES, json={"max_tokens": 5, "messages": HELLO})
                assert anthropic_error(fourth, 429) == "rate_limit_error"
                assert fourth.headers["retry-after"] == "7"


def test_api_key_is_required_when_set(llm):
    forward = ScriptedForward([llm.tokenizer.token_id("<|im_end|>")], llm.config.vocab_size)
    with running(create_app(llm, ServeOptions("tiny", api_key="s3cret"), forward=forward)) as url:
        body = {"messages": HELLO, "max_tokens": 3}
        assert openai_error(httpx.post(url + CHAT, json=body), 401) == "authentication_error"
        assert openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert anthropic_error(httpx.post(url + MESSAGES, json=body, headers={"x-api-key": "nope"}), 401) == \
            "authentication_error"
        assert httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.post(url + MESSAGES, json=body, headers={"x-api-key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_the_model_field_never_loads_anything(server, tmp_path):
    for name in ["/etc/passwd", "../../other-model", str(tmp_path), "Qwen/Qwen3-235B-A22B"]:
        response = httpx.post(server + CHAT, json={"model": name, "messages": HELLO, "max_tokens": 2})
        assert response.status_code == 200 and response.json()["model"] == "tiny"


class Broken(ScriptedForward):
    def decode(self, tokens, caches):
        raise RuntimeError("simulated device failure")


@pytest.mark.parametrize("debug", [False, True])
def test_no_traceback_in_responses_or_logs_without_debug(llm, caplog, capfd, debug):
    app = create_app(llm, ServeOptions("tiny", debug=debug), forward=Broken([0], llm.config.vocab_size))
    caplog.set_level(logging.INFO)
    with running(app) as url:
        plain = httpx.post(url + CHAT, json={"messages": HELLO, "max_tokens": 3})
        streamed = httpx.post(url + CHAT, json={"messages": HELLO, "max_tokens": 3, "stream": True})
        anthropic_streamed = httpx.post(url + MESSAGES, json={"messages": HELLO, "max_tokens": 3, "stream": True})
        bad = httpx.post(url + CHAT, content=b"{")
    assert openai_error(plain, 500) == "api_error"
    assert '"error"' in streamed.text and "internal server error" in streamed.text
    assert "event: error" in anthropic_streamed.text
    logged = caplog.text + "".join(capfd.readouterr())
    assert "simulated device failure" in logged  # the failure is logged, on one line
    for text in (plain.text, streamed.text, anthropic_streamed.text, bad.text):
        assert "Traceback" not in text and "simulated" not in text
    assert ("Traceback" in logged) == debug


def test_binding_beyond_loopback_without_a_key_warns():
    assert bind_warning("127.0.0.1", None) is None and bind_warning("::1", None) is None
    assert bind_warning("localhost", None) is None and bind_warning("0.0.0.0", "key") is None
    assert "--api-key" in bind_warning("0.0.0.0", None)
    assert "--api-key" in bind_warning("192.168.1.5", None)


def test_cli_refuses_bad_serve_flags_in_one_line(capsys):
    assert main(["serve", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qwen-mlx: error: --max-batch must be at least 1"
