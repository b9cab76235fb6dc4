"""The ASGI app: routes, limits, authentication and errors in each API's own JSON.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model this server holds
    POST /v1/chat/completions    OpenAI chat (streaming by server-sent events)
    POST /v1/completions         OpenAI text completion
    POST /v1/messages            Anthropic Messages (streaming events)

The model is the one the server was started with: a request's `model` is echoed, never loaded. Any failure that is
not the request's fault is logged on one line (the traceback only with --debug) and answered with a plain 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_mlx.errors import one_line
from qwen_mlx.serve import anthropic, openai
from qwen_mlx.serve.job import ApiError, Runner
from qwen_mlx.serve.scheduler import Forward, ModelForward, QueueFull, Scheduler

log = logging.getLogger("qwen_mlx.serve")


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting for a place in the batch; more get 429
    prompt_cache_bytes: int = 1 << 30  # the prefix cache's bound
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_messages: int = 2048
    retry_after: int = 1  # seconds, the 429's Retry-After
    debug: bool = False  # log tracebacks


def create_app(llm, options: ServeOptions, forward: Forward | None = None) -> Starlette:
    """The app over a loaded model (api.LLM); `forward` replaces the model's forward (tests script it)."""
    scheduler = Scheduler(forward or ModelForward(llm), llm.tokenizer, max_batch=options.max_batch,
                          max_queue=options.max_queue, prefix_cache_bytes=options.prompt_cache_bytes)
    scheduler.on_error = lambda e: _log_failure("a decode step failed", e, options.debug)
    # Each reply in flight holds a thread while it waits for its next token: room for all of them.
    threads = anyio.CapacityLimiter(options.max_batch + options.max_queue + 4)
    runner = Runner(scheduler, llm.tokenizer, Path(llm.path) / "tokenizer.json", llm.config.vocab_size, threads)
    context = llm.config.max_position_embeddings

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    def submit(job):
        try:
            return runner.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many requests are waiting", "rate_limit_error",
                           headers={"Retry-After": str(options.retry_after)}) from None

    async def chat(request: Request, body: dict) -> Response:
        job = await anyio.to_thread.run_sync(lambda: openai.parse_chat(
            llm, body, max_messages=options.max_messages, context=context))
        seq = await anyio.to_thread.run_sync(submit, job)  # a grammar takes a moment to build
        pieces = runner.pieces(job, seq)
        if job.stream:
            return _sse(openai.chat_stream(pieces, options.model_name, llm.tokenizer, job), openai, options)
        return JSONResponse(await _unless_gone(request, seq, openai.chat_response(
            pieces, options.model_name, llm.tokenizer, job.top_logprobs is not None)))

    async def completions(request: Request, body: dict) -> Response:
        job = await anyio.to_thread.run_sync(lambda: openai.parse_completion(llm, body, context=context))
        seq = await anyio.to_thread.run_sync(submit, job)  # a grammar takes a moment to build
        pieces = runner.pieces(job, seq)
        if job.stream:
            return _sse(openai.completion_stream(pieces, options.model_name, job), openai, options)
        return JSONResponse(await _unless_gone(request, seq, openai.completion_response(pieces, options.model_name)))

    async def messages(request: Request, body: dict) -> Response:
        job = await anyio.to_thread.run_sync(lambda: anthropic.parse_messages(
            llm, body, max_messages=options.max_messages, context=context))
        seq = await anyio.to_thread.run_sync(submit, job)  # a grammar takes a moment to build
        pieces = runner.pieces(job, seq, id_prefix="toolu_")
        if job.stream:
            return _sse(anthropic.message_stream(pieces, options.model_name, len(job.prompt)), anthropic, options)
        return JSONResponse(await _unless_gone(request, seq, anthropic.message_response(pieces, options.model_name)))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                                         "owned_by": "qwen-mlx"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    post = lambda path, handler, api: Route(path, _endpoint(handler, api, options), methods=["POST"])
    routes = [Route("/health", health), Route("/v1/models", _guarded(models, openai, options)),
              post("/v1/chat/completions", chat, openai), post("/v1/completions", completions, openai),
              post("/v1/messages", messages, anthropic)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.scheduler = scheduler
    return app


def _endpoint(handler: Callable, api, options: ServeOptions) -> Callable:
    """A POST route: authenticated, body bounded and parsed as a JSON object, errors in the API's JSON."""

    async def read(request: Request) -> Response:
        return await handler(request, await _json_body(request, options.max_body_bytes))

    return _guarded(read, api, options)


def _guarded(handler: Callable, api, options: ServeOptions) -> Callable:
    async def endpoint(request: Request) -> Response:
        try:
            _authenticate(request, options.api_key)
            return await handler(request)
        except ApiError as e:
            return JSONResponse(api.error_body(e), status_code=e.status, headers=e.headers)
        except Exception as e:
            _log_failure(f"{request.method} {request.url.path} failed", e, options.debug)
            error = ApiError(500, "internal server error", "api_error")
            return JSONResponse(api.error_body(error), status_code=500)

    return endpoint


def _authenticate(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key") or ""
    bearer = request.headers.get("authorization") or ""
    if bearer[:7].lower() == "bearer ":
        given = given or bearer[7:].strip()
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key", "authentication_error")


async def _json_body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _unless_gone(request: Request, seq, reply):
    """Await a whole (non-streamed) reply, cancelling its sequence if the client disconnects meanwhile (a streamed
    reply learns it from the response itself)."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        seq.stop.set()

    watcher = asyncio.ensure_future(watch())
    try:
        return await reply
    finally:
        watcher.cancel()


def _sse(chunks: AsyncIterator[str], api, options: ServeOptions) -> StreamingResponse:
    """A stream of server-sent events; a failure after the first event ends it with an error event."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            _log_failure("a streamed reply failed", e, options.debug)
            body = api.error_body(ApiError(500, "internal server error", "api_error"))
            yield anthropic.event("error", body) if api is anthropic else openai.sse(body)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)


def _log_failure(what: str, e: BaseException, debug: bool) -> None:
    if debug:
        log.error("%s", what, exc_info=e)
    else:
        log.error("%s: %s: %s (run with --debug for the traceback)", what, type(e).__name__, one_line(e))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening beyond this machine without a key; None when there is nothing to warn about."""
    if is_loopback(host) or api_key:
        return None
    return f"serving on {host} without --api-key: anyone who can reach this port can use the model"


def serve(llm, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(llm, options), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
