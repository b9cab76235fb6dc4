"""The server in a thread on an ephemeral loopback port, and a scripted model for replies chosen by the test."""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager

import mlx.core as mx


@contextmanager
def running(app):
    """Serve `app` with uvicorn on 127.0.0.1, port chosen by the OS; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ScriptCache:
    """Stands in for one sequence's caches: a position and how many scripted tokens it has produced."""

    def __init__(self):
        self.offset, self.produced, self.nbytes, self.state = 0, 0, 0, []

    def copy(self):  # a copy starts another sequence (the prefix cache's): its reply starts from the top
        new = copy.copy(self)
        new.produced = 0
        return new

    def trim(self, n: int) -> int:
        self.offset -= n
        return n


class ScriptedForward:
    """A Forward (serve.scheduler) whose every sequence's reply is the same token ids: logits one-hot on the next
    scripted token. Prefills are counted per call, for the prefix-cache test."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script, self.vocab_size = script, vocab_size
        self.prefills: list[int] = []

    def new_cache(self) -> list:
        return [ScriptCache()]

    def prefill(self, tokens: list[int], cache: list) -> None:
        self.prefills.append(len(tokens))
        cache[0].offset += len(tokens)

    def decode(self, tokens: list[int], caches: list[list]) -> mx.array:
        rows = []
        for (cache,) in caches:
            token = self.script[min(cache.produced, len(self.script) - 1)]
            cache.produced += 1
            cache.offset += 1
            rows.append(mx.zeros((self.vocab_size,)).at[token].add(30.0))
        return mx.stack(rows)
