"""Speculative decoding: greedy output unchanged token for token, sampling exactly the target's distribution,
every cache back to exactly the accepted tokens after a rejection."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import slow_except
from mlx.utils import tree_map

from qwen_mlx.cache.kv import KVCache, QuantizedKVCache, RotatingKVCache, make_cache
from qwen_mlx.cache.recurrent import RecurrentCache, forget_passing, keep_snapshots
from qwen_mlx.engine import speculative
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.engine.sampling import SamplingParams, probabilities
from qwen_mlx.engine.speculative import DraftLength, DraftModel, speculative_tokens, verify
from qwen_mlx.models.build import build_model
from qwen_mlx.models.config import ModelConfig
from qwen_mlx.models.qwen3 import Model

VOCAB = 384
N_TOKENS = 64


def tiny_model(seed: int, *, layers: int = 2, moe: bool = False, vocab: int = VOCAB, spread: float = 4,
               head_dim: int = 32) -> Model:
    raw = dict(model_type="qwen3_moe" if moe else "qwen3", hidden_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, intermediate_size=128,
               vocab_size=vocab, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
               tie_word_embeddings=seed % 2 == 0, attention_bias=False)
    if moe:
        raw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(raw))
    # Larger weights than the init's: logits spread enough that greedy runs vary (not one token repeated).
    model.update(tree_map(lambda p: p * spread, model.parameters()))
    mx.eval(model.parameters())
    return model


def tiny_hybrid(seed: int, *, moe: bool = False, spread: float = 4, mtp: bool = False) -> Model:
    """A tiny Qwen3.5 (MoE) of the test vocabulary: linear, full, linear, linear attention (`mtp`: with an MTP
    head)."""
    raw = dict(model_type="qwen3_5_moe" if moe else "qwen3_5", hidden_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96, vocab_size=VOCAB,
               rms_norm_eps=1e-6, rope_theta=10000.0, partial_rotary_factor=0.5, max_position_embeddings=4096,
               tie_word_embeddings=seed % 2 == 0, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
               layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
    if moe:
        raw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    mx.random.seed(seed)
    model = build_model(ModelConfig.from_dict(raw), mtp=mtp)
    model.update(tree_map(lambda p: p * spread, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def targets():
    return {"dense": tiny_model(1), "moe": tiny_model(3, moe=True), "hybrid": tiny_hybrid(7),
            "hybrid-moe": tiny_hybrid(8, moe=True)}


PROMPT = [5, 17, 42, 99, 7, 250, 3]


def plain_greedy(model: Model, n: int = N_TOKENS, cache=None) -> list[int]:
    return list(generate_tokens(model, PROMPT, cache if cache is not None else make_cache(model.config),
                                max_tokens=n))


class Oracle:
    """Test-only draft: proposes tokens from a script (the target's own greedy run), wrong where `wrong` says."""

    wants_hidden = False

    def __init__(self, script: list[int], wrong=lambda position: False):
        self.script, self.wrong = script, wrong

    def follow(self, cache):
        pass

    def sync(self, tokens):
        self.start = len(tokens) + 1  # sequence length when the first generated token is next

    def propose(self, seen, history, k, params, rng):
        at = len(seen) - self.start  # index into the script of the next token
        out = []
        for j in range(at, at + k):
            token = self.script[j] if j < len(self.script) else 0
            out.append((token + 1) % VOCAB if self.wrong(j) else token)
        return out, None

    def accepted(self, history, hidden):
        pass


def run_speculative(model, draft, k, *, n=N_TOKENS, cache=None, params=SamplingParams()):
    stats = GenerationStats()
    cache = cache if cache is not None else make_cache(model.config)
    out = list(speculative_tokens(model, draft, PROMPT, cache, params, max_tokens=n, length=DraftLength(fixed=k),
                                  stats=stats))
    return out, stats, cache


# Every k for every kind; a hybrid case takes 1-1.5 s, so the default run keeps k = 1 and 4 for those (CI runs all).
@pytest.mark.parametrize("k,kind", [
    (k, kind) if kind in ("dense", "moe") or k in (1, 4) else pytest.param(k, kind, marks=pytest.mark.slow)
    for k in (1, 2, 3, 4, 5, 6) for kind in ("dense", "moe", "hybrid", "hybrid-moe")])
def test_greedy_with_speculation_equals_plain_greedy(targets, kind, k):
    model = targets[kind]
    expected = plain_greedy(model)
    assert len(set(expected)) > 8  # a run that varies, so a wrong token cannot hide
    all_right, stats, _ = run_speculative(model, Oracle(expected), k)
    assert all_right == expected
    assert stats.accepted == stats.drafted  # accepted at every position
    all_wrong, stats, _ = run_speculative(model, Oracle(expected, lambda j: True), k)
    assert all_wrong == expected
    assert stats.accepted == 0 and stats.forwards == N_TOKENS  # rejected at every position
    mixed, stats, _ = run_speculative(model, Oracle(expected, lambda j: j % 3 == 1), k)
    assert mixed == expected
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_a_draft_model_equals_plain_greedy(targets, k):
    model = targets["dense"]
    expected = plain_greedy(model)
    for draft_model in (tiny_model(5, layers=1), model):  # a stranger (mostly rejected), itself (all accepted)
        draft = DraftModel(draft_model)
        got, stats, _ = run_speculative(model, draft, k)
        assert got == expected
    assert stats.accepted == stats.drafted  # the model drafting for itself
    assert stats.tokens_per_forward > 1


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 4, pytest.param(6, marks=pytest.mark.slow)])
def test_greedy_with_a_hybrid_draft_model_for_a_hybrid_target_equals_plain_greedy(targets, k):
    """Both caches recurrent: the target's and the draft's states are restored from the round's snapshots."""
    model = targets["hybrid"]
    expected = plain_greedy(model)
    for draft_model in (tiny_hybrid(9), model):  # a stranger (mostly rejected), itself (all accepted)
        draft = DraftModel(draft_model)
        got, stats, cache = run_speculative(model, draft, k)
        assert got == expected
    assert stats.accepted == stats.drafted and stats.tokens_per_forward > 1
    held = cache[0].offset
    assert all(c.restore_points == [0, held] for c in cache if isinstance(c, RecurrentCache))  # none left behind


def test_tokens_per_forward_is_k_plus_one_when_every_draft_is_right(targets):
    model = targets["dense"]
    expected = plain_greedy(model, 60)
    _, stats, _ = run_speculative(model, Oracle(expected), 4, n=60)
    assert stats.forwards == 12 and stats.tokens_per_forward == 5


CACHE_KINDS = {
    "plain": {},
    "quantized": dict(bits=8, group_size=32),
    "rotating": dict(max_size=48, keep=4),
    "rotating-quantized": dict(max_size=48, keep=4, bits=8, group_size=32),
}


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_after_a_rejection_the_cache_equals_one_that_never_saw_the_rejected_tokens(targets, kind):
    """Run k + 1 tokens through one cache, trim the rejected ones; run only the kept ones through another (in
    the same chunk shape, padded by different tokens that are trimmed too): the next logits are bit-identical, for
    every cache kind, also after the rotating ring has wrapped."""
    model = targets["dense"]
    seq = PROMPT + plain_greedy(model, 70)  # 77 tokens: past the rotating window of 48
    for cut in (56, 70):
        for accepted in range(4):
            rolled = make_cache(model.config, **CACHE_KINDS[kind])
            clean = make_cache(model.config, **CACHE_KINDS[kind])
            context = seq[:cut]
            for cache in (rolled, clean):
                model(mx.array(context[:-1])[None], cache)
            kept = [context[-1], *seq[cut: cut + accepted]]
            model(mx.array(kept + [1, 2, 3, 4][: 4 - accepted])[None], rolled)  # rejected: 1, 2, ...
            model(mx.array(kept + [9, 8, 7, 6][: 4 - accepted])[None], clean)  # other tokens, never kept
            for cache in (rolled, clean):
                assert all(c.trim(4 - accepted) == 4 - accepted for c in cache)
            nxt = mx.array([[seq[cut + accepted]]])
            a, b = model(nxt, rolled), model(nxt, clean)
            assert mx.array_equal(a, b), (kind, cut, accepted)


@pytest.mark.parametrize("kind", ["hybrid", "hybrid-moe"])
def test_after_a_rejection_the_recurrent_state_equals_one_that_never_saw_the_rejected_tokens(targets, kind):
    """As above for a hybrid model: a verify forward over 5 tokens with a passing snapshot at each position, the
    rejected tokens trimmed (the state restored from the snapshot): the next logits are bit-identical to those of
    a cache that ran other tokens there, and no snapshot outlives the round."""
    model = targets[kind]
    seq = PROMPT + plain_greedy(model, 40)
    for cut in (9, 30):
        for accepted in range(5):
            rolled, clean = make_cache(model.config), make_cache(model.config)
            context = seq[:cut]
            for cache in (rolled, clean):
                model(mx.array(context[:-1])[None], cache)
                keep_snapshots(cache, range(cut, cut + 4), passing=True)
            kept = [context[-1], *seq[cut: cut + accepted]]
            model(mx.array(kept + [1, 2, 3, 4][: 4 - accepted])[None], rolled)
            model(mx.array(kept + [9, 8, 7, 6][: 4 - accepted])[None], clean)
            for cache in (rolled, clean):
                if accepted < 4:
                    assert all(c.trim(4 - accepted) == 4 - accepted for c in cache)
                forget_passing(cache)
            assert [c.restore_points for c in rolled if isinstance(c, RecurrentCache)][0] == [0, cut + accepted]
            nxt = mx.array([[seq[cut + accepted]]])
            a, b = model(nxt, rolled), model(nxt, clean)
            assert mx.array_equal(a, b), (kind, cut, accepted)


def test_a_recurrent_state_without_the_round_snapshots_cannot_be_rolled_back(targets):
    """The test above can fail: without passing snapshots the recurrent caches refuse the trim."""
    model = targets["hybrid"]
    cache = make_cache(model.config)
    model(mx.array(PROMPT)[None], cache)
    model(mx.array([1, 2, 3])[None], cache)
    assert [c.trim(2) for c in cache if isinstance(c, RecurrentCache)] == [0, 0, 0]


def test_after_a_rejection_the_cache_matches_a_cache_fed_only_the_accepted_tokens(targets):
    """Speculation end to end (a stranger drafting, mostly rejected), then one more token: the logits equal those
    of a plain cache fed the prompt and the accepted tokens (1e-5: chunk shapes differ, so not bitwise)."""
    model = targets["dense"]
    draft_model = tiny_model(5, layers=1)
    got, _, cache = run_speculative(model, DraftModel(draft_model), 4, n=40)
    held = cache[0].offset
    fresh = make_cache(model.config)
    model(mx.array((PROMPT + got)[:held])[None], fresh)
    nxt = mx.array([[(PROMPT + got)[held]]])
    assert np.abs(np.array(model(nxt, cache)) - np.array(model(nxt, fresh))).max() < 1e-5


def chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test: P(chi2 with len - 1 degrees of freedom >= the statistic)."""
    import torch

    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


SMALL = 12  # a vocabulary small enough that frequencies over 20,000 samples are sharp


@pytest.fixture(scope="module")
def small_distributions():
    """p (the target's) and q (a different model's) next-token logits at the same context, vocabulary 12."""
    target, draft = tiny_model(11, vocab=SMALL, spread=1.5), tiny_model(12, vocab=SMALL, spread=1.5)
    context = mx.array([[1, 5, 3, 7]])
    return target(context)[:, -1], draft(context)[:, -1]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.0, top_k=5)], ids=["t1", "top_p", "top_k"])
def test_speculative_samples_follow_the_target_distribution(small_distributions, params, monkeypatch):
    """20,000 rounds of speculative sampling (the draft's token drawn from q, then verify): the emitted first
    token's frequencies match p exactly (chi-square p > 0.001); the same test rejects a wrong acceptance rule."""
    target_logits, draft_logits = small_distributions
    p = np.asarray(probabilities(target_logits, [], params)[0], dtype=np.float64)
    q = np.asarray(probabilities(draft_logits, [], params)[0], dtype=np.float64)
    assert 0.2 < 0.5 * np.abs(p - q).sum()  # far enough apart that a wrong rule shows

    def frequencies(rule) -> np.ndarray:
        rng = np.random.default_rng(0)
        counts = np.zeros(SMALL)
        for _ in range(20_000):
            x = speculative._draw(q, rng)
            rows = np.stack([p, p])  # the row after the drafted token does not matter for the first token
            counts[rule([x], rows, q[None], rng)[0]] += 1
        return counts

    def chi2_p(counts):
        support = p > 0
        assert counts[~support].sum() == 0  # nothing outside the target's support (top-p / top-k masks)
        return chisquare_pvalue(counts[support], p[support] * counts.sum())

    assert chi2_p(frequencies(verify)) > 0.001

    def accept_whenever_the_target_likes_it_more(drafted, p_rows, q_rows, rng):  # a plausible, wrong rule
        x = drafted[0]
        if p_rows[0, x] >= q_rows[0, x]:
            return [x]
        return [speculative._draw(p_rows[0], rng)]

    assert chi2_p(frequencies(accept_whenever_the_target_likes_it_more)) < 0.001


def test_sampled_speculation_is_reproducible_and_stays_in_the_mask(targets):
    model = targets["dense"]
    draft_model = tiny_model(5, layers=1)
    params = SamplingParams(temperature=0.8, top_k=5, seed=7, repetition_penalty=1.2)
    runs = [run_speculative(model, DraftModel(draft_model), 3, n=24,
                            params=params)[0] for _ in range(2)]
    assert runs[0] == runs[1]


def test_draft_length_turns_itself_off_when_drafting_does_not_pay():
    length = DraftLength()
    for _ in range(40):
        k = length.next()
        # drafting costs as much as the target and nothing is accepted
        length.update(k, 0, 1.0 + k)
    assert length.next() == 0 or length.rounds % 16 == 0
    good = DraftLength()
    for _ in range(40):
        k = good.next()
        good.update(k, k, 1.0 + 0.05 * k)  # cheap drafts, all accepted
    assert good._best() == good.max_k


# ------------------------------------------------------------------------------------- under a window, KV bits


WINDOW = 16  # 4 pinned tokens, a ring of 12 + 8 (the slack) slots
N_WINDOWED = 60  # the sequence reaches 67 positions: the ring wraps three times


def windowed_run(model, draft, prompt: list[int], k: int, n: int, **options):
    """Speculative greedy tokens under the window (and make_cache `options`), the stats, and the draft's memory
    (its caches' nbytes, bytes of the arrays they hold) when the sequence first reaches 2, 3, 4 windows."""
    cache, stats = make_cache(model.config, max_size=WINDOW, **options), GenerationStats()
    got, memory = [], {}
    for token in speculative_tokens(model, draft, prompt, cache, SamplingParams(), max_tokens=n,
                                    length=DraftLength(fixed=k), stats=stats):
        got.append(token)
        for m in (2, 3, 4):
            if m not in memory and len(prompt) + len(got) >= m * WINDOW:
                memory[m] = (sum(c.nbytes for c in draft.cache), sum(a.nbytes for c in draft.cache for a in c.state))
    return got, stats, memory


def assert_holds_what_it_ran(draft, **options):
    """The draft's cache gives the next logits of a cache of its settings that ran the tokens it holds at once."""
    fresh = make_cache(draft.model.config, **options)
    assert draft.cache[0].offset == len(draft.held)
    draft.model(mx.array(draft.held)[None], fresh)
    nxt = mx.array([[1]])
    ours, theirs = np.array(draft.model(nxt, draft.cache)), np.array(draft.model(nxt, fresh))
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.parametrize(("target", "drafter", "bits"), slow_except(
    [("dense", "stranger", None), ("dense", "itself", None), ("dense", "stranger", 8), ("hybrid", "hybrid", None)],
    ("dense", "stranger", None), ("dense", "itself", None), ("dense", "stranger", 8)))
def test_a_draft_model_under_a_window_keeps_flat_memory_and_the_plain_greedy_output(targets, target, drafter, bits):
    """--draft-model --max-kv-size 16 [--kv-bits 8], k = 4: the ring wraps three times; the tokens are plain
    greedy's under the same cache settings; the draft's attention caches are windows of the same size (quantized
    alike) whose memory stops growing once full, and hold what a windowed cache that ran its tokens holds."""
    model = targets[target]
    draft_model = {"stranger": lambda: tiny_model(5, layers=1), "itself": lambda: model,
                   "hybrid": lambda: tiny_hybrid(9)}[drafter]()
    expected = list(generate_tokens(model, PROMPT, make_cache(model.config, max_size=WINDOW, bits=bits),
                                    max_tokens=N_WINDOWED))
    assert len(set(expected)) > 8
    draft = DraftModel(draft_model)
    got, stats, memory = windowed_run(model, draft, PROMPT, 4, N_WINDOWED, bits=bits)
    assert got == expected
    assert memory[2] == memory[3] == memory[4], memory
    attention = [c for c in draft.cache if not isinstance(c, RecurrentCache)]
    assert all(isinstance(c, RotatingKVCache) and (c.max_size, c.bits) == (WINDOW, bits) for c in attention)
    if drafter == "itself":
        assert stats.accepted == stats.drafted and stats.tokens_per_forward > 4
    if bits is None:  # (quantized: the steps' shapes differ, so values a rounding apart may quantize a step apart)
        assert_holds_what_it_ran(draft, max_size=WINDOW)


def test_a_draft_model_starts_over_where_its_window_cannot_go_back(targets):
    """After the ring has wrapped, a new sequence that shares only its first 20 tokens (another prompt, a chat turn
    resumed inside the earlier reply) is further back than the window can trim: the draft starts over (a new
    cache), runs the tokens again, and then holds what a fresh draft holds; the output is plain greedy's."""
    model = targets["dense"]
    draft_model = tiny_model(5, layers=1)
    draft = DraftModel(draft_model)
    first, _, _ = windowed_run(model, draft, PROMPT, 4, 2 * WINDOW)
    before = draft.cache
    prompt = (PROMPT + first)[:20] + [9, 8, 7]
    got, _, _ = windowed_run(model, draft, prompt, 4, 12)
    assert draft.cache is not before  # it started over
    assert got == list(generate_tokens(model, prompt, make_cache(model.config, max_size=WINDOW), max_tokens=12))
    fresh = DraftModel(draft_model)
    windowed_run(model, fresh, prompt, 4, 12)
    assert draft.held == fresh.held
    assert_holds_what_it_ran(draft, max_size=WINDOW)


def test_a_draft_model_quantizes_its_kv_cache_as_the_target_does():
    """--kv-bits 8 with a target of head_dim 64 (KV groups of 64) and a draft of head_dim 32, which 64 does not
    divide: the draft's caches are 8-bit in groups of 32 (what make_cache picks for it); greedy equals plain greedy
    with 8-bit KV."""
    model = tiny_model(11, head_dim=64)
    expected = list(generate_tokens(model, PROMPT, make_cache(model.config, bits=8), max_tokens=N_TOKENS))
    assert len(set(expected)) > 8
    draft = DraftModel(tiny_model(5, layers=1))
    got, _, cache = run_speculative(model, draft, 4, cache=make_cache(model.config, bits=8))
    assert got == expected
    assert all((c.bits, c.group_size) == (8, 64) for c in cache)
    assert all(isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (8, 32) for c in draft.cache)


@pytest.mark.slow
def test_a_draft_model_follows_a_change_of_cache_kind(targets):
    """The same draft for a plain run, a windowed one, a quantized one, then a plain one: its cache follows each
    (a new one each time the settings change) and the output is plain greedy's under the same settings."""
    model = targets["dense"]
    draft = DraftModel(tiny_model(5, layers=1))
    for options, kind in (({}, KVCache), (dict(max_size=WINDOW), RotatingKVCache), (dict(bits=8), QuantizedKVCache),
                          ({}, KVCache)):
        cache = make_cache(model.config, **options)
        got = list(speculative_tokens(model, draft, PROMPT, cache, SamplingParams(), max_tokens=40,
                                      length=DraftLength(fixed=3)))
        assert got == list(generate_tokens(model, PROMPT, make_cache(model.config, **options), max_tokens=40))
        assert all(type(c) is kind for c in draft.cache) and draft.cache[0].offset == len(draft.held)


@pytest.mark.slow
def test_a_windowed_chat_with_a_draft_model_equals_one_without(tiny_checkpoint):
    """Three turns through LLM.chat(max_kv_size=32) with a draft model drafting 4: the ring wraps within each turn
    and each next turn parts from the cache inside the earlier reply; the replies are those without the draft,
    and the draft's caches end as windows as large as the target's."""
    from qwen_mlx.api import load

    target = tiny_checkpoint("qwen3")
    with_draft = load(target, draft=tiny_checkpoint("qwen2"), draft_tokens=4)
    replies = []
    for llm in (with_draft, load(target)):
        chat = llm.chat(max_kv_size=32, sampling=SamplingParams(temperature=0.0))
        replies.append(["".join(e.text for e in chat.send(q, max_tokens=40)) for q in ("one", "two", "three")])
    assert replies[0] == replies[1]
    draft = with_draft.draft
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 32 for c in draft.cache)
    assert sum(c.nbytes for c in draft.cache) == sum(c.nbytes for c in draft.cache[:1]) * len(draft.cache)


@pytest.mark.slow  # 25 s
def test_the_api_speculates_with_a_draft_and_refuses_another_vocabulary(tiny_checkpoint, tmp_path):
    """qwen_mlx.load(..., draft=...) gives the same greedy reply as without; a draft whose tokenizer maps tokens to
    other ids is refused with one line."""
    import json
    import shutil

    import qwen_mlx
    from qwen_mlx.errors import UserError

    target = tiny_checkpoint("qwen3")
    plain = qwen_mlx.load(target).generate("Count to five.", think=False, max_tokens=24,
                                           sampling=SamplingParams())
    llm = qwen_mlx.load(target, draft=tiny_checkpoint("qwen2"), draft_tokens=3)
    fast = llm.generate("Count to five.", think=False, max_tokens=24, sampling=SamplingParams())
    assert fast.text == plain.text and fast.stats.forwards < fast.stats.generated_tokens + 1
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint("qwen2"), other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="another vocabulary"):
        qwen_mlx.load(target, draft=other)


def test_generate_with_a_draft_model_through_the_cli(tiny_checkpoint):
    """`generate --draft-model` prints the same greedy answer as without it and says how speculation went;
    a bad --draft-tokens is refused with one line and exit 2."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "qwen_mlx.cli", "generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "hi",
            "--no-think", "--temp", "0", "--max-tokens", "16"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    fast = subprocess.run([*base, "--draft-model", str(tiny_checkpoint("qwen3")), "--draft-tokens", "3", "-v"],
                          capture_output=True, text=True, timeout=300)
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "speculative: 100% of" in fast.stderr  # the model drafting for itself: every draft accepted
    bad = subprocess.run([*base, "--draft-model", str(tiny_checkpoint("qwen3")), "--draft-tokens", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--draft-tokens" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # the preset's 151,936-token head dominates: minutes on a busy 2-core CPU
def test_bench_draft_oracle_runs_and_reports_k_plus_one_tokens_per_forward(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "spec.json"
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--preset", "qwen3-0.6b", "--layers", "1",
                          "--draft", "oracle", "--draft-tokens", "3", "--prompt-tokens", "8", "--gen-tokens", "9",
                          "--repeats", "1", "--no-mlx-lm", "--json", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    case = json.loads(out.read_text())["cases"][0]
    assert case["tokens_per_forward"] == 3.0 and case["acceptance"] == 1.0  # 9 tokens: 4 + 4 + 1 (the last round
    # drafts none: max_tokens left no room), so 3 forwards
    assert "speculative" in run.stdout and "tokens per target forward" in run.stdout
