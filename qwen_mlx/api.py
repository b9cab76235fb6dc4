"""The public Python API: load a model, generate, stream, chat.

    llm = qwen_mlx.load("Qwen/Qwen3-4B")
    reply = llm.generate("Why is the sky blue?", think=False)
    for event in llm.stream([{"role": "user", "content": "hi"}]):
        print(event.kind, event.text)
    chat = llm.chat(system="You are terse.")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.cache.prefix import common_prefix
from qwen_mlx.engine.chat import ChatSession
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.engine.prompt_file import OpenedCache, open_prompt_cache
from qwen_mlx.engine.sampling import SamplingParams, make_sampler
from qwen_mlx.engine.speculative import MAX_DRAFT, DraftLength, DraftModel, MTPDraft, speculative_tokens
from qwen_mlx.engine.stream import Event, Reply, check_context, collect, stream_reply
from qwen_mlx.engine.tokenizer import Tokenizer
from qwen_mlx.errors import UserError
from qwen_mlx.models.qwen3 import Cache, Model
from qwen_mlx.weights.loader import check_memory, load_config, load_model, resolve
from qwen_mlx.weights.memory import MemoryPlan

Prompt = str | list[dict]


class LLM:
    """A loaded model with its tokenizer."""

    def __init__(self, model: Model, tokenizer: Tokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.draft: DraftModel | MTPDraft | None = None  # see speculate()
        self.draft_length = DraftLength()

    def speculate(self, draft: LLM | None, *, tokens: int | None = None, mtp: bool = False) -> None:
        """Decode speculatively from now on: `draft` (a smaller model with the same vocabulary) proposes tokens,
        or with `mtp` the checkpoint's own multi-token-prediction head does (Qwen3.5, Qwen3-Next: load it with
        mtp=True), and this model checks them, several per forward pass; the output is exactly what plain decoding
        gives (token for token when greedy, the same distribution when sampling). `tokens` fixes how many are
        drafted per step (1..8); by default that adapts to the measured acceptance, down to none when drafting
        does not pay. None (and no mtp) turns speculation off."""
        if tokens is not None and not 1 <= tokens <= MAX_DRAFT:
            raise UserError(f"--draft-tokens must be between 1 and {MAX_DRAFT}: got {tokens}")
        if mtp and draft is not None:
            raise UserError("--mtp and --draft-model are two ways to draft tokens: give one of them")
        if mtp:
            if "mtp" not in self.model:
                raise UserError(f"{self.path}: the model was loaded without its MTP head (load it with mtp=True, "
                                "or pass --mtp)")
            self.draft = MTPDraft(self.model)
            self.draft_length = DraftLength(fixed=tokens)
            return
        if draft is None:
            self.draft = None
            return
        if not self.tokenizer.same_vocabulary(draft.tokenizer):
            raise UserError(f"the draft model {draft.path} has another vocabulary than {self.path}: a draft must "
                            "use the same tokenizer (e.g. Qwen3-0.6B for Qwen3-8B)")
        self.draft = DraftModel(draft.model)
        self.draft_length = DraftLength(fixed=tokens)

    @property
    def config(self):
        return self.model.config

    def prompt_tokens(self, prompt: Prompt, *, think: bool = True, system: str | None = None) -> list[int]:
        """The token ids the chat template renders for a message list (a string is one user message); text in
        user, system and tool messages is plain text, never control tokens."""
        return self.tokenizer.encode_chat(_messages(prompt, system), enable_thinking=think)

    def sampling(self, think: bool, **overrides) -> SamplingParams:
        """The checkpoint's recommended sampling for thinking or non-thinking turns, with overrides."""
        return SamplingParams.for_checkpoint(self.path, thinking=think, **overrides)

    def stream(self, prompt: Prompt, *, think: bool = True, system: str | None = None, max_tokens: int = 1024,
               sampling: SamplingParams | None = None, stop: threading.Event | None = None,
               stop_strings: tuple[str, ...] = (), max_kv_size: int | None = None,
               kv_bits: int | None = None, kv_group_size: int | None = None,
               prompt_cache: str | Path | None = None) -> Iterator[Event]:
        """Stream a reply: thinking and answer text as it is decoded, then a "done" event with the stats.
        `max_kv_size` bounds the KV cache (a rotating window), `kv_bits` quantizes it (see cache.make_cache).
        `prompt_cache` names a file that keeps, across runs, the cache of the prompt up to its last message's text
        (a long system prompt is prefilled once): see engine.prompt_file."""
        tokens = self.prompt_tokens(prompt, think=think, system=system)

        def fresh():
            return self.new_cache(max_size=max_kv_size, bits=kv_bits, group_size=kv_group_size)

        opened = OpenedCache(fresh(), 0, 0, 0.0)
        check_context(tokens, self.config, opened.caches)
        if prompt_cache is not None:
            messages = _messages(prompt, system)
            without_last = self.tokenizer.encode_chat([*messages[:-1], {**messages[-1], "content": ""}],
                                                      enable_thinking=think)
            reusable = min(common_prefix(without_last, tokens), len(tokens) - 1)
            opened = open_prompt_cache(prompt_cache, self.model, tokens, reusable, fresh)
        counted = False
        for event in stream_reply(self, tokens, opened.caches, tokens[opened.held:], sampling or self.sampling(think),
                                  max_tokens=max_tokens, stop=stop, stop_strings=stop_strings):
            if not counted:  # the prompt's stats are final once a first event comes: add what was run to save
                s, counted = event.stats, True
                s.prompt_tokens, s.prompt_seconds = s.prompt_tokens + opened.ran, s.prompt_seconds + opened.seconds
                s.time_to_first_token += opened.seconds
            yield event

    def new_cache(self, **options) -> list[Cache]:
        """An empty KV cache for this model (options as cache.make_cache: max_size, bits, group_size)."""
        return make_cache(self.config, **options)

    def generate_tokens(self, new_tokens: list[int], cache: list[Cache], sampling: SamplingParams, *,
                        max_tokens: int, stats: GenerationStats, stop: threading.Event | None,
                        context: list[int] = ()) -> Iterator[int]:
        """The token ids after `new_tokens`, `cache` holding `context` (see generate.generate_tokens, or
        speculative.speculative_tokens with a draft); the one step a distributed model (distributed.DistributedLLM)
        does differently."""
        if self.draft is not None:
            return speculative_tokens(self.model, self.draft, new_tokens, cache, sampling, context=list(context),
                                      max_tokens=max_tokens, length=self.draft_length, stats=stats, stop=stop)
        return generate_tokens(self.model, new_tokens, cache, sampler=make_sampler(sampling), max_tokens=max_tokens,
                               stats=stats, stop=stop)

    def generate(self, prompt: Prompt, **kwargs) -> Reply:
        """The whole reply at once; takes the same arguments as `stream`."""
        return collect(self.stream(prompt, **kwargs))

    def chat(self, *, system: str | None = None, think: bool = True, max_kv_size: int | None = None,
             kv_bits: int | None = None, kv_group_size: int | None = None, sampling: SamplingParams | None = None):
        """A multi-turn conversation that keeps its KV cache between turns (see engine.chat.ChatSession)."""
        return ChatSession(self, system=system, think=think, max_kv_size=max_kv_size, kv_bits=kv_bits,
                           kv_group_size=kv_group_size, sampling=sampling)


def _messages(prompt: Prompt, system: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [{"role": "system", "content": system}, *messages] if system is not None else messages


def load(path_or_repo: str | Path, *, dtype: mx.Dtype | None = None, memory: MemoryPlan | None = None,
         draft: str | Path | None = None, draft_tokens: int | None = None, mtp: bool = False) -> LLM:
    """Load a checkpoint directory or hub id (downloaded once into the Hugging Face cache). With `memory` (the KV
    cache a run will need), a model that would not fit the GPU's recommended working set beside its draft model or
    MTP head is refused before any weight of either is read (see weights/memory.py). With `draft`, a smaller
    checkpoint of the same vocabulary drafts for it; with `mtp`, the checkpoint's own MTP head does (see
    LLM.speculate)."""
    if draft_tokens is not None and not 1 <= draft_tokens <= MAX_DRAFT:
        raise UserError(f"--draft-tokens must be between 1 and {MAX_DRAFT}: got {draft_tokens}")
    if mtp and draft is not None:
        raise UserError("--mtp and --draft-model are two ways to draft tokens: give one of them")
    path = resolve(path_or_repo)
    draft_path = resolve(draft) if draft is not None else None
    tokenizer = Tokenizer.from_dir(path, vocab_size=load_config(path).vocab_size)  # before any weight is read
    if memory is not None:  # the whole run: the model with its draft model or MTP head
        check_memory(path, memory, dtype=dtype, mtp=mtp, draft=draft_path)
    model, path = load_model(path, dtype=dtype, mtp=mtp)
    llm = LLM(model, tokenizer, path)
    if draft_path is not None:
        llm.speculate(load(draft_path, dtype=dtype), tokens=draft_tokens)
    elif mtp:
        llm.speculate(None, tokens=draft_tokens, mtp=True)
    return llm
