"""The prefix cache: longest shared prefix, trimmed copies independent of the entry, LRU eviction by bytes."""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.cache.kv import KVCache, RotatingKVCache
from qwen_mlx.cache.prefix import PrefixCache


def filled(tokens: list[int], cache=None) -> list:
    """One layer's cache holding len(tokens) positions whose keys encode the token ids (so contents are checkable)."""
    cache = cache or KVCache()
    k = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1) * mx.ones((1, 1, 1, 4))
    cache.append(k, k)
    return [cache]


def held(caches) -> list[int]:
    keys = caches[0].state[0][..., : caches[0].offset, 0]
    return [int(x) for x in keys.reshape(-1).tolist()]


def test_lookup_gives_the_longest_shared_prefix_as_an_independent_copy():
    prefix = PrefixCache(1 << 30)
    prefix.store([1, 2, 3, 4], filled([1, 2, 3, 4]))
    prefix.store([1, 2, 9], filled([1, 2, 9]))
    n, caches = prefix.lookup([1, 2, 3, 7, 8])
    assert n == 3 and held(caches) == [1, 2, 3]
    caches[0].append(*[mx.full((1, 1, 1, 4), 7.0)] * 2)  # the copy grows; the entry does not change
    assert held(caches) == [1, 2, 3, 7]
    assert held(prefix.lookup([1, 2, 3, 4, 5])[1]) == [1, 2, 3, 4]
    assert prefix.lookup([5, 6]) == (0, None)


def test_least_recently_used_entries_go_first_past_the_byte_bound():
    one = filled([1, 2])[0].nbytes
    prefix = PrefixCache(2 * one)
    prefix.store([1, 2], filled([1, 2]))
    prefix.store([3, 4], filled([3, 4]))
    prefix.lookup([1, 2, 5])  # [1, 2] is now the most recently used
    prefix.store([5, 6], filled([5, 6]))
    assert len(prefix) == 2 and prefix.nbytes <= 2 * one
    assert prefix.lookup([3, 4])[0] == 0 and prefix.lookup([1, 2])[0] == 2
    PrefixCache(0).store([1, 2], filled([1, 2]))  # a zero bound keeps nothing (and does not fail)


def test_a_rotating_cache_that_cannot_forget_exactly_is_not_reused():
    prefix = PrefixCache(1 << 30)
    tokens = list(range(1, 41))
    prefix.store(tokens, filled(tokens, RotatingKVCache(16, keep=2, slack=2)))
    assert prefix.lookup(tokens[:5] + [99]) == (0, None)  # 35 tokens to forget from a 16-token window
    assert prefix.lookup(tokens + [99])[0] == 40  # nothing to forget: reusable
