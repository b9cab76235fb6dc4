"""Crafted safetensors files: each must end in one clear line from the real CLI, never a crash or a read past
the file (MLX's own reader is not a safety boundary: see ARCHITECTURE.md, "Safety at the boundaries")."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time

import pytest

GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def header_file(header, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def one(name: str, entry: dict, data: bytes = b"\0" * 16) -> bytes:
    return header_file({name: entry}, data)


NORM = "model.norm.weight"
CASES = {
    "empty": b"",
    "shorter_than_length_prefix": b"\x10\0\0",
    "header_length_2_63": header_file({}, length=2**63),
    "header_length_past_eof": header_file({"a": GOOD}, length=10_000),
    "not_json": header_file(b"{this is not json"),
    "not_utf8": header_file(b'{"\xff\xfe": 1}'),
    "top_level_array": header_file([1, 2, 3]),
    "inverted_offsets": one(NORM, {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}),
    "overlapping_offsets": header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "offsets_past_eof": one(NORM, {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}),
    "size_mismatch": one(NORM, {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}),
    "unknown_dtype": one(NORM, {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}),
    "negative_dimension": one(NORM, {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}),
    "shape_product_wraps": one(NORM, {"dtype": "BF16", "shape": [65536, 65536, 65536, 16384],
                                      "data_offsets": [0, 0]}, b""),
    "dimension_over_2_31": one(NORM, {"dtype": "F32", "shape": [2**31 + 1], "data_offsets": [0, 16]}),
    "trailing_bytes": one(NORM, {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, b"\0" * 40),
    "duplicate_key": header_file(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                                 b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'),
    "missing_data_offsets": one(NORM, {"dtype": "F32", "shape": [4]}),
    "missing_dtype": one(NORM, {"shape": [4], "data_offsets": [0, 16]}),
    "offsets_not_integers": one(NORM, {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}),
    "shape_not_a_list": one(NORM, {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}),
    "metadata_not_strings": header_file({"__metadata__": {"format": {"nested": 1}}, NORM: GOOD}),
    "gap_between_tensors": header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}),
    "no_tensors": header_file({}, b""),
    "unsupported_dtype_i64": one(NORM, {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}),
    "huge_header_of_spaces": header_file(b"{" + b" " * 200_000 + b"}", b""),
    "deeply_nested_json": header_file(b"[" * 100_000 + b"]" * 100_000, b""),
}


@pytest.fixture(scope="module")
def base_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("qwen3")


def run_cli(*args, cwd, timeout=60):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=cwd)
    return run, time.perf_counter() - start


def assert_one_clear_error(run, seconds):
    assert 1 <= run.returncode <= 127, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen-mlx: error: "), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert seconds < 5


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_safetensors_is_refused_clearly(base_checkpoint, tmp_path, case):
    ckpt = shutil.copytree(base_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(CASES[case])
    before = sorted(p.name for p in ckpt.iterdir())
    run, seconds = run_cli("info", "--model", str(ckpt), cwd=tmp_path)
    assert_one_clear_error(run, seconds)
    assert "model.safetensors" in run.stderr or "tensor" in run.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_duplicate_tensor_names_are_refused(base_checkpoint, tmp_path):
    ckpt = shutil.copytree(base_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(CASES["duplicate_key"])
    run, _ = run_cli("info", "--model", str(ckpt), cwd=tmp_path)
    assert "tensor a appears twice in the header" in run.stderr


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_weights_are_named_by_info_check(base_checkpoint, tmp_path, value):
    import mlx.core as mx

    ckpt = shutil.copytree(base_checkpoint, tmp_path / "ckpt")
    weights = dict(mx.load(str(ckpt / "model.safetensors")))
    bad = weights["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.1.mlp.down_proj.weight"] = bad.at[3, 5].add(float(value))
    mx.save_safetensors(str(ckpt / "model.safetensors"), weights, metadata={"format": "pt"})
    run, seconds = run_cli("info", "--model", str(ckpt), "--check", cwd=tmp_path)
    assert_one_clear_error(run, seconds)
    assert "tensor model.layers.1.mlp.down_proj.weight has 1 non-finite values" in run.stderr
    good, _ = run_cli("info", "--model", str(base_checkpoint), "--check", cwd=tmp_path)
    assert good.returncode == 0 and "every tensor is finite" in good.stdout


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
