"""Session fixtures: tiny random checkpoints in the real Hugging Face layout, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# Subprocesses (the real CLI) import this checkout's package even when it is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# Tests never reach the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from make_tiny_checkpoint import write_hybrid_checkpoint, write_tiny_checkpoint  # noqa: E402
from make_tokenizer import write_qwen_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real Qwen3 tokenizer (tokenizer.json from the qwen.tiktoken ranks, Qwen3's chat template)."""
    return write_qwen_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """tiny_checkpoint(variant, dtype="float32", **overrides) -> Path, each built once per session."""
    built: dict[tuple, Path] = {}

    def get(variant: str, dtype: str = "float32", **overrides) -> Path:
        key = (variant, dtype, tuple(sorted(overrides.items())))
        if key not in built:
            name = "-".join([variant, dtype, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            built[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), variant, dtype, overrides=overrides,
                                               tokenizer_dir=tokenizer_dir)
        return built[key]

    return get


@pytest.fixture(scope="session")
def hybrid_checkpoint(tmp_path_factory, tokenizer_dir):
    """hybrid_checkpoint(variant) -> Path: a tiny hybrid checkpoint written by transformers (make_tiny_checkpoint's
    HYBRID_VARIANTS) with the Qwen tokenizer, each built once per session; `mtp=True`: with a random MTP head."""
    built: dict[tuple[str, bool], Path] = {}

    def get(variant: str, mtp: bool = False) -> Path:
        if (variant, mtp) not in built:
            built[variant, mtp] = write_hybrid_checkpoint(tmp_path_factory.mktemp(variant + "_mtp" * mtp), variant,
                                                          tokenizer_dir=tokenizer_dir, mtp=mtp)
        return built[variant, mtp]

    return get
