import threading

from helpers import greedy_ours, prompt_ids

from qwen_mlx.cache.kv import make_cache
from qwen_mlx.engine.generate import GenerationStats, generate_tokens
from qwen_mlx.weights.loader import load_model


def test_generate_tokens_equals_reference_greedy(tiny_checkpoint):
    """Chunked prefill + pipelined decode give the plain loop's tokens; stats count what happened."""
    model, _ = load_model(tiny_checkpoint("qwen3"))
    prompt = prompt_ids(40, seed=5).tolist()
    expected = greedy_ours(model, prompt_ids(40, seed=5), 20)
    stats = GenerationStats()
    cache = make_cache(model.config)
    got = list(generate_tokens(model, prompt, cache, max_tokens=20, prefill_chunk=16, stats=stats))
    assert got == expected
    assert (stats.prompt_tokens, stats.generated_tokens) == (40, 20)
    assert stats.decode_tps > 0 and stats.prompt_tps > 0 and stats.peak_memory > 0
    assert cache[0].offset == 40 + 19  # the last token was never fed back


def test_cache_offset_tells_what_is_held_after_an_early_stop(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen2"))
    prompt = prompt_ids(10, seed=6).tolist()
    cache = make_cache(model.config)
    out = []
    for token in generate_tokens(model, prompt, cache, max_tokens=50):
        out.append(token)
        if len(out) == 5:
            break
    assert cache[0].offset == 15  # the 5th token was already fed to the queued step
    # continuing on that cache with new tokens equals a fresh run over the whole history
    more = [100, 200]
    cont = list(generate_tokens(model, more, cache, max_tokens=6))
    fresh = list(generate_tokens(model, prompt + out + more, make_cache(model.config), max_tokens=6))
    assert cont == fresh


def test_stop_event_ends_generation(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen3"))
    stop = threading.Event()
    got = []
    for token in generate_tokens(model, [1, 2, 3], make_cache(model.config), max_tokens=100, stop=stop):
        got.append(token)
        if len(got) == 3:
            stop.set()
    assert len(got) == 3
    stop2 = threading.Event()
    stop2.set()
    assert list(generate_tokens(model, list(range(100)), make_cache(model.config), stop=stop2)) == []
