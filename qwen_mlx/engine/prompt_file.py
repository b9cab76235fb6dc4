"""A prompt cache kept in a file across runs (`LLM.stream(..., prompt_cache=FILE)`, `generate --prompt-cache`).

The file holds the caches of a prompt's reusable part: everything before the last message's text (the system prompt
and earlier turns, which the next run with the same system prompt renders alike). A run loads the file (checked
against the model: cache.files.load_cache), keeps the longest prefix it shares with the new prompt that every layer
can go back to, runs the rest of the reusable part and saves that (atomically), then prefills only the last
message and what follows. A hybrid model's recurrent layers hold no snapshots in a file: from a file they can
only be continued, so a file whose tokens are not a prefix of the new prompt is started over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from qwen_mlx.cache.files import load_cache, save_cache
from qwen_mlx.cache.prefix import common_prefix
from qwen_mlx.cache.recurrent import restore_point
from qwen_mlx.engine.generate import fill
from qwen_mlx.errors import UserError
from qwen_mlx.models.qwen3 import Cache, Model

CHUNK = 512  # tokens run at a time into the cache that is saved


@dataclass
class OpenedCache:
    caches: list[Cache]
    held: int  # the prompt's tokens the caches hold
    ran: int  # of those, the tokens run now (to save them), and how long that took
    seconds: float


def open_prompt_cache(path: str | Path, model: Model, prompt: list[int], reusable: int,
                      fresh: Callable[[], list[Cache]]) -> OpenedCache:
    """The caches to run `prompt` with and how many of its tokens they hold, the first `reusable` of them saved
    to `path` on the way (when the file held fewer). `fresh()` makes empty caches with the run's settings: the
    file's must have the same ones."""
    path = Path(path)
    cache, held = fresh(), 0
    if path.exists():
        saved = load_cache(path, model=model)
        if _settings(saved.caches) != _settings(cache):
            raise UserError(f"{path}: this prompt cache was saved with other KV cache settings (--max-kv-size, "
                            "--kv-bits, --kv-group-size): pass the same ones, or use another file")
        common = restore_point(saved.caches, min(common_prefix(saved.tokens, prompt), len(prompt) - 1))
        back = saved.caches[0].offset - common
        if saved.tokens and all(c.trim(back) == back for c in saved.caches):
            cache, held = saved.caches, common
    start = time.perf_counter()
    if reusable <= held:
        return OpenedCache(cache, held, 0, 0.0)
    for a in range(held, reusable, CHUNK):
        mx.eval(fill(model, mx.array(prompt[a : min(reusable, a + CHUNK)]), cache))
    seconds = time.perf_counter() - start
    save_cache(path, cache, model=model, tokens=prompt[:reusable])
    return OpenedCache(cache, reusable, reusable - held, seconds)


def _settings(caches: list[Cache]) -> list[tuple]:
    """Each layer's cache kind and settings, without its position."""
    return [(type(c), sorted((k, v) for k, v in c.meta_state.items() if k not in ("offset", "lo"))) for c in caches]
