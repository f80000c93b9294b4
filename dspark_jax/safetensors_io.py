"""Reading and writing `*.safetensors` folders without a deep-learning framework.

The numpy backend of the `safetensors` package has no bfloat16, so tensors are read
through their header (memory-mapped, lazily) and bf16 comes from `ml_dtypes`. Writing
goes through the same small format; both are exercised against the `safetensors`
package in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from dspark_jax.errors import DSparkError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DSparkError(f"missing weights file {path}") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise DSparkError(f"{path} is not a valid safetensors file") from None
    return header, 8 + n


class TensorIndex(Mapping[str, np.ndarray]):
    """name -> array over every safetensors file of a folder, read lazily via memmap."""

    def __init__(self, files: dict[str, str]):
        self._where = files  # tensor name -> file path
        self._headers: dict[str, tuple[dict, int]] = {}

    def file_of(self, name: str) -> str:
        return os.path.basename(self._where[name])

    def __contains__(self, name) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._where[name]
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        header, offset = self._headers[path]
        if name not in header:
            raise DSparkError(f"tensor {name} listed in the index is missing from {path}")
        meta = header[name]
        if meta["dtype"] not in _DTYPES:
            raise DSparkError(f"tensor {name} in {path} has unsupported dtype {meta['dtype']}")
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * dtype.itemsize:
            raise DSparkError(f"tensor {name} in {path}: byte size does not match shape {shape}")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_folder(folder: str) -> TensorIndex:
    """All tensors of a Hugging Face folder: an index json, one file, or several files."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise DSparkError(f"{index_path} is not a valid safetensors index (no weight_map)") from None
        files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.exists(path):
                raise DSparkError(f"missing weights file {path} (named in {index_path})")
        return TensorIndex(files)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not shards:
        raise DSparkError(f"no *.safetensors weights in {folder}")
    files = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        header, _ = _read_header(path)
        files.update({k: path for k in header if k != "__metadata__"})
    return TensorIndex(files)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write one safetensors file (any dtype in the table above, bf16 included)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise DSparkError(f"cannot save tensor {name} of dtype {a.dtype}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
