"""Block-scaled FP8 weights (DeepSeek-V3/V4 release folders), dequantised at load.

Such folders keep most 2-D weights as float8 (e4m3) `[out, in]` tensors, each with a
float32 sibling `<prefix>.weight_scale_inv` (DeepSeek's own converted layout names it
`<prefix>.scale`) of shape `[ceil(out / B0), ceil(in / B1)]`, where `[B0, B1]` is
config.json's `quantization_config["weight_block_size"]` (default `[128, 128]`). The
real weight is the float8 value times the scale of the block it sits in, as
transformers' and DeepSeek's reference dequantisation compute it:

    w[i, j] = float32(w_fp8[i, j]) * scale_inv[i // B0, j // B1]

Edge blocks may be partial (out or in not a multiple of the block). Folders whose config
says `expert_dtype: fp4` (DeepSeek-V4-Flash / -Pro) hold the routed experts as packed
e2m1 instead: int8 `[out, in / 2]`, two values per byte with the element of the even
column in the low nibble (DeepSeek's `inference/convert.py` reads them so), and an e8m0
scale per 32 inputs, `[out, in / 32]`:

    w[i, j] = E2M1[nibble(i, j)] * scale[i, j // 32]

Everything else in the folder (norms, embeddings, bf16 weights) passes through
unchanged. Loaders call `block_size` once on the config, then `read_weight` per tensor.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import TensorIndex

FLOAT8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIXES = (".weight_scale_inv", ".scale")

_OK_EXPERT_DTYPES = (None, "fp8", "float8", "e4m3", "bf16", "bfloat16", "fp4")
PACKED = (np.dtype(np.int8), np.dtype(np.uint8))
FP4_GROUP = 32
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                np.float32)


def is_float8(arr) -> bool:
    """Whether an array (or memmap) holds one of the float8 dtypes a folder may use."""
    return np.dtype(arr.dtype) in FLOAT8


def block_size(hf_config: dict, path: str = "config.json") -> tuple[int, int] | None:
    """`(B0, B1)` of a block-quantised FP8 folder's config, None when it has no
    `quantization_config`; a config this module cannot dequantise is refused in one
    line naming the field (the activation scheme is not checked: activations are not
    quantised here, weights are dequantised at load)."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise DSparkError(f"{path}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise DSparkError(f"{path}: quantization_config.quant_method '{method}' is not supported "
                          f"(only fp8 block-scaled weights)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise DSparkError(f"{path}: quantization_config.fmt '{fmt}' is not supported (only e4m3)")
    for where, cfg in (("expert_dtype", hf_config), ("quantization_config.expert_dtype", qc)):
        if cfg.get("expert_dtype") not in _OK_EXPERT_DTYPES:
            raise DSparkError(f"{path}: {where} '{cfg.get('expert_dtype')}' is not supported "
                              f"(only fp8, fp4 or bf16 experts)")
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise DSparkError(f"{path}: quantization_config.weight_block_size {block!r} must be two "
                          f"positive integers")
    return int(block[0]), int(block[1])


def dequantize(weight, scale_inv, block: tuple[int, int], *, name: str = "weight") -> np.ndarray:
    """float32 `[out, in]` from a float8 `weight` and its per-block `scale_inv`
    `[ceil(out/B0), ceil(in/B1)]`; block rows are scaled one at a time, so the only
    large allocation is the float32 result. `name` only labels errors."""
    b0, b1 = block
    if weight.ndim != 2:
        raise DSparkError(f"{name}: block-scaled weights must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    want = (math.ceil(rows / b0), math.ceil(cols / b1))
    if tuple(scale_inv.shape) != want:
        raise DSparkError(f"{name}: scale shape {tuple(scale_inv.shape)} does not fit weight "
                          f"{(rows, cols)} in blocks of {(b0, b1)} (expected {want})")
    scale = np.asarray(scale_inv).astype(np.float32)
    out = np.asarray(weight).astype(np.float32)
    for i in range(want[0]):
        out[i * b0:(i + 1) * b0] *= np.repeat(scale[i], b1)[:cols]
    return out


def dequantize_fp4(packed, scale, *, name: str = "weight") -> np.ndarray:
    """float32 `[out, in]` from packed e2m1 `[out, in / 2]` (int8 or uint8; low nibble =
    even column) and its per-32-inputs `scale` `[out, in / 32]` (e8m0 or float)."""
    if packed.ndim != 2:
        raise DSparkError(f"{name}: packed fp4 weights must be 2-D, got shape {tuple(packed.shape)}")
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    want = (rows, math.ceil(cols / FP4_GROUP))
    if tuple(scale.shape) != want:
        raise DSparkError(f"{name}: fp4 scale shape {tuple(scale.shape)} does not fit weight {(rows, cols)} "
                          f"in groups of {FP4_GROUP} inputs (expected {want})")
    u8 = np.asarray(packed).view(np.uint8)
    out = np.stack([E2M1[u8 & 0x0F], E2M1[u8 >> 4]], axis=-1).reshape(rows, cols)
    out *= np.repeat(np.asarray(scale).astype(np.float32), FP4_GROUP, axis=1)[:, :cols]
    return out


def scale_name(index: TensorIndex, name: str) -> str | None:
    """The scale sibling of weight `name` present in `index`, or None."""
    if not name.endswith(".weight"):
        return None
    prefix = name[: -len(".weight")]
    for suffix in SCALE_SUFFIXES:
        if prefix + suffix in index:
            return prefix + suffix
    return None


def read_weight(index: TensorIndex, name: str, block: tuple[int, int] | None) -> np.ndarray:
    """Tensor `name` of a folder: dequantised to float32 when it is float8 (its scale
    sibling must exist) or packed fp4 (int8 with a scale sibling), unchanged otherwise.
    `block` is `block_size(config)`."""
    arr = index[name]
    if np.dtype(arr.dtype) in PACKED and scale_name(index, name) is not None:
        return dequantize_fp4(arr, index[scale_name(index, name)], name=f"tensor {name} in {index.file_of(name)}")
    if not is_float8(arr):
        return arr
    where = index.file_of(name)
    scale = scale_name(index, name)
    if scale is None:
        raise DSparkError(f"tensor {name} in {where} is {arr.dtype} but has no "
                          f"weight_scale_inv/scale sibling to dequantise it")
    if block is None:
        raise DSparkError(f"tensor {name} in {where} is {arr.dtype} but config.json has no "
                          f"quantization_config (weight_block_size)")
    return dequantize(arr, index[scale], block, name=f"tensor {name} in {where}")
