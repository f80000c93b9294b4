"""Reading and writing `*.safetensors` folders without a deep-learning framework.

Who does what:
- The `safetensors` package validates every shard's header when a folder is opened
  (`safe_open`: JSON, known dtype names, offsets contiguous from 0, each tensor's bytes
  matching dtype x shape, the data covering the file exactly), so a shard this module
  accepts is one transformers would accept. It does not hand the data over: its numpy
  backend has no bfloat16 or float8, and its `get_slice` only yields numpy arrays.
- This module reads the data: a lazy `np.memmap` per tensor (slicing it reads only
  those bytes, so a loader can place each shard of a tensor straight into its device
  sharding), with bfloat16 and float8 from `ml_dtypes`. When `safe_open` refuses a
  file, this module reads the header itself to say what is wrong in one line
  (truncated by how many bytes, which tensors overlap, ...), naming the file.
Every problem is a one-line `DSparkError` naming the file (and tensor), raised when
the folder is opened; a file changed after that is caught when a tensor is read.
`save_file` writes the same format (any dtype of the table below) for fixtures.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from dspark_jax.errors import DSparkError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_INDEX = "model.safetensors.index.json"

Header = dict  # tensor name -> {"dtype", "shape", "data_offsets"}, __metadata__ removed


def _raw_header(path: str) -> tuple[dict, int, int]:
    """(parsed header JSON, data start, data bytes) of a file, one-line errors for a
    file too short for its header or a header that is not a JSON object."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DSparkError(f"missing weights file {path}") from None
    if size == 0:
        raise DSparkError(f"{path} is empty (0 bytes); re-download it")
    if size < 8:
        raise DSparkError(f"{path} is truncated ({size} bytes, shorter than the 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise DSparkError(f"{path} is truncated or not a safetensors file: the header length "
                              f"field says {n} bytes, the file has {size - 8} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except UnicodeDecodeError:
        raise DSparkError(f"{path} has a corrupt header (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} has a corrupt header (not valid JSON: {e.msg} at byte {e.pos})") from None
    if not isinstance(header, dict):
        raise DSparkError(f"{path} has a corrupt header (not a JSON object)")
    return header, 8 + n, size - 8 - n


def _entries(path: str, header: dict) -> list[tuple[int, int, str]]:
    """(start, end, name) of every tensor, each entry's fields and byte size checked."""
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], list(meta["shape"]), meta["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (start, end, *shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DSparkError(f"{path} has a corrupt header: the entry of tensor {name} needs "
                              f"dtype, shape and two data_offsets (non-negative integers)") from None
        if dtype in _DTYPES:
            want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            if end - start != want:
                raise DSparkError(f"{path} has a corrupt header: tensor {name} is {dtype} {tuple(shape)} "
                                  f"({want} bytes) but its data_offsets [{start}, {end}] span {end - start}")
        out.append((start, end, name))
    return sorted(out)


def _diagnose(path: str, reason: str) -> DSparkError:
    """The one-line error for a file `safe_open` refused (`reason` is its message)."""
    header, _, data = _raw_header(path)
    entries = _entries(path, header)
    prev_end, prev = 0, None
    for start, end, name in entries:
        if start < prev_end:
            return DSparkError(f"{path} has a corrupt header: tensors {prev} and {name} overlap "
                               f"(bytes {start}..{prev_end})")
        if start > prev_end:
            return DSparkError(f"{path} has a corrupt header: {start - prev_end} unused bytes before "
                               f"tensor {name}")
        prev_end, prev = end, name
    if prev_end > data:
        return DSparkError(f"{path} is truncated: its header places tensor data up to byte {prev_end}, "
                           f"the file holds {data} ({prev_end - data} bytes missing; re-download it)")
    if prev_end < data:
        return DSparkError(f"{path} has {data - prev_end} bytes after its last tensor "
                           f"(corrupt or not a safetensors file)")
    return DSparkError(f"{path} is not a valid safetensors file ({reason})")


def read_header(path: str) -> tuple[Header, int]:
    """(header without __metadata__, byte offset of the data) of a validated file."""
    try:
        with safe_open(path, framework="numpy"):
            pass
    except FileNotFoundError:
        raise DSparkError(f"missing weights file {path}") from None
    except (SafetensorError, OSError) as e:
        reason = " ".join(str(e).split()).removeprefix("Error while deserializing header: ")
        raise _diagnose(path, reason) from None
    header, offset, _ = _raw_header(path)
    header.pop("__metadata__", None)
    return header, offset


class TensorIndex(Mapping[str, np.ndarray]):
    """name -> array over every safetensors file of a folder, read lazily via memmap."""

    def __init__(self, files: dict[str, str], headers: dict[str, tuple[Header, int]] | None = None):
        self._where = files  # tensor name -> file path
        self._headers: dict[str, tuple[Header, int]] = dict(headers or {})

    def file_of(self, name: str) -> str:
        return os.path.basename(self._where[name])

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name, shape) of a tensor, without reading it."""
        header, _ = self._header(self._where[name])
        self._check_listed(name, header)
        return header[name]["dtype"], tuple(header[name]["shape"])

    def _header(self, path: str) -> tuple[Header, int]:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def _check_listed(self, name: str, header: Header) -> None:
        if name not in header:
            raise DSparkError(f"tensor {name} listed in {_INDEX} is missing from {self._where[name]}")

    def __contains__(self, name) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._where[name]
        header, offset = self._header(path)
        self._check_listed(name, header)
        meta = header[name]
        if meta["dtype"] not in _DTYPES:
            raise DSparkError(f"tensor {name} in {path} has unsupported dtype {meta['dtype']}")
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        start, _ = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        try:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
        except FileNotFoundError:
            raise DSparkError(f"weights file {path} disappeared while reading tensor {name}") from None
        except (ValueError, OSError) as e:
            raise DSparkError(f"cannot read tensor {name} from {path} (changed since it was opened? "
                              f"{' '.join(str(e).split())})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DSparkError(f"{index_path} is not a valid safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DSparkError(f"{index_path}: weight_map must map tensor names to file names")
    return weight_map


def open_folder(folder: str) -> TensorIndex:
    """All tensors of a Hugging Face folder (an index json, one file, or several files),
    every shard's header validated against its file once, here."""
    index_path = os.path.join(folder, _INDEX)
    if os.path.exists(index_path):
        files = {k: os.path.join(folder, v) for k, v in _weight_map(index_path).items()}
        headers = {}
        for path in sorted(set(files.values())):
            if not os.path.exists(path):
                raise DSparkError(f"missing weights file {path} (named in {index_path})")
            headers[path] = read_header(path)
        index = TensorIndex(files, headers)
        for name, path in files.items():
            index._check_listed(name, headers[path][0])
        return index
    if not os.path.isdir(folder):
        raise DSparkError(f"model folder {folder} does not exist")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not shards:
        raise DSparkError(f"no *.safetensors weights in {folder}")
    files, headers = {}, {}
    for shard in shards:
        path = os.path.join(folder, shard)
        headers[path] = read_header(path)
        files.update({k: path for k in headers[path][0]})
    return TensorIndex(files, headers)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write one safetensors file (any dtype in the table above, bf16 and float8 included)."""
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
