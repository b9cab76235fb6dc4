"""The hybrid models' caches in files and in long runs (issue 19): prompt-cache files holding recurrent layers
(conv tail + float32 state) saved and loaded bit-exactly and checked against the model, hostile hybrid files
refused, and a rotating window on the attention layers of a hybrid model at flat memory.

"Bit-identical" below means np.array_equal on float32 logits: the loaded cache holds the same bits as the one that
never left memory, and the same float32 arithmetic runs on it.
"""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import common_prefix, greedy_with_logits, prefill, prompt_ids

from qwen_mlx.cache.files import CacheFileError, load_cache, model_fingerprint, save_cache
from qwen_mlx.cache.kv import KVCache, RotatingKVCache, make_cache
from qwen_mlx.cache.recurrent import RecurrentCache
from qwen_mlx.errors import UserError
from qwen_mlx.weights.loader import load_model

DENSE, MOE = "qwen3_5_default", "qwen3_5_moe"  # the released layer pattern; a non-default order with MoE


@pytest.fixture(scope="module")
def models(hybrid_checkpoint, tiny_checkpoint):
    loaded = {}

    def get(variant):
        if variant not in loaded:
            path = tiny_checkpoint(variant) if variant == "qwen3" else hybrid_checkpoint(variant)
            loaded[variant] = load_model(path)[0]
        return loaded[variant]

    return get


def refused(model, path, match):
    with pytest.raises(CacheFileError, match=match) as e:
        load_cache(path, model=model)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- files: round trip


@pytest.mark.parametrize("variant", [DENSE, MOE])
@pytest.mark.parametrize("window", [None, 24])
def test_hybrid_prompt_cache_round_trip_is_bit_exact(models, tmp_path, variant, window):
    """Prefill 49 tokens (a chunked step, one token, a chunked step; with a window of 24 the ring has wrapped),
    save, load into fresh caches: every array equal bit for bit (the state float32), then 12 greedy tokens with
    their logits identical to those of the caches that never left memory."""
    model = models(variant)
    ids = prompt_ids(50, seed=8)
    caches = make_cache(model.config, max_size=window, keep=4)
    prefill(model, caches, ids[:49], [30, 1, 18])
    kinds = [type(c) for c in caches]
    assert RecurrentCache in kinds and (RotatingKVCache if window else KVCache) in kinds
    path = tmp_path / "hybrid.safetensors"
    save_cache(path, caches, model=model, tokens=ids[:49], metadata={"turn": "1"})
    loaded = load_cache(path, model=model)
    assert loaded.tokens == ids[:49].tolist() and loaded.metadata == {"turn": "1"}
    assert [type(c) for c in loaded.caches] == kinds and all(c.offset == 49 for c in loaded.caches)
    for a, b in zip(caches, loaded.caches):
        if isinstance(a, RecurrentCache):
            assert b.recurrent_state.dtype == mx.float32 and b.conv_tail.shape[1] == 3  # width 4 - 1
            for x, y in [(a.conv_tail, b.conv_tail), (a.recurrent_state, b.recurrent_state)]:
                assert x.dtype == y.dtype and x.shape == y.shape and mx.array_equal(x, y).item()
    mem_tokens, mem_logits = greedy_with_logits(model, ids[49:], 12, caches)
    file_tokens, file_logits = greedy_with_logits(model, ids[49:], 12, loaded.caches)
    assert file_tokens == mem_tokens and np.array_equal(file_logits, mem_logits)
    assert len(set(mem_tokens)) > 3


def test_an_empty_hybrid_cache_saves_and_loads(models, tmp_path):
    model = models(DENSE)
    path = tmp_path / "empty.safetensors"
    save_cache(path, make_cache(model.config), model=model)
    loaded = load_cache(path, model=model)
    assert [type(c) for c in loaded.caches] == [type(c) for c in make_cache(model.config)]
    assert all(c.offset == 0 and c.state == [] for c in loaded.caches)


def test_snapshots_are_not_saved(models, tmp_path):
    """A loaded recurrent cache has no snapshots: it can go back to 0 only (the file says so in its docs)."""
    model = models(DENSE)
    caches = make_cache(model.config)
    for c in caches:
        if isinstance(c, RecurrentCache):
            c.want_snapshot(10)
    prefill(model, caches, prompt_ids(20), [20])
    assert 10 in caches[0].restore_points
    path = tmp_path / "s.safetensors"
    save_cache(path, caches, model=model)
    loaded = load_cache(path, model=model).caches
    assert loaded[0].restore_points == [0, 20] and loaded[0].trim(10) == 0


# ------------------------------------------------------------------------------------- files: refused


@pytest.fixture
def saved_hybrid(models, tmp_path):
    model = models(DENSE)
    caches = make_cache(model.config)
    prefill(model, caches, prompt_ids(20), [20])
    path = tmp_path / "h.safetensors"
    save_cache(path, caches, model=model, tokens=prompt_ids(20))
    return model, path


def read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["qwen_mlx"])
    return header, dict(mx.load(str(path)))


def write(path, header, tensors):
    mx.save_safetensors(str(path), tensors, metadata={"qwen_mlx": json.dumps(header)})


def test_a_qwen3_file_is_refused_for_a_hybrid_and_back(models, tmp_path):
    qwen3, hybrid = models("qwen3"), models(DENSE)
    for maker, user in [(qwen3, hybrid), (hybrid, qwen3)]:
        caches = make_cache(maker.config)
        prefill(maker, caches, prompt_ids(12), [12])
        path = tmp_path / f"{maker.config.model_type}.safetensors"
        save_cache(path, caches, model=maker)
        refused(user, path, "made for another model or config")


def test_layer_kinds_are_checked_against_the_layer_types(saved_hybrid, models):
    """Past the fingerprint (here copied in, as a forger would), each layer's kind must fit its type: a recurrent
    cache on a full-attention layer, or a KV cache on a linear one, is refused before any tensor is read."""
    model, path = saved_hybrid
    header, tensors = read(path)
    cfg = model.config
    linear = next(i for i in range(cfg.num_hidden_layers) if cfg.is_linear_layer(i))
    full = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_linear_layer(i))
    swapped = dict(header, layers=list(header["layers"]))
    swapped["layers"][linear], swapped["layers"][full] = header["layers"][full], header["layers"][linear]
    write(path, swapped, tensors)
    refused(model, path, f"layer {linear} holds a kv cache, but the model's layer {linear} is linear attention")
    # A Qwen3 file relabelled with the hybrid's fingerprint and layer count: refused by kind as well.
    qwen3 = models("qwen3")
    caches = make_cache(qwen3.config)
    prefill(qwen3, caches, prompt_ids(20), [20])
    save_cache(path, caches, model=qwen3)
    header, tensors = read(path)
    header.update(model=model_fingerprint(model), layers=header["layers"] * 2)
    write(path, header, tensors)
    refused(model, path, "layer 0 holds a kv cache, but the model's layer 0 is linear attention")


def test_bad_hybrid_files_are_refused_before_mx_load(saved_hybrid, monkeypatch):
    model, path = saved_hybrid
    good = path.read_bytes()
    cfg = model.config
    state_shape = [1, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim]
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + state_shape[1] * state_shape[3]  # q, k, v

    def case(change, match):
        path.write_bytes(good)
        header, tensors = read(path)
        change(header, tensors)
        write(path, header, tensors)
        monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("mx.load reached on a bad file"))
        refused(model, path, match)
        monkeypatch.undo()

    def half_state(h, t):
        t["layers.0.recurrent_state"] = t["layers.0.recurrent_state"].astype(mx.float16)

    case(half_state, rf"layers.0.recurrent_state is F16 {state_shape}, expected F32 {state_shape}".replace("[", r"\[")
         .replace("]", r"\]"))
    case(lambda h, t: t.update({"layers.0.conv_tail": t["layers.0.conv_tail"][:, :2]}),
         rf"layers.0.conv_tail is F32 \[1, 2, {conv_dim}\], expected float \[1, 3, {conv_dim}\]")
    case(lambda h, t: t.update({"layers.1.recurrent_state": t["layers.1.recurrent_state"][..., :8]}),
         "layers.1.recurrent_state is F32")
    case(lambda h, t: t.pop("layers.2.conv_tail"), "layers.2.conv_tail is missing")
    case(lambda h, t: t.update({"layers.0.conv_tail": t["layers.0.conv_tail"].astype(mx.int32)}),
         "layers.0.conv_tail is I32")
    case(lambda h, t: h["layers"][0].update(offset=0), "layers disagree|layers.0.conv_tail is not part")
    case(lambda h, t: h["layers"][1].update(offset="20"), "invalid recurrent cache settings")
    case(lambda h, t: h["layers"][1].update(snapshots=[3]), "invalid recurrent cache settings")
    case(lambda h, t: t.update({"layers.3.conv_tail": t["layers.0.conv_tail"]}), "layers.3.conv_tail is not part")
    case(lambda h, t: t.update({"layers.0.conv_tail": t["layers.0.conv_tail"].astype(mx.float16)}),
         "mix float dtypes")


def test_fuzzed_hybrid_files_are_refused_in_one_line_or_load(saved_hybrid):
    """300 random mutations of a hybrid file (bytes flipped anywhere, the header JSON's numbers and kinds changed,
    tensors dropped or reshaped): each either loads as a cache list of the model's shape or is refused with one
    line (CacheFileError); nothing else escapes, nothing crashes the process."""
    model, path = saved_hybrid
    good = path.read_bytes()
    header, tensors = read(path)
    rng = random.Random(19)
    outcomes = {"loaded": 0, "refused": 0}
    for n in range(300):
        way = n % 3
        if way == 0:  # raw bytes: header length, JSON, tensor data
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                i = rng.choice([rng.randrange(8), rng.randrange(8, 400), rng.randrange(len(data))])
                data[i] = rng.randrange(256)
            path.write_bytes(bytes(data))
        elif way == 1:  # the metadata's values
            h = json.loads(json.dumps(header))
            layer = h["layers"][rng.randrange(len(h["layers"]))]
            key = rng.choice(["kind", "offset", "extra"])
            layer[key] = rng.choice([-1, 0, 1, 19, 21, 2**31, 2**64, 1.5, None, True, "recurrent", "kv", "rotating",
                                     [], {}])
            write(path, h, tensors)
        else:  # the tensors
            t = dict(tensors)
            name = rng.choice(sorted(t))
            a = t[name]
            t[name] = rng.choice([a[..., :-1], a.astype(mx.bfloat16), a[None], a.reshape(-1), mx.zeros((0,))])
            write(path, header, t)
        try:
            loaded = load_cache(path, model=model)
        except CacheFileError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
        else:
            assert [type(c) for c in loaded.caches] == [type(c) for c in make_cache(model.config)]
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 250


# ------------------------------------------------------------------------------------- a rotating window


WINDOW, KEEP = 64, 4


def decode_marks(model, caches, prompt, n, marks):
    """Greedy tokens through the engine's decode loop; at each count of generated tokens in `marks`, the caches'
    bytes and MLX's active memory."""
    from qwen_mlx.engine.generate import generate_tokens

    tokens, memory = [], {}
    for token in generate_tokens(model, prompt, caches, max_tokens=n):
        tokens.append(token)
        if len(tokens) in marks:
            memory[len(tokens)] = (sum(c.nbytes for c in caches), mx.get_active_memory())
    return tokens, memory


@pytest.mark.slow  # about 50 s each on the shared CPU: 3 x 312 tokens through a 151,680-row LM head
@pytest.mark.parametrize("variant", [DENSE, MOE])
def test_a_rotating_window_on_a_hybrid_runs_4x_its_size_at_flat_memory(models, variant):
    """Window 64 (4 pinned) on the attention layers, the recurrent state fixed: 312 tokens generated after an
    8-token prompt (5 x the window). Cache bytes are the same once the window is full (offset 64), twice and four
    times over (offset 128, 256) and at the end; active memory stops growing (allocator noise only). Measured
    (dense / MoE): 61,056 / 89,856 B of cache at every mark, active memory within 7 KB of the first mark's; the
    plain cache grows from 155,264 / 278,272 B to 286,336 / 540,416 B. The tokens:
    the first 56 (while the window still holds every token) equal the unrotated run's, and all 312 equal an oracle
    whose attention layers keep every key and apply the window rule in float64 NumPy (test_cache.OracleCache)."""
    from helpers import greedy_ours
    from test_cache import OracleCache, window_rule

    model = models(variant)
    cfg = model.config
    prompt = prompt_ids(8, seed=5).tolist()
    full = WINDOW - len(prompt)  # generated tokens when the window is first full
    marks = {full, 2 * WINDOW - 8, 4 * WINDOW - 8, 312}
    caches = make_cache(cfg, max_size=WINDOW, keep=KEEP)
    tokens, memory = decode_marks(model, caches, prompt, 312, marks)
    nbytes = {n: b for n, (b, _) in memory.items()}
    active = {n: a for n, (_, a) in memory.items()}
    assert len(set(nbytes.values())) == 1, nbytes
    assert max(active.values()) - active[full] <= 256 * 1024, active  # flat: no growth with the tokens
    plain_tokens, plain_memory = decode_marks(model, make_cache(cfg), prompt, 312, marks)
    assert plain_memory[312][0] > plain_memory[full][0]  # the unbounded cache grows: the measure sees growth
    assert tokens[:full] == plain_tokens[:full] and tokens != plain_tokens
    oracle = [RecurrentCache() if cfg.is_linear_layer(i) else OracleCache(window_rule(WINDOW, KEEP))
              for i in range(cfg.num_hidden_layers)]
    assert tokens == greedy_ours(model, np.array(prompt), 312, oracle)


def test_a_prompt_longer_than_the_context_runs_in_a_hybrid_window(hybrid_checkpoint):
    """check_context looks for the window on any layer (a hybrid's first layer is often a recurrent one)."""
    from qwen_mlx.engine.stream import ContextError, check_context
    from qwen_mlx.weights.loader import load_config

    cfg = load_config(hybrid_checkpoint(DENSE))
    assert isinstance(make_cache(cfg)[0], RecurrentCache)
    long = [0] * (cfg.max_position_embeddings + 1)
    check_context(long, cfg, make_cache(cfg, max_size=WINDOW))
    with pytest.raises(ContextError, match="--max-kv-size"):
        check_context(long, cfg, make_cache(cfg))


@pytest.fixture(scope="module")
def llm(hybrid_checkpoint, tmp_path_factory):
    """The dense hybrid with a Qwen3.5-style template: its generation prompt opens a think block, which the
    history drops from earlier turns."""
    import shutil

    from test_hybrid import QWEN3_5_STYLE_TEMPLATE

    import qwen_mlx

    path = tmp_path_factory.mktemp("hybrid_window") / "model"
    shutil.copytree(hybrid_checkpoint(DENSE), path)
    (path / "chat_template.jinja").write_text(QWEN3_5_STYLE_TEMPLATE)
    return qwen_mlx.load(path)


@pytest.mark.parametrize("reply", [4, 80])
def test_chat_turn_two_after_the_window_wrapped(llm, reply):
    """Chat with window 128 (slack 16) on a hybrid: turn 1 runs a 200-token question, so the ring has wrapped, and
    `reply` tokens of reasoning; turn 2's rendering drops that reasoning, so it parts from what the cache holds
    just after turn 1's `<|im_start|>assistant\n`. The recurrent layers restore their snapshot there; the ring can
    go back only slack + 1 = 17 tokens. A 4-token reply fits: the ring is trimmed after wrapping and turn 2
    prefills only from the parting point. An 80-token reply has overwritten keys that point's window needs: the
    session starts over and prefills all of turn 2's prompt (correct, not fast). Either way turn 2 equals a fresh
    session's with the same history and window."""
    from qwen_mlx.engine.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    chat = llm.chat(max_kv_size=128, sampling=greedy)
    list(chat.send(" ".join(["window"] * 200), max_tokens=reply))
    held = list(chat._cached)
    assert len(held) > 128 + 16 and chat.messages[-1]["content"].startswith("<think>")  # wrapped; all reasoning
    reply2 = "".join(e.text for e in chat.send("and then?", max_tokens=8))
    prompt2 = llm.prompt_tokens(chat.messages[:-1])
    parted = common_prefix(held, prompt2)
    if reply == 4:
        assert 0 < len(held) - parted <= 17 and chat.last_prefill == len(prompt2) - parted
    else:
        assert len(held) - parted > 17 and chat.last_prefill == len(prompt2)
    fresh = llm.chat(max_kv_size=128, sampling=greedy)
    fresh.messages = [dict(m) for m in chat.messages[:-2]]
    assert "".join(e.text for e in fresh.send("and then?", max_tokens=8)) == reply2
    assert fresh._cached == chat._cached and fresh.last_prefill == len(prompt2)


# ------------------------------------------------------------------------------- prompt-cache files: API, CLI

SYSTEM = " ".join(["document"] * 150)


@pytest.mark.parametrize("variant", [DENSE, MOE])
def test_a_prompt_cache_file_through_the_api(hybrid_checkpoint, tmp_path, variant):
    """generate(prompt_cache=FILE): the first run saves the cache of everything before the user's text (the system
    prompt), the next runs load it and prefill only the rest; their replies equal the run without a file."""
    import qwen_mlx
    from qwen_mlx.engine.sampling import SamplingParams

    llm = qwen_mlx.load(hybrid_checkpoint(variant))
    greedy = SamplingParams(temperature=0.0)
    path = tmp_path / "system.safetensors"
    plain = llm.generate("what is it?", system=SYSTEM, sampling=greedy, max_tokens=8)
    first = llm.generate("what is it?", system=SYSTEM, sampling=greedy, max_tokens=8, prompt_cache=path)
    tokens = llm.prompt_tokens("what is it?", system=SYSTEM)
    saved = load_cache(path, model=llm.model)
    system_turn = llm.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    assert saved.tokens == tokens[: len(saved.tokens)] and len(saved.tokens) == len(system_turn) + 3  # <|im_start|>user\n
    assert llm.tokenizer.decode(tokens[len(saved.tokens):]).startswith("what is it?")
    second = llm.generate("what is it?", system=SYSTEM, sampling=greedy, max_tokens=8, prompt_cache=path)
    assert first.text == second.text == plain.text and len(set(plain.text)) > 4
    assert plain.stats.prompt_tokens == first.stats.prompt_tokens == len(tokens)  # the first run counts the saved part
    assert second.stats.prompt_tokens == len(tokens) - len(saved.tokens)
    other = llm.generate("and this?", system=SYSTEM, sampling=greedy, max_tokens=8, prompt_cache=path)
    assert other.text == llm.generate("and this?", system=SYSTEM, sampling=greedy, max_tokens=8).text
    assert other.stats.prompt_tokens < 10
    with pytest.raises(UserError, match="saved with other KV cache settings"):
        llm.generate("what is it?", system=SYSTEM, max_tokens=1, prompt_cache=path, max_kv_size=64)


def cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True, timeout=180)


def test_a_prompt_cache_file_through_the_cli(hybrid_checkpoint, tiny_checkpoint, tmp_path):
    """generate --prompt-cache: the second run prints the same answer after prefilling only the user turn; the
    hybrid's file is refused for Qwen3 in one line, exit 2 (both directions at the API: test_a_qwen3_file_...)."""
    hybrid, qwen3 = hybrid_checkpoint(MOE), tiny_checkpoint("qwen3")
    path = tmp_path / "p.safetensors"
    run = ["generate", "--system", SYSTEM, "-p", "what is it?", "--no-think", "--temp", "0", "--max-tokens", "8",
           "-v", "--prompt-cache", str(path)]
    first, second = cli(*run, "-m", str(hybrid)), cli(*run, "-m", str(hybrid))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and len(first.stdout.strip()) > 4 and path.exists()
    assert "prompt 13 tokens" in second.stderr  # "what is it?" and the template's tail, not the 150-word system
    out = cli(*run, "-m", str(qwen3))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and not out.stdout
    assert "this prompt cache was made for another model or config" in out.stderr
