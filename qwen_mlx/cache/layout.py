"""How a cache describes itself to a prompt-cache file (files.py), shared by the KV caches (kv.py) and the
recurrent cache (recurrent.py): a StateLayout says which arrays a valid state holds for given settings, and
`read_settings` reads those settings from a file's JSON, refusing anything but whole numbers in range."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qwen_mlx.cache.store import CacheError

MAX_POSITION = 2**30  # offsets beyond this are not a real cache (and would overflow int32 positions)


@dataclass(frozen=True)
class StateLayout:
    """What a cache's `state` holds for given settings: its arrays in order, name -> (safetensors dtype, or "float"
    for the cache's one float dtype; shape after the batch axis, None on the token axis), and how many tokens the
    token axis holds, (least, most). A cache that stores nothing yet has no arrays at all (allowed when least is 0).
    A layout without a token axis (the recurrent state: fixed size) holds its arrays exactly when least > 0."""

    arrays: dict[str, tuple[str, tuple[int | None, ...]]]
    tokens: tuple[int, int]


def read_settings(meta_state: Mapping, names: tuple[str, ...], nullable: tuple[str, ...] = ()) -> list:
    """The values of `names` in a meta_state that must hold exactly those keys, each a whole number in
    [0, MAX_POSITION] (or None where nullable)."""
    if set(meta_state) != set(names):
        raise CacheError(f"cache settings {sorted(meta_state)}, expected {sorted(names)}")
    values = [meta_state[n] for n in names]
    for name, value in zip(names, values):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (value is None and name in nullable) and not (whole and 0 <= value <= MAX_POSITION):
            raise CacheError(f"cache setting {name} is {value!r}")
    return values
