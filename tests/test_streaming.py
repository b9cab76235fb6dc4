"""Streaming detokenizer and the thinking splitter."""

import pytest

from qwen_mlx.engine.thinking import ThinkingSplitter, prompt_opens_thinking
from qwen_mlx.engine.tokenizer import Tokenizer

TEXTS = ["héllo wörld, 你好世界！ 😀🎉👩‍👩‍👧‍👦 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫ ok",
         "日本語のテキストと emoji 🇯🇵🗾 mixed with code `x = 1` and ümlauts" * 3]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_equals_decode_with_constant_work(tokenizer, text):
    ids = tokenizer.encode(text)
    # the text must actually split characters across tokens, or the test proves nothing
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    detok = tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # work per token is bounded: only held tokens are decoded again, never the history
    assert detok.tokens_decoded <= 4 * len(ids)


def test_detokenizer_work_does_not_grow_with_length(tokenizer):
    ids = tokenizer.encode(TEXTS[1] * 20)
    detok = tokenizer.detokenizer()
    per_step = []
    for i in ids:
        before = detok.tokens_decoded
        detok.add(i)
        per_step.append(detok.tokens_decoded - before)
    assert max(per_step) <= detok.max_pending
    assert sum(per_step[-100:]) <= 4 * 100


THINK, END = 151667, 151668


def run(splitter, tokens):
    return [(splitter.feed(t), t) for t in tokens]


def test_model_opens_think():
    s = ThinkingSplitter(THINK, END)
    out = run(s, [THINK, 1, 2, END, 3, 4])
    assert out == [(None, THINK), ("thinking", 1), ("thinking", 2), (None, END), ("answer", 3), ("answer", 4)]
    assert s.thought and not s.unfinished


def test_prompt_already_opened_think():
    prompt = [151644, 77091, 198, THINK, 198]  # "<|im_start|>assistant\n<think>\n"
    assert prompt_opens_thinking(prompt, THINK, END)
    s = ThinkingSplitter(THINK, END, in_thinking=True)
    assert run(s, [5, END, 6]) == [("thinking", 5), (None, END), ("answer", 6)]


def test_no_thinking_at_all():
    prompt = [151644, 77091, 198, THINK, 271, END, 271]  # enable_thinking=False writes an empty, closed block
    assert not prompt_opens_thinking(prompt, THINK, END)
    s = ThinkingSplitter(THINK, END)
    assert run(s, [7, 8]) == [("answer", 7), ("answer", 8)]
    assert not s.thought


def test_thinking_cut_off_by_max_tokens():
    s = ThinkingSplitter(THINK, END)
    run(s, [THINK, 1, 2])
    assert s.unfinished and s.thought
