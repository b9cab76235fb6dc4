"""A prefix cache across requests: the KV caches of earlier prompts, keyed by their token ids, so that a new prompt
starting with the same tokens (a shared system prompt, an earlier turn) prefills only what follows.

Entries are snapshots (cache.copy(): MLX arrays are values, so a snapshot shares memory with the live cache until
either writes); the least recently used are dropped once the entries hold more than `max_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list] = OrderedDict()  # token ids -> per-layer caches

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(caches) for caches in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, tokens: Sequence[int], caches: list) -> None:
        """Keep a snapshot of `caches`, which hold exactly `tokens`; evict the least recently used past the bound."""
        if not tokens or _nbytes(caches) > self.max_bytes:
            return
        key = tuple(tokens)
        self._entries[key] = [c.copy() for c in caches]
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list | None]:
        """(n, caches): fresh caches holding the first n of `tokens`, the longest prefix an entry shares with them;
        (0, None) when none shares any (or a cache cannot forget the entry's other tokens exactly)."""
        best, n = None, 0
        for key in self._entries:
            m = common_prefix(key, tokens)
            if m > n:
                best, n = key, m
        if best is None:
            return 0, None
        self._entries.move_to_end(best)
        caches = [c.copy() for c in self._entries[best]]
        for c in caches:
            c.trim(c.offset - n)
        if any(c.offset != n for c in caches):  # a rotating cache past its window cannot forget exactly
            return 0, None
        return n, caches

    def clear(self) -> None:
        self._entries.clear()


def _nbytes(caches: list) -> int:
    return sum(c.nbytes for c in caches)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
