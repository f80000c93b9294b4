"""Broken safetensors folders fail in one line naming the file (and tensor), when the
folder is opened; what the reader accepts it reads as the `safetensors` package does."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from safetensors import safe_open

from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder, read_header, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "qwen3_tiny_tied")


def _tensors():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "b.weight": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
            "c.weight": rng.normal(size=(8,)).astype(ml_dtypes.float8_e4m3fn)}


def _raw(path, header: dict, data: bytes, *, length: int | None = None):
    """A file with exactly this header and data (and, if given, this length field)."""
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _good(folder) -> tuple[str, dict, bytes]:
    """A valid one-shard folder; returns (shard path, its header, its data bytes)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    save_file(_tensors(), path)
    header, offset = read_header(path)
    with open(path, "rb") as f:
        data = f.read()[offset:]
    return path, header, data


def _refused(folder, *words) -> str:
    with pytest.raises(DSparkError) as e:
        open_folder(str(folder))
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_shard_is_refused_at_open_with_the_missing_bytes(tmp_path):
    path, _, _ = _good(tmp_path)
    size = os.path.getsize(path)
    os.truncate(path, size - 10)
    msg = _refused(tmp_path, path, "truncated", "10 bytes missing")
    assert msg.startswith(path)


@pytest.mark.parametrize("blob,words", [
    (b"", ("empty", "0 bytes")),
    (b"\x01\x02\x03", ("truncated", "3 bytes")),
    (struct.pack("<Q", 10**6) + b"{}", ("header length", "1000000")),
    (struct.pack("<Q", 12) + b"not json!!!!", ("corrupt header", "not valid JSON")),
    (struct.pack("<Q", 2) + b"[]", ("corrupt header", "not a JSON object")),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", ("corrupt header",)),
])
def test_files_too_short_or_not_safetensors_are_one_line(tmp_path, blob, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    _refused(tmp_path, str(path), *words)


def test_overlapping_offsets_name_both_tensors(tmp_path):
    path, header, data = _good(tmp_path)
    header["b.weight"]["data_offsets"] = list(header["a.weight"]["data_offsets"])
    header["b.weight"]["shape"], header["b.weight"]["dtype"] = [4, 6], "F32"
    _raw(path, header, data)
    _refused(tmp_path, path, "overlap", "a.weight", "b.weight")


def test_offsets_past_the_data_or_not_matching_the_shape_name_the_tensor(tmp_path):
    path, header, data = _good(tmp_path)
    header["c.weight"]["data_offsets"][1] += 10**9
    _raw(path, header, data)
    _refused(tmp_path, path, "c.weight", "data_offsets")
    path, header, data = _good(tmp_path)
    header["a.weight"]["shape"] = [4, 7]
    _raw(path, header, data)
    _refused(tmp_path, path, "a.weight", "(4, 7)")


def test_missing_fields_gaps_and_trailing_bytes(tmp_path):
    path, header, data = _good(tmp_path)
    del header["b.weight"]["data_offsets"]
    _raw(path, header, data)
    _refused(tmp_path, path, "b.weight", "corrupt header")
    path, header, data = _good(tmp_path)
    _raw(path, header, data + b"\0" * 16)
    _refused(tmp_path, path, "16 bytes after its last tensor")
    path, header, data = _good(tmp_path)
    for meta in header.values():
        meta["data_offsets"] = [o + 8 for o in meta["data_offsets"]]
    _raw(path, header, b"\0" * 8 + data)
    _refused(tmp_path, path, "8 unused bytes before tensor")


def test_unknown_dtype_falls_back_to_the_packages_reason(tmp_path):
    path, header, data = _good(tmp_path)
    header["c.weight"]["dtype"] = "F9"
    _raw(path, header, data)
    _refused(tmp_path, path, "not a valid safetensors file", "F9")


def test_index_naming_a_tensor_its_shard_lacks_or_a_missing_shard(tmp_path):
    path, _, _ = _good(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a.weight": "model.safetensors", "z.weight": "model.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    _refused(tmp_path, "z.weight", path, "missing")
    weight_map["z.weight"] = "model-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _refused(tmp_path, "missing weights file", "model-00002.safetensors")
    index.write_text("{")
    _refused(tmp_path, str(index), "weight_map")


def test_a_shard_cut_after_opening_fails_when_read_naming_tensor_and_file(tmp_path):
    path, _, _ = _good(tmp_path)
    index = open_folder(str(tmp_path))
    os.truncate(path, 64)
    with pytest.raises(DSparkError) as e:
        index["c.weight"]
    assert "\n" not in str(e.value) and "c.weight" in str(e.value) and path in str(e.value)


def test_a_dtype_the_package_knows_but_numpy_cannot_hold_is_refused_when_read(tmp_path):
    path, header, data = _good(tmp_path)
    header["c.weight"]["dtype"] = "F8_E4M3FNUZ"
    _raw(path, header, data)
    index = open_folder(str(tmp_path))
    assert np.array_equal(index["a.weight"], _tensors()["a.weight"])
    with pytest.raises(DSparkError, match="c.weight .*unsupported dtype F8_E4M3FNUZ"):
        index["c.weight"]


def test_cli_prints_one_line_and_exits_2_for_a_truncated_target(tmp_path):
    target = tmp_path / "target"
    shutil.copytree(TINY, target)
    shard = target / "model.safetensors"
    os.truncate(shard, os.path.getsize(shard) // 2)
    proc = subprocess.run([sys.executable, "-m", "serve.generate", "--target", str(target),
                           "--prompt", "hi", "--max-new-tokens", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(shard) in lines[0] and "truncated" in lines[0], proc.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, ml_dtypes.bfloat16,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_round_trip_matches_the_safetensors_package(tmp_path, dtype):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(5, 7)) * 4).astype(dtype)
    path = str(tmp_path / "model.safetensors")
    save_file({"t": a, "u": np.arange(3, dtype=np.float32)}, path)
    got = open_folder(str(tmp_path))["t"]
    assert got.dtype == a.dtype and np.array_equal(got.view(np.uint8), a.view(np.uint8))
    (name, spec), = [x for x in safetensors.deserialize(open(path, "rb").read()) if x[0] == "t"]
    theirs = np.frombuffer(bytes(spec["data"]), dtype).reshape(spec["shape"])
    assert np.array_equal(theirs.view(np.uint8), got.view(np.uint8))
    with safe_open(path, framework="numpy") as f:
        assert f.get_slice("t").get_shape() == [5, 7]
        if np.dtype(dtype) in (np.float32, np.float16, np.int64):
            assert np.array_equal(f.get_tensor("t"), got)


def test_files_written_by_the_package_read_the_same(tmp_path):
    ours = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.arange(5, dtype=np.int32)}
    safetensors.numpy.save_file(ours, str(tmp_path / "model.safetensors"))
    index = open_folder(str(tmp_path))
    assert sorted(index) == ["x", "y"] and all(np.array_equal(index[k], v) for k, v in ours.items())
