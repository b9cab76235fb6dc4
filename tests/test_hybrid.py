"""The hybrid Gated DeltaNet models (qwen3_5, qwen3_5_moe, qwen3_next) against transformers and mlx-lm, the
chunked delta rule against the recurrence, the recurrent cache, chat reuse and the CLI, on tiny checkpoints that
transformers itself wrote (make_tiny_checkpoint.HYBRID_VARIANTS: non-default layer orders, 2x value heads with
other head dims, partial rotary 0.5, stacked and per-expert experts, both rope spellings, tied and untied heads, a
dense layer among MoE ones).

fp32 logits: max abs diff <= 1e-4 (measured 1.7e-5 .. 3.5e-5, logits spanning about +-11 .. +-25).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import common_prefix, greedy_mlx_lm, greedy_ours, greedy_transformers, prompt_ids

import qwen_mlx
from qwen_mlx.cache.kv import KVCache, RotatingKVCache, make_cache
from qwen_mlx.cache.recurrent import RecurrentCache
from qwen_mlx.engine.sampling import SamplingParams
from qwen_mlx.models.config import ConfigError, ModelConfig
from qwen_mlx.models.qwen3_5 import chunked_delta_rule, delta_rule_step, l2_normalize
from qwen_mlx.weights.loader import load_model

VARIANTS = ["qwen3_5", "qwen3_5_default", "qwen3_5_moe", "qwen3_5_moe_default", "qwen3_next"]
MLX_LM = ["qwen3_5_default", "qwen3_5_moe_default", "qwen3_next"]  # mlx-lm assumes full_attention_interval
GREEDY = SamplingParams(temperature=0.0)


def hf_model(path):
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(hybrid_checkpoint):
    loaded = {}

    def get(variant):
        if variant not in loaded:
            loaded[variant] = load_model(hybrid_checkpoint(variant))[0]
        return loaded[variant]

    return get


# ------------------------------------------------------------------------------------------ against the oracles


@pytest.mark.slow  # about 20 s each on a shared CPU: transformers' own greedy decode is most of it
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_logits_and_greedy_tokens_equal_transformers(hybrid_checkpoint, models, variant):
    path = hybrid_checkpoint(variant)
    model, hf = models(variant), hf_model(path)
    ids = prompt_ids(100)  # more than one chunk of 64
    ours = np.array(model(mx.array(ids)[None])[0])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    assert ours.shape == ref.shape == (100, model.config.vocab_size) and model.config.vocab_size != 151936
    assert np.abs(ref).max() > 8  # spread-out logits, so the bound below means something
    assert np.abs(ours - ref).max() <= 1e-4
    tokens = greedy_ours(model, ids[:20], 32)
    assert len(set(tokens)) > 8  # not a degenerate repetition
    assert tokens == greedy_transformers(hf, ids[:20], 32)


@pytest.mark.parametrize("variant", MLX_LM)
def test_greedy_tokens_equal_mlx_lm(hybrid_checkpoint, models, variant):
    ids = prompt_ids(20, seed=3)
    assert greedy_ours(models(variant), ids, 32) == greedy_mlx_lm(hybrid_checkpoint(variant), ids, 32)


def test_what_the_variants_vary(hybrid_checkpoint, models):
    """The checkpoints really differ from the released pattern where the docstring says they do."""
    cfg = {v: models(v).config for v in VARIANTS}
    assert cfg["qwen3_5"].layer_types[:2] == ("linear_attention", "full_attention")
    assert cfg["qwen3_5_default"].layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert all(c.linear_num_value_heads == 2 * c.linear_num_key_heads for c in cfg.values())
    assert all(c.linear_key_head_dim != c.linear_value_head_dim and c.partial_rotary_factor == 0.5
               for c in cfg.values())
    assert cfg["qwen3_5"].tie_word_embeddings and not cfg["qwen3_next"].tie_word_embeddings
    assert cfg["qwen3_next"].mlp_only_layers == (1,) and not cfg["qwen3_next"].is_moe_layer(1)
    raw = {v: json.loads((hybrid_checkpoint(v) / "config.json").read_text()) for v in VARIANTS}
    assert "text_config" in raw["qwen3_5"] and "rope_parameters" in raw["qwen3_5"]["text_config"]
    assert "rope_parameters" not in raw["qwen3_next"] and raw["qwen3_next"]["partial_rotary_factor"] == 0.5
    from safetensors import safe_open

    with safe_open(hybrid_checkpoint("qwen3_5_moe_default") / "model.safetensors", "np") as f:
        stacked = [k for k in f.keys() if k.endswith("mlp.experts.gate_up_proj")]
        assert stacked and f.get_slice(stacked[0]).get_shape() == [8, 64, 64]  # (E, 2I, H)
    with safe_open(hybrid_checkpoint("qwen3_5_moe") / "model.safetensors", "np") as f:
        assert any(".mlp.experts.7.down_proj.weight" in k for k in f.keys())


# ---------------------------------------------------------------------------------------- the delta rule itself


def delta_rule_float64(q, k, v, g, beta, state):
    """The recurrence in NumPy float64, written from the definition (independent of the code under test)."""
    q, k, v, g, beta, S = (np.array(t, dtype=np.float64) for t in (q, k, v, g, beta, state))
    rep = v.shape[2] // k.shape[2]
    q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    ys = []
    for t in range(q.shape[1]):
        S = S * np.exp(g[:, t])[..., None, None]
        delta = beta[:, t][..., None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + np.einsum("bhk,bhv->bhkv", k[:, t], delta)
        ys.append(np.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return np.stack(ys, axis=1), S


@pytest.mark.parametrize("L", [1, 37, 64, 150])
@pytest.mark.parametrize("parallel_keys", [False, True])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("decay", [0.1, 5.0])  # 5: decays past e^-87 within a chunk (decay_factor's, flush's zeros)
def test_chunked_delta_rule_equals_the_recurrence(L, parallel_keys, chunk, decay):
    rng = np.random.default_rng(L)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 16, 24
    k = rng.standard_normal((B, L, Hk, Dk))
    if parallel_keys:  # nearly parallel keys: where a naive inverse of the chunk's system loses all precision
        k = 0.3 * k + 3 * rng.standard_normal((1, 1, Hk, Dk))
    q = l2_normalize(mx.array(rng.standard_normal((B, L, Hk, Dk)), mx.float32)) * Dk**-0.5
    k = l2_normalize(mx.array(k, mx.float32))
    v = mx.array(rng.standard_normal((B, L, Hv, Dv)), mx.float32)
    g = mx.array(-np.exp(rng.standard_normal((B, L, Hv))) * decay, mx.float32)
    beta = mx.array(1 / (1 + np.exp(-3 * rng.standard_normal((B, L, Hv)))), mx.float32)
    state = mx.array(rng.standard_normal((B, Hv, Dk, Dv)), mx.float32)
    y_ref, s_ref = delta_rule_float64(q, k, v, g, beta, state)
    y, s = chunked_delta_rule(q, k, v, g, beta, state, chunk)
    assert np.abs(np.array(y) - y_ref).max() <= 1e-4 and np.abs(np.array(s) - s_ref).max() <= 1e-4
    step_state, ys = state, []
    for t in range(L):
        y_t, step_state = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], step_state)
        ys.append(y_t)
    assert np.abs(np.array(mx.stack(ys, axis=1)) - y_ref).max() <= 1e-4
    assert np.abs(np.array(step_state) - s_ref).max() <= 1e-4


@pytest.mark.slow  # 530 one-token steps: about 30 s on the shared CPU, 5 s alone
def test_prompt_in_chunks_of_1_7_64_512_gives_the_same_logits(models):
    model = models("qwen3_5")
    ids = mx.array(prompt_ids(530, seed=5))
    rows = mx.array([*range(0, 530, 11), 529])  # the logits of these positions (all 530 would take 20 s here)
    full = np.array(model.head(model.model(ids[None], None)[:, rows])[0])
    for chunk in (1, 7, 64, 512):
        cache, pieces = make_cache(model.config), []
        for s in range(0, ids.size, chunk):
            pieces.append(model.model(ids[None, s : s + chunk], cache))
            mx.eval(pieces[-1], [c.state for c in cache])  # step by step, as generation runs
        got = np.array(model.head(mx.concatenate(pieces, axis=1)[:, rows])[0])
        assert np.abs(got - full).max() <= 1e-4, chunk
        assert all(c.offset == ids.size for c in cache)


def test_decode_after_prefill_equals_one_full_pass(models):
    model = models("qwen3_5_moe")
    ids = mx.array(prompt_ids(90, seed=6))
    full = np.array(model(ids[None])[0])
    cache = make_cache(model.config)
    model(ids[None, :80], cache)
    steps = np.array(mx.concatenate([model(ids[None, t : t + 1], cache)[0] for t in range(80, 90)]))
    assert np.abs(steps - full[80:]).max() <= 1e-4


# --------------------------------------------------------------------------------------------- the recurrent cache


def test_make_cache_builds_each_layer_its_kind(models):
    cfg = models("qwen3_5").config  # linear, full, linear, linear
    kinds = [type(c) for c in make_cache(cfg)]
    assert kinds == [RecurrentCache, KVCache, RecurrentCache, RecurrentCache]
    rotating = make_cache(cfg, max_size=64, bits=8)
    assert [type(c) for c in rotating] == [RecurrentCache, RotatingKVCache, RecurrentCache, RecurrentCache]


def test_recurrent_trim_needs_a_snapshot_and_then_is_exact(models):
    model = models("qwen3_5")
    ids = mx.array(prompt_ids(60, seed=7))
    cache = make_cache(model.config)
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.want_snapshot(40)
    model(ids[None, :40], cache)
    expected = np.array(model(ids[None, 40:50], cache)[0])  # what the 10 tokens after position 40 give
    assert cache[0].trim(3) == 0 and cache[0].offset == 50  # no snapshot at 47: refused, nothing changed
    assert all(c.trim(10) == 10 for c in cache)  # the snapshot at 40
    assert np.abs(np.array(model(ids[None, 40:50], cache)[0]) - expected).max() == 0
    assert cache[0].trim(50) == 50 and cache[0].offset == 0 and cache[0].state == []  # back to the start


def test_snapshots_are_bounded():
    cache = RecurrentCache(max_snapshots=2)
    for position in range(1, 6):
        cache.advance(mx.zeros((1, 3, 4)), mx.full((1, 1, 2, 2), position, mx.float32), 1)
        cache.snapshot()
    assert cache.restore_points == [0, 4, 5]
    assert cache.trim(2) == 0 and cache.trim(1) == 1 and cache.recurrent_state[0, 0, 0, 0].item() == 4


# ---------------------------------------------------------------------------------------------------- chat, CLI

# Modelled on Qwen3's template, as Qwen3.5's behaves: the generation prompt opens the think block, and an
# assistant turn before the last question is rendered without its reasoning.
QWEN3_5_STYLE_TEMPLATE = """\
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}\
{% endfor %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
{%- set reasoning = message.content.split('</think>')[0].split('<think>')[-1].strip('\\n') \
if '</think>' in message.content else '' %}
{%- if loop.index0 > ns.last_query %}\
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{% endif %}
{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}\
{%- if enable_thinking is defined and enable_thinking is false %}{{- '\\n</think>\\n\\n' }}{% endif %}{% endif %}
"""


@pytest.fixture(scope="module")
def llm(hybrid_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5_template") / "model"
    shutil.copytree(hybrid_checkpoint("qwen3_5"), path)
    (path / "chat_template.jinja").write_text(QWEN3_5_STYLE_TEMPLATE)
    return qwen_mlx.load(path)


@pytest.mark.parametrize("think", [True, False])
def test_chat_turn_two_prefills_exactly_the_new_tokens_and_equals_a_fresh_session(llm, think):
    chat = llm.chat(think=think, sampling=GREEDY)
    list(chat.send("first question", max_tokens=12))
    held = chat._cached
    prompt1 = llm.prompt_tokens(chat.messages[:1], think=think)
    if think:  # all of the reply is reasoning, which the next rendering drops: the two part inside turn 1
        assert chat.messages[-1]["content"].startswith("<think>")
    reply2 = "".join(e.text for e in chat.send("second question", max_tokens=8))
    prompt2 = llm.prompt_tokens(chat.messages[:-1], think=think)
    parted = common_prefix(held, prompt2)
    if think:
        assert parted < len(prompt1)  # inside turn 1's generation prompt (after <|im_start|>assistant\n)
    assert chat.last_prefill == len(prompt2) - parted  # restored exactly where the renderings part
    fresh = llm.chat(think=think, sampling=GREEDY)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("second question", max_tokens=8)) == reply2
    assert fresh._cached == chat._cached and fresh.last_prefill == len(prompt2)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_and_info_through_the_cli(hybrid_checkpoint):
    path = str(hybrid_checkpoint("qwen3_5_moe_default"))
    run = cli("generate", "-m", path, "--prompt", "hi", "--max-tokens", "6", "--temp", "0", "--no-think")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    info = cli("info", "-m", path)
    assert info.returncode == 0, info.stderr
    assert "vision tower present, not used" in info.stdout and "linear attention" in info.stdout


def test_chat_turns_on_different_threads_equal_turns_on_one(llm):
    """MLX evaluates a lazy array only on the thread that built it; the chat app runs each turn on a new worker
    thread, so a turn must leave nothing lazy in the caches (a recurrent layer's conv tail was)."""
    import threading

    def converse(threaded: bool) -> list[dict]:
        chat, failures = llm.chat(think=True, sampling=GREEDY), []
        for text in ["hi", "and again", "once more"]:
            def turn(text=text):
                try:
                    list(chat.send(text, max_tokens=6))
                except Exception as e:  # noqa: BLE001 - reported below
                    failures.append(e)
            if threaded:
                worker = threading.Thread(target=turn)
                worker.start()
                worker.join()
            else:
                turn()
        assert not failures, failures
        return chat.messages

    assert converse(threaded=True) == converse(threaded=False)


def test_chat_app_runs_two_turns_on_a_hybrid_model(llm):
    import asyncio

    from test_tui import send, wait_until

    from tui.app import ChatApp
    from tui.engine import ModelEngine

    async def run():
        engine = ModelEngine(llm, max_tokens=6)
        app = ChatApp(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "hi")
            await wait_until(pilot, lambda: not app.generating and len(engine.messages()) == 2, timeout=60)
            await send(pilot, "and again")
            try:
                await wait_until(pilot, lambda: not app.generating and len(engine.messages()) == 4, timeout=60)
            except AssertionError:
                summaries = [str(s.content) for s in app.query(".summary")]
                raise AssertionError(f"turn 2 not done: generating={app.generating} "
                                     f"messages={engine.messages()} summaries={summaries}") from None
        return engine

    engine = asyncio.run(run())
    assert len(engine.messages()) == 4


# ----------------------------------------------------------------------------------------------------- loading


def test_vision_tower_and_mtp_tensors_are_not_read(hybrid_checkpoint, tmp_path):
    """An image-text checkpoint whose vision tower and MTP head hold tensors qwen-mlx could never load (int64)
    still loads: they are left out before anything is read."""
    from safetensors.numpy import save_file

    path = tmp_path / "model"
    shutil.copytree(hybrid_checkpoint("qwen3_5"), path)
    save_file({"model.visual.blocks.9.attn.qkv.weight": np.zeros((3, 3), np.int64),
               "mtp.fc.weight": np.zeros((2, 2), np.int64)}, str(path / "extra.safetensors"))
    model, _ = load_model(path)
    ids = mx.array(prompt_ids(8))[None]
    reference, _ = load_model(hybrid_checkpoint("qwen3_5"))
    assert np.array_equal(np.array(model(ids)), np.array(reference(ids)))


BASE = {"model_type": "qwen3_next", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 80, "vocab_size": 100, "rope_theta": 1e4,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 24, "linear_conv_kernel_dim": 4}


def test_config_layer_types_default_and_validation():
    cfg = ModelConfig.from_dict(BASE)
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",) and cfg.partial_rotary_factor == 0.25
    assert ModelConfig.from_dict({**BASE, "full_attention_interval": 2}).layer_types[1] == "full_attention"
    nested = ModelConfig.from_dict({"model_type": "qwen3_5", "tie_word_embeddings": True,
                                    "text_config": {**BASE, "model_type": "qwen3_5_text"}})
    assert nested.model_type == "qwen3_5" and nested.tie_word_embeddings
    for bad, words in [({"layer_types": ["full_attention"]}, "layer_types"),
                       ({"linear_num_value_heads": 3}, "multiple of linear_num_key_heads"),
                       ({"linear_conv_kernel_dim": 1}, "at least 2"),
                       ({"partial_rotary_factor": 0.3}, "partial_rotary_factor"),
                       ({"linear_key_head_dim": None}, "linear_key_head_dim")]:
        with pytest.raises(ConfigError, match=words):
            ModelConfig.from_dict({**BASE, **bad})
