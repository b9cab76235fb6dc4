"""The fixture tokenizer is Qwen's real one: tiktoken on the same ranks and transformers agree with it."""

import unicodedata

import pytest
from make_tokenizer import ADDED_TOKENS, FIRST_ADDED_ID, SPLIT_PATTERN, load_ranks

CORPUS = [
    "Hello, world! It's a test: we'll see.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and symbols ∑∫√ ≠ ≤",
    "Numbers 1234567890, 3.14159, -42, 1e-9 and 2026-11-23",
    "   leading spaces, \n\n\n many newlines \r\n and\ttabs\t\t end   ",
    "Mixed: naïve café Ünïcödé ﬁ ligature, Ελληνικά, русский, العربية, हिन्दी",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\nanswer",
]


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken

    return tiktoken.Encoding("qwen", pat_str=SPLIT_PATTERN, mergeable_ranks=load_ranks(),
                             special_tokens={t: FIRST_ADDED_ID + i for i, (t, _) in enumerate(ADDED_TOKENS)})


@pytest.mark.parametrize("text", CORPUS)
def test_encoding_equals_tiktoken_and_transformers(tokenizer_dir, tiktoken_encoding, text):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text).ids
    # the hub tokenizer normalizes to NFC first; tiktoken does not normalize
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert ours == expected
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf.encode(text) == expected
    assert hf.decode(expected) == unicodedata.normalize("NFC", text)


def test_special_tokens_sit_at_their_real_ids(tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 151669
    for name, expected in [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
                           ("<think>", 151667), ("</think>", 151668)]:
        assert tok.token_to_id(name) == expected
    assert tok.encode("user\n").ids == [872, 198]
