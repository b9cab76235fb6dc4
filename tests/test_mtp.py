"""The hybrid models' own MTP head as a draft (models.qwen3_5.MTP, engine.speculative.MTPDraft).

The reference is written from vLLM's Qwen3-Next / Qwen3.5 MTP models (transformers does not run the head), in
torch fp32 with transformers' own modules where they fit (the decoder layer, the zero-centred RMSNorm, the rotary
embedding): for pair i, x = fc([norm_e(embed(token i + 1)) | norm_h(h_i)]) with h_i the target's hidden state
after its final norm, x = layer(x) at position i (causal over the pairs), logits = lm_head(norm(x)); a further
drafted token feeds the head's own output back as h.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import prompt_ids, slow_except
from make_tiny_checkpoint import mtp_layer
from safetensors import safe_open
from test_speculative import tiny_hybrid

from qwen_mlx.cache.kv import KVCache, QuantizedKVCache, RotatingKVCache, make_cache
from qwen_mlx.cache.recurrent import RecurrentCache
from qwen_mlx.engine import speculative
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.engine.speculative import DraftLength, MTPDraft, speculative_tokens
from qwen_mlx.weights.convert import convert
from qwen_mlx.weights.loader import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = ["qwen3_5", "qwen3_5_moe"]  # image-text dense with a tied head; text-only MoE, experts one by one


# ------------------------------------------------------------------------------------------- the torch reference


def hf_model(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, architecture)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def text_model(model):
    return getattr(model.model, "language_model", model.model)


def hf_head(model, tensors: dict[str, torch.Tensor]):
    """The reference MTP head: (layer, norms, fc) as torch modules holding `tensors` (the hub's mtp.* names and
    values: zero-centred norms, experts one by one or stacked)."""
    layer = mtp_layer(model)
    state = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, value in tensors.items():
        if not name.startswith("mtp.layers.0."):
            continue
        name = name.removeprefix("mtp.layers.0.")
        parts = name.split(".")
        if ".experts." in name and parts[-2] in ("gate_proj", "up_proj", "down_proj"):  # experts.{e}.{proj}.weight
            stem = name[: name.index(".experts.") + len(".experts")]
            per_expert.setdefault(stem, {}).setdefault(int(parts[-3]), {})[parts[-2]] = value
        else:
            state[name] = value
    for stem, experts in per_expert.items():
        order = sorted(experts)
        state[f"{stem}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]])
                                                     for e in order])
        state[f"{stem}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    layer.load_state_dict(state, strict=True)
    norm_cls = type(text_model(model).norm)
    hidden = model.config.get_text_config().hidden_size
    eps = model.config.get_text_config().rms_norm_eps
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = norm_cls(hidden, eps=eps)
        norms[name].weight.data = tensors[f"mtp.{name}.weight"].float()
    return layer, norms, tensors["mtp.fc.weight"].float()


def reference_mtp(model, head, embed: torch.Tensor, lm_head: torch.Tensor, tokens: torch.Tensor,
                  hidden: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's MTP step over L pairs at positions start.. (causal among them, nothing before): tokens (L,), hidden
    (L, dim) -> (logits (L, vocab), the head's output h' (L, dim))."""
    layer, norms, fc = head
    L = tokens.shape[0]
    x = torch.cat([norms["pre_fc_norm_embedding"](embed[tokens]), norms["pre_fc_norm_hidden"](hidden)], dim=-1)
    x = torch.nn.functional.linear(x, fc)[None]  # (1, L, dim)
    positions = torch.arange(start, start + L)[None]
    cos_sin = text_model(model).rotary_emb(x, positions)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    out = layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=positions)
    out = norms["norm"](out[0] if isinstance(out, tuple) else out)[0]
    return out @ lm_head.T, out


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


# ------------------------------------------------------------------------------------------------------ ours


def our_mtp(model, tokens: mx.array, hidden: mx.array) -> mx.array:
    """Our MTP head over L pairs at positions 0.. (no cache: causal): tokens (L,), hidden (L, dim) -> logits."""
    embedded = model.model.embed_tokens(tokens[None])
    return model.head(model.mtp(embedded, hidden[None], None))[0]


IDS = prompt_ids(12).tolist()


@pytest.mark.parametrize("variant", [*VARIANTS, pytest.param("qwen3_5_moe_default", marks=pytest.mark.slow),
                                     pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_mtp_logits_equal_the_torch_reference_from_the_hub_layout(hybrid_checkpoint, variant):
    """Also (slow) the hub's stacked experts (qwen3_5_moe_default) and Qwen3-Next's layout."""
    path = hybrid_checkpoint(variant, mtp=True)
    hf = hf_model(path)
    tensors = checkpoint_tensors(path)
    embed = text_model(hf).embed_tokens.weight
    lm_head = embed if hf.config.get_text_config().tie_word_embeddings else hf.lm_head.weight
    ids = torch.tensor(IDS)
    with torch.no_grad():
        h = text_model(hf)(input_ids=ids[None]).last_hidden_state[0]  # after the final norm
        expected, h_next = reference_mtp(hf, hf_head(hf, tensors), embed, lm_head, ids[1:], h[:-1])
        # One more drafted token: the head's own output stands in for the hidden state at the last position.
        d = int(expected[-1].argmax())
        expected_2, _ = reference_mtp(hf, hf_head(hf, tensors), embed, lm_head, torch.tensor([*IDS[1:], d]),
                                      torch.cat([h[:-1], h_next[-1:]]))

    model, _ = load_model(path, mtp=True)
    hidden = model.model(mx.array(IDS)[None], None)[0]
    assert np.abs(np.array(hidden) - h.numpy()).max() <= 1e-4
    got = our_mtp(model, mx.array(IDS[1:]), hidden[:-1])
    assert np.abs(np.array(got) - expected.numpy()).max() <= 1e-4

    # The draft itself: the pairs of the prompt, then two drafted tokens (greedy) from them.
    draft = MTPDraft(model)
    draft.accepted(IDS, hidden[:-1])
    drafted, q = draft.propose(IDS, IDS, 2, SamplingParams(), np.random.default_rng(0))
    assert q is None and drafted == [d, int(expected_2[-1].argmax())]
    assert draft.cache.offset == len(IDS) - 1  # the pair made of the head's own output is dropped again


def dequantized(path: Path) -> dict[str, mx.array]:
    """Every tensor of a converted checkpoint read from its files, quantized ones dequantized, in float32."""
    config = json.loads((path / "config.json").read_text())["quantization"]
    raw = {}
    for file in sorted(path.glob("*.safetensors")):
        raw.update(mx.load(str(file)))
    out = {}
    for name, value in raw.items():
        layer, kind = name.rsplit(".", 1)
        if kind in ("scales", "biases"):
            continue
        if f"{layer}.scales" in raw:
            settings = {**config, **config[layer]} if isinstance(config.get(layer), dict) else config
            value = mx.dequantize(value, raw[f"{layer}.scales"], raw.get(f"{layer}.biases"),
                                  settings["group_size"], settings["bits"])
        out[name] = value.astype(mx.float32)
    return out


def hub_mtp_names(tensors: dict[str, mx.array]) -> dict[str, torch.Tensor]:
    """A converted checkpoint's mtp.* tensors (the model's layout: norms hold 1 + w, experts as switch_mlp stacks)
    back in the hub's names and values."""
    out = {}
    for name, value in tensors.items():
        if not name.startswith("mtp."):
            continue
        value = torch.from_numpy(np.array(value))
        if name.endswith("norm.weight") or name.endswith(("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")):
            value = value - 1.0
        if ".switch_mlp." in name:
            stem, proj = name.split(".switch_mlp.")
            for e in range(value.shape[0]):
                out[f"{stem}.experts.{e}.{proj}"] = value[e]
            continue
        out[name] = value
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_mtp_logits_from_a_quantized_conversion_equal_the_reference_on_its_dequantized_weights(
        hybrid_checkpoint, tmp_path, variant, bits):
    """fp32 on both sides over the same quantized weights (ours quantized matmuls, the reference the dequantized
    floats): max abs diff <= 1e-4."""
    src = hybrid_checkpoint(variant, mtp=True)
    out = tmp_path / "out"
    convert(src, out, bits=bits, progress=False)
    with safe_open(str(out / "mtp.safetensors"), "np") as f:
        names = set(f.keys())
        assert "mtp.fc.scales" in names and f.get_slice("mtp.norm.weight").get_dtype() == "F32"

    model, _ = load_model(out, mtp=True)
    hidden = model.model(mx.array(IDS)[None], None)[0]
    got = our_mtp(model, mx.array(IDS[1:]), hidden[:-1])

    tensors = dequantized(out)
    embed = next(torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    heads = [torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.endswith("lm_head.weight")]
    hf = hf_model(src)  # for its module classes and config only: the weights are the converted ones
    with torch.no_grad():
        expected, _ = reference_mtp(hf, hf_head(hf, hub_mtp_names(tensors)), embed, heads[0] if heads else embed,
                                    torch.tensor(IDS[1:]), torch.from_numpy(np.array(hidden[:-1])))
    assert np.abs(np.array(got) - expected.numpy()).max() <= 1e-4


# ------------------------------------------------------------------------------- greedy output, the cache kept


@pytest.fixture(scope="module")
def mtp_models():
    """Tiny Qwen3.5 and Qwen3.5-MoE with random MTP heads, of test_speculative's small vocabulary (fast)."""
    return {"qwen3_5": tiny_hybrid(7, mtp=True), "qwen3_5_moe": tiny_hybrid(8, moe=True, mtp=True)}


PROMPT = [5, 17, 42, 99, 7, 250, 3]
N_TOKENS = 64


class Agreeing(MTPDraft):
    """The MTP draft with its proposals replaced by the target's own greedy tokens (accepted at every position):
    the head still runs its pairs and trims its cache as always."""

    def __init__(self, model, script: list[int]):
        super().__init__(model)
        self.script = script

    def propose(self, seen, history, k, params, rng):
        drafted, q = super().propose(seen, history, k, params, rng)
        at = len(seen) - len(PROMPT)
        return [self.script[j] if j < len(self.script) else 0 for j in range(at, at + len(drafted))], q


def assert_same_pairs(cache: KVCache, fresh: KVCache) -> None:
    """Equal keys and values, up to float32 rounding (the target's hidden states of a verify pass and of one
    forward over the whole sequence differ in the last bits): 1e-4 of the largest entry."""
    assert cache.offset == fresh.offset
    for a, b in zip(cache.state, fresh.state, strict=True):
        a, b = np.array(a), np.array(b)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def pairs_from_scratch(model, tokens: list[int]) -> KVCache:
    """The MTP cache of a head that saw every pair of `tokens` at once (hidden states from one target forward)."""
    hidden = model.model(mx.array(tokens)[None], None)
    cache = KVCache()
    model.mtp(model.model.embed_tokens(mx.array(tokens[1:])[None]), hidden[:, :-1], cache)
    return cache


@pytest.fixture(scope="module")
def plain(mtp_models):
    """Each model's plain greedy run."""
    return {variant: list(generate_tokens(model, PROMPT, make_cache(model.config), max_tokens=N_TOKENS))
            for variant, model in mtp_models.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, *(pytest.param(k, marks=pytest.mark.slow) for k in (2, 3, 5)), 4, 6])
def test_greedy_with_mtp_equals_plain_greedy(mtp_models, plain, variant, k):
    model, expected = mtp_models[variant], plain[variant]
    assert len(set(expected)) > 8
    for draft, acceptance in ((MTPDraft(model), None), (Agreeing(model, expected), 1.0)):
        stats = GenerationStats()
        cache = make_cache(model.config)
        got = list(speculative_tokens(model, draft, PROMPT, cache, SamplingParams(), max_tokens=N_TOKENS,
                                      length=DraftLength(fixed=k), stats=stats))
        assert got == expected
        if acceptance is not None:
            assert stats.accepted == stats.drafted > 0
        # The head's cache holds exactly the pairs of the target's positions, made from the target's hidden states.
        assert draft.cache.offset == cache[0].offset == len(PROMPT) + N_TOKENS - 1
        assert_same_pairs(draft.cache, pairs_from_scratch(model, PROMPT + got))


def test_random_mtp_head_is_rejected_at_most_positions(mtp_models):
    """With random weights the head rarely agrees with the target: rejection at (nearly) every position."""
    model = mtp_models["qwen3_5"]
    stats = GenerationStats()
    list(speculative_tokens(model, MTPDraft(model), PROMPT, make_cache(model.config), SamplingParams(),
                            max_tokens=32, length=DraftLength(fixed=2), stats=stats))
    assert stats.drafted > 0 and stats.accepted / stats.drafted < 0.2


def test_mtp_sampling_goes_through_verify_with_its_distributions(mtp_models, monkeypatch):
    """Sampling: the head's distributions q go to the one speculative-sampling rule (whose exactness the
    chi-square test in test_speculative checks)."""
    model = mtp_models["qwen3_5_moe"]
    seen = []

    def spy(drafted, p, q, rng):
        seen.append((len(drafted), None if q is None else q.shape))
        return real(drafted, p, q, rng)

    real = speculative.verify
    monkeypatch.setattr(speculative, "verify", spy)
    params = SamplingParams(temperature=1.0, top_k=20, seed=3)
    out = list(speculative_tokens(model, MTPDraft(model), PROMPT, make_cache(model.config), params, max_tokens=12,
                                  length=DraftLength(fixed=3)))
    assert len(out) == 12
    assert seen and all(q == (k, model.config.vocab_size) for k, q in seen if k)


def test_a_chat_turn_resumes_the_heads_pairs(mtp_models):
    """A second turn on the same caches: the head keeps its pairs of the shared prefix and adds the new ones."""
    model = mtp_models["qwen3_5"]
    draft, cache = MTPDraft(model), make_cache(model.config)
    first = list(speculative_tokens(model, draft, PROMPT, cache, SamplingParams(), max_tokens=10,
                                    length=DraftLength(fixed=2)))
    context = PROMPT + first[:-1]  # what the target's cache holds
    second = [11, 22, 33, 44, 55]
    list(speculative_tokens(model, draft, [first[-1], *second], cache, SamplingParams(), context=context,
                            max_tokens=10, length=DraftLength(fixed=2)))
    assert draft.cache.offset == cache[0].offset
    assert_same_pairs(draft.cache, pairs_from_scratch(model, draft.seen))


# ------------------------------------------------------------------------------------- under a window, KV bits


WINDOW = 16  # 4 pinned tokens, a ring of 12 + 8 (the slack) slots
N_WINDOWED = 60  # the sequence reaches 67 positions: the ring wraps three times


def windowed_cache(model, bits: int | None) -> list:
    return make_cache(model.config, max_size=WINDOW, bits=bits)


def last_pair_from_scratch(model, tokens: list[int], bits: int | None) -> mx.array:
    """h' of the last pair of a head that saw every pair of `tokens` at once, under the window (one forward: each
    query gets its own window) with hidden states from one windowed target forward: (1, 1, dim)."""
    hidden = model.model(mx.array(tokens)[None], windowed_cache(model, bits))
    cache = next(c for c in windowed_cache(model, bits) if not isinstance(c, RecurrentCache))
    return model.mtp(model.model.embed_tokens(mx.array(tokens[1:])[None]), hidden[:, :-1], cache)[:, -1:]


def windowed_run(model, draft: MTPDraft, prompt: list[int], bits: int | None, k: int, n: int,
                 context: list[int] = (), cache: list | None = None) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Speculative greedy tokens under the window, and the head's cache's (nbytes, bytes of the arrays it holds)
    when the sequence first reaches 2, 3, 4 windows."""
    cache = windowed_cache(model, bits) if cache is None else cache
    got, memory = [], {}
    for token in speculative_tokens(model, draft, prompt, cache, SamplingParams(), context=list(context),
                                    max_tokens=n, length=DraftLength(fixed=k)):
        got.append(token)
        for m in (2, 3, 4):
            if m not in memory and len(context) + len(prompt) + len(got) >= m * WINDOW:
                memory[m] = (draft.cache.nbytes, sum(a.nbytes for a in draft.cache.state))
    return got, memory


@pytest.mark.parametrize(("variant", "bits", "k"), slow_except(
    [("qwen3_5", None, 6), ("qwen3_5_moe", 8, 3), ("qwen3_5", 8, 3), ("qwen3_5_moe", None, 6)],
    ("qwen3_5", None, 6), ("qwen3_5_moe", 8, 3)))
def test_mtp_under_a_window_keeps_flat_memory_and_the_plain_greedy_output(mtp_models, variant, bits, k):
    """--mtp --max-kv-size 16 [--kv-bits 8]: the ring wraps; the tokens are plain greedy's under the
    same cache settings; the head's cache is a window of the same kind (quantized alike) whose memory stops
    growing once it is full; its last pair's h' is that of a head that ran every pair at once under the window."""
    model = mtp_models[variant]
    expected = list(generate_tokens(model, PROMPT, windowed_cache(model, bits), max_tokens=N_WINDOWED))
    draft = MTPDraft(model)
    got, memory = windowed_run(model, draft, PROMPT, bits, k, N_WINDOWED)
    assert got == expected
    assert memory[2] == memory[3] == memory[4], memory
    assert isinstance(draft.cache, RotatingKVCache) and draft.cache.bits == bits
    assert draft.cache.max_size == WINDOW and draft.cache.offset == len(PROMPT) + N_WINDOWED - 1
    if bits is None:  # (quantized: hidden states a rounding apart may quantize a step apart)
        reference = last_pair_from_scratch(model, PROMPT + got, bits)
        assert np.abs(np.array(draft.last - reference)).max() <= 1e-4 * np.abs(np.array(reference)).max()


def test_mtp_starts_over_where_its_window_cannot_go_back(mtp_models):
    """A second generation on a fresh target cache (another prompt) after the ring has wrapped: the head cannot
    trim back to the start, so it starts over; its pairs are then those of a fresh head, the output plain greedy's."""
    model = mtp_models["qwen3_5"]
    draft = MTPDraft(model)
    windowed_run(model, draft, PROMPT, None, 2, 2 * WINDOW)
    other = [9, 8, 7, 6, 5]
    got, _ = windowed_run(model, draft, other, None, 2, 12)
    assert got == list(generate_tokens(model, other, windowed_cache(model, None), max_tokens=12))
    assert draft.cache.offset == len(other) + 11
    reference = last_pair_from_scratch(model, other + got, None)
    assert np.abs(np.array(draft.last - reference)).max() <= 1e-4 * np.abs(np.array(reference)).max()


def test_many_pairs_run_in_chunks(mtp_models):
    """Pairs handed over in one piece (a prompt, starting over) run CHUNK at a time: the same pairs and h'."""
    model = mtp_models["qwen3_5"]
    tokens = PROMPT + [1, 2, 3, 4, 5]
    hidden = model.model(mx.array(tokens)[None], None)[0, :-1]
    whole, chunked = MTPDraft(model), MTPDraft(model)
    chunked.CHUNK = 3
    for draft in (whole, chunked):
        draft.accepted(tokens, hidden)
    assert_same_pairs(chunked.cache, whole.cache)
    assert np.abs(np.array(chunked.last - whole.last)).max() <= 1e-4 * np.abs(np.array(whole.last)).max()


@pytest.mark.slow
def test_mtp_follows_a_change_of_cache_kind(mtp_models):
    """The same draft for a plain run, then a windowed one, then a quantized one: its cache follows each."""
    model = mtp_models["qwen3_5"]
    draft = MTPDraft(model)
    for options, kind in (({}, KVCache), (dict(max_size=WINDOW), RotatingKVCache), (dict(bits=8), QuantizedKVCache)):
        cache = make_cache(model.config, **options)
        got = list(speculative_tokens(model, draft, PROMPT, cache, SamplingParams(), max_tokens=40,
                                      length=DraftLength(fixed=3)))
        assert got == list(generate_tokens(model, PROMPT, make_cache(model.config, **options), max_tokens=40))
        assert type(draft.cache) is kind and draft.cache.offset == cache[1].offset


@pytest.mark.slow
def test_a_windowed_chat_with_mtp_equals_one_without(hybrid_checkpoint):
    """Three turns through LLM.chat(max_kv_size=32) with the head drafting 4: the ring wraps within each turn and
    each next turn parts from the cache inside the earlier reply; the replies are those without --mtp, and the
    head's cache ends as large as each attention layer's."""
    from qwen_mlx.api import load

    path = hybrid_checkpoint("qwen3_5", mtp=True)
    with_mtp = load(path, mtp=True, draft_tokens=4)
    replies = []
    for llm in (with_mtp, load(path)):
        chat = llm.chat(max_kv_size=32, sampling=SamplingParams(temperature=0.0))
        replies.append(["".join(e.text for e in chat.send(q, max_tokens=40)) for q in ("one", "two", "three")])
    assert replies[0] == replies[1]
    head = with_mtp.draft.cache
    assert isinstance(head, RotatingKVCache) and head.max_size == 32
    assert head.nbytes == next(c for c in chat.cache if not isinstance(c, RecurrentCache)).nbytes


@pytest.mark.slow
def test_cli_generate_with_mtp_under_a_window(hybrid_checkpoint):
    """(main's code raised "a cache could not forget the rejected draft tokens" here: a window of 32 had 4 slack
    slots, fewer than the 6 drafts a round may reject.)"""
    args = ["generate", "--model", str(hybrid_checkpoint("qwen3_5", mtp=True)), "--prompt", "Count to ten.",
            "--max-kv-size", "32", "--max-tokens", "80", "--temp", "0"]
    with_mtp, plain = run_cli(*args, "--mtp", "--draft-tokens", "6"), run_cli(*args)
    assert with_mtp.returncode == plain.returncode == 0, with_mtp.stderr + plain.stderr
    assert with_mtp.stdout == plain.stdout and len(with_mtp.stdout) > 80


# --------------------------------------------------------------------------------------------------- refusals


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_mtp_is_refused_for_a_checkpoint_without_a_head(hybrid_checkpoint):
    r = run_cli("generate", "--model", str(hybrid_checkpoint("qwen3_5")), "--mtp", "--prompt", "hi",
                "--max-tokens", "2")
    assert r.returncode == 2 and "no MTP head" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mtp_is_refused_with_a_draft_model(hybrid_checkpoint):
    path = str(hybrid_checkpoint("qwen3_5", mtp=True))
    r = run_cli("generate", "--model", path, "--mtp", "--draft-model", path, "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 2 and "--mtp" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_pair_whose_hidden_state_is_gone_is_made_of_its_token_alone(mtp_models):
    """A turn that keeps only part of the earlier sequence in the target's cache and goes on with other tokens:
    the pair before the new tokens needs a hidden state the target no longer hands over; it is made with a zero one
    (its token alone), and every other pair is the one a fresh head would hold, at its own position."""
    model = mtp_models["qwen3_5"]
    tokens = PROMPT + [1, 2, 3]
    draft = MTPDraft(model)
    draft.accepted(tokens, model.model(mx.array(tokens)[None], None)[0, :-1])
    assert draft.cache.offset == len(tokens) - 1
    kept = 8  # the target's cache keeps tokens[:8]; then come other tokens
    other = tokens[:kept] + [4, 5]
    hidden = model.model(mx.array(other)[None], None)[0]
    draft.accepted(other, hidden[kept:-1])  # the positions the target's cache gained
    assert draft.cache.offset == len(other) - 1
    fresh = pairs_from_scratch(model, other)
    zero = hidden[:-1] * mx.array([0.0 if i == kept - 1 else 1.0 for i in range(len(other) - 1)])[:, None]
    alone = KVCache()
    model.mtp(model.model.embed_tokens(mx.array(other[1:])[None]), zero[None], alone)
    for ours, theirs, made in zip(draft.cache.state, fresh.state, alone.state, strict=True):
        ours, theirs, made = np.array(ours), np.array(theirs), np.array(made)  # (1, kv_heads, pairs, head_dim)
        others = [i for i in range(len(other) - 1) if i != kept - 1]
        assert np.abs(ours[:, :, others] - theirs[:, :, others]).max() <= 1e-4 * np.abs(theirs).max()
        assert np.abs(ours[:, :, kept - 1] - made[:, :, kept - 1]).max() <= 1e-4 * np.abs(made).max()
        assert np.abs(ours[:, :, kept - 1] - theirs[:, :, kept - 1]).max() > 1e-2


@pytest.mark.slow
def test_the_api_speculates_with_the_mtp_head_and_refuses_without_one(hybrid_checkpoint, tiny_checkpoint):
    from qwen_mlx.api import load
    from qwen_mlx.errors import UserError

    path = hybrid_checkpoint("qwen3_5", mtp=True)
    llm = load(path, mtp=True, draft_tokens=2)
    assert isinstance(llm.draft, MTPDraft) and llm.draft_length.fixed == 2
    plain = load(path)  # the head's tensors are not read
    assert "mtp" not in plain.model
    with pytest.raises(UserError, match="loaded without its MTP head"):
        plain.speculate(None, mtp=True)
    with pytest.raises(UserError, match="two ways"):
        plain.speculate(llm, mtp=True)
    reply = llm.generate("Name three prime numbers.", think=False, max_tokens=12, sampling=SamplingParams())
    assert reply.text == plain.generate("Name three prime numbers.", think=False, max_tokens=12,
                                        sampling=SamplingParams()).text
    assert reply.stats.drafted > 0
    with pytest.raises(UserError, match="no MTP head"):
        load(hybrid_checkpoint("qwen3_5"), mtp=True)
    with pytest.raises(UserError, match="Qwen3.5 or Qwen3-Next"):
        load(tiny_checkpoint("qwen3"), mtp=True)


def test_mtp_names():
    from qwen_mlx.weights.names import model_name

    assert model_name("mtp.fc.weight") is None and model_name("model.mtp.fc.weight") is None
    assert model_name("mtp.fc.weight", mtp=True) == model_name("model.mtp.fc.weight", mtp=True) == "mtp.fc.weight"
    assert model_name("mtp.layers.0.mlp.experts.gate_up_proj", mtp=True) == \
        "mtp.layers.0.mlp.switch_mlp.gate_up_proj.weight"
