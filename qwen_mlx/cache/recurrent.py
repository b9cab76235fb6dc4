"""The cache of a linear-attention (Gated DeltaNet) layer: fixed size, whatever the number of tokens seen.

It holds the conv's last width - 1 inputs (B, width - 1, conv_dim) and the delta rule's state (B, Hv, Dk, Dv)
float32, and sits in the same per-layer list as the full-attention layers' KV caches (cache.kv.make_cache). Its
`offset` counts the tokens seen, like theirs.

A state cannot forget its last tokens, so going back needs a copy taken earlier: a snapshot, kept at chosen
positions (at most `max_snapshots`, the oldest dropped first). `trim(n)` goes back exactly n tokens when a
snapshot is held at offset - n (or n = offset: the empty state), and otherwise refuses (returns 0). A chat turn
asks for a snapshot where its generation prompt begins (`keep_snapshots`), so that the next turn, whose template
may drop this turn's reasoning, restores the state where the two renderings part and prefills only the rest.
The layer splits its input at every position wanted (`cuts`), so a snapshot lands exactly there.

Speculative decoding asks for passing snapshots (`keep_snapshots(..., passing=True)`): one per position of a
verify forward, so that any accepted prefix can be restored. They are held apart from the kept ones (they never
evict a chat's) and live for one round: `forget_passing` drops them once the round's trim is done.

A prompt-cache file (files.py) holds the conv tail, the state and the offset, bit-exactly; not the snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import mlx.core as mx

from qwen_mlx.cache.layout import StateLayout, read_settings
from qwen_mlx.models.config import ModelConfig

MAX_SNAPSHOTS = 4


class RecurrentCache:
    kind = "recurrent"  # the cache's name in a prompt-cache file

    def __init__(self, max_snapshots: int = MAX_SNAPSHOTS):
        self.offset = 0
        self.conv_tail: mx.array | None = None  # (B, width - 1, conv_dim)
        self.recurrent_state: mx.array | None = None  # (B, Hv, Dk, Dv) float32
        self.max_snapshots = max_snapshots
        self._snapshots: dict[int, tuple[mx.array, mx.array]] = {}  # position -> (conv_tail, state), oldest first
        self._wanted: set[int] = set()  # positions not reached yet at which to take a snapshot
        self._passing: dict[int, tuple[mx.array, mx.array]] = {}  # a speculative round's snapshots, by position
        self._passing_wanted: set[int] = set()

    def advance(self, conv_tail: mx.array, recurrent_state: mx.array, n: int) -> None:
        """The layer ran n more tokens; these are its conv tail and state now."""
        self.conv_tail, self.recurrent_state = conv_tail, recurrent_state
        self.offset += n
        if self.offset in self._wanted:
            self._wanted.discard(self.offset)
            self.snapshot()
        if self.offset in self._passing_wanted:
            self._passing_wanted.discard(self.offset)
            self._passing[self.offset] = (conv_tail, recurrent_state)

    def snapshot(self) -> None:
        """Keep the present conv tail and state, for a later trim back to this position."""
        if self.recurrent_state is None:
            return  # position 0: the empty state needs no copy
        self._snapshots.pop(self.offset, None)
        self._snapshots[self.offset] = (self.conv_tail, self.recurrent_state)  # arrays are immutable: no copy
        while len(self._snapshots) > self.max_snapshots:
            del self._snapshots[next(iter(self._snapshots))]

    def want_snapshot(self, position: int, *, passing: bool = False) -> None:
        """Take a snapshot when the cache reaches `position` (now, if it is there); a passing one lives until
        `forget_passing`."""
        if position == self.offset and not passing:
            self.snapshot()
        elif position > self.offset:
            (self._passing_wanted if passing else self._wanted).add(position)

    def forget_passing(self) -> None:
        """Drop the passing snapshots (taken or still wanted): the speculative round they served is over."""
        self._passing, self._passing_wanted = {}, set()

    def cuts(self, n: int) -> list[int]:
        """Where, among the next n tokens, the layer must stop for a snapshot: sorted counts of tokens in 1..n-1
        (the end, n, is reached anyway)."""
        return sorted({p - self.offset for p in self._wanted | self._passing_wanted if 0 < p - self.offset < n})

    @property
    def restore_points(self) -> list[int]:
        """The positions this cache can go back (or stay) to: 0, the snapshots and the present offset."""
        held = {*self._snapshots, *self._passing}
        return sorted({0, self.offset, *(p for p in held if p <= self.offset)})

    def trim(self, n: int) -> int:
        """Go back n tokens if a snapshot allows it exactly; returns n, or 0 (nothing changed) when it does not:
        the state then cannot forget those tokens, so re-run the text from an earlier restore point."""
        n = max(0, min(n, self.offset))
        target = self.offset - n
        if n == 0 or target not in self.restore_points:
            return 0
        if target == 0:
            self.conv_tail = self.recurrent_state = None
        else:
            self.conv_tail, self.recurrent_state = self._snapshots.get(target) or self._passing[target]
        self._snapshots = {p: s for p, s in self._snapshots.items() if p <= target}
        self._passing = {p: s for p, s in self._passing.items() if p <= target}
        self._wanted = {p for p in self._wanted if p > target}
        self._passing_wanted = {p for p in self._passing_wanted if p > target}
        self.offset = target
        return n

    @property
    def state(self) -> list[mx.array]:
        """The arrays that hold what the cache has seen (what to evaluate after a prefill chunk)."""
        return [a for a in (self.conv_tail, self.recurrent_state) if a is not None]

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset}

    @classmethod
    def state_layout(cls, meta_state: Mapping, cfg: ModelConfig) -> StateLayout:
        """The state a RecurrentCache after meta_state["offset"] tokens holds for a linear layer of `cfg`: nothing
        at offset 0, else the conv tail (width - 1, conv_dim) in the model's float dtype and the state (Hv, Dk, Dv)
        float32. Raises CacheError on invalid settings."""
        (offset,) = read_settings(meta_state, ("offset",))
        conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
            cfg.linear_num_value_heads * cfg.linear_value_head_dim
        state = (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        return StateLayout({"conv_tail": ("float", (cfg.linear_conv_kernel_dim - 1, conv_dim)),
                            "recurrent_state": ("F32", state)}, (offset, offset))

    @classmethod
    def from_state(cls, state: Sequence[mx.array], meta_state: Mapping) -> RecurrentCache:
        """A cache holding `state` ([conv_tail, recurrent_state], or [] when empty) after meta_state["offset"]
        tokens (the inverse of `state` and `meta_state`), with no snapshots: a file does not keep them, so a loaded
        cache can go back only to 0 (re-run the text) until it takes new ones."""
        cache = cls()
        if state:
            cache.conv_tail, cache.recurrent_state = state
        cache.offset = meta_state["offset"]
        return cache

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.held_arrays())

    def held_arrays(self) -> list[mx.array]:
        """The state and every snapshot's arrays."""
        return [*self.state, *(a for pair in [*self._snapshots.values(), *self._passing.values()] for a in pair)]


def settle(caches: Iterable) -> None:
    """Evaluate every array the caches hold, a recurrent layer's snapshots included. MLX evaluates a lazy array
    only on the thread that built it (0.32: "There is no Stream(cpu, N) in current thread"), and a cache outlives
    the generation that filled it (a chat's next turn may run on another worker thread): a generation settles its
    caches before it returns. What a step left lazy is the side branches its output did not need (a recurrent
    layer's conv tail, a snapshot)."""
    mx.eval([a for c in caches for a in (c.held_arrays() if isinstance(c, RecurrentCache) else c.state)])


def keep_snapshots(caches: Iterable, positions: Iterable[int], *, passing: bool = False) -> None:
    """Ask every recurrent cache of the list for a snapshot at each position (KV caches need none); passing ones
    last until `forget_passing`."""
    positions = list(positions)
    for cache in caches:
        if isinstance(cache, RecurrentCache):
            for p in positions:
                cache.want_snapshot(p, passing=passing)


def forget_passing(caches: Iterable) -> None:
    """Drop every recurrent cache's passing snapshots (the end of a speculative round)."""
    for cache in caches:
        if isinstance(cache, RecurrentCache):
            cache.forget_passing()


def restore_point(caches: Sequence, position: int) -> int:
    """The latest position <= `position` to which every recurrent cache of the list can be trimmed (KV caches
    can go back anywhere they still hold; their own limits are theirs to report when trimmed)."""
    points = None
    for cache in caches:
        if isinstance(cache, RecurrentCache):
            mine = set(cache.restore_points)
            points = mine if points is None else points & mine
    if points is None:
        return position
    return max(p for p in points if p <= position)
