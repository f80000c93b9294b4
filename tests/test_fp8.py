"""Block-scaled FP8 weights: dequantised exactly as the per-element rule says (partial
edge blocks included), scale siblings found by either name, refusals in one line."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from dspark_jax import fp8
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder, save_file

E4M3 = ml_dtypes.float8_e4m3fn


def _reference(w, s, block, rule="right"):
    """The definition, one element at a time: w[i, j] * scale_inv[i // B0, j // B1]."""
    b0, b1 = block
    out = np.empty(w.shape, np.float32)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            if rule == "right":
                scale = s[i // b0, j // b1]
            elif rule == "reciprocal":
                scale = 1.0 / s[i // b0, j // b1]
            else:  # "transposed": the block grid read the other way round
                scale = s[j // b1, i // b0]
            out[i, j] = np.float32(w[i, j]) * scale
    return out


def _quantised(shape, block, seed=0, dtype=E4M3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(dtype)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    s = rng.uniform(0.25, 4.0, size=grid).astype(np.float32)
    return w, s


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((130, 70), (64, 32)),
                                         ((5, 3), (128, 128))])
def test_dequantize_is_the_per_element_rule_with_partial_edge_blocks(shape, block):
    w, s = _quantised(shape, block)
    got = fp8.dequantize(w, s, block)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, _reference(w, s, block))


@pytest.mark.parametrize("rule", ["reciprocal", "transposed"])
def test_a_wrong_rule_fails_the_comparison(rule):
    block = (64, 64)
    w, s = _quantised((128, 100), block)  # a 2 x 2 grid, so the transposed grid fits too
    assert not np.allclose(fp8.dequantize(w, s, block), _reference(w, s, block, rule))


def test_e5m2_weights_dequantise_the_same_way():
    w, s = _quantised((70, 40), (32, 32), dtype=ml_dtypes.float8_e5m2)
    np.testing.assert_array_equal(fp8.dequantize(w, s, (32, 32)), _reference(w, s, (32, 32)))


def test_scale_grid_that_does_not_fit_is_one_line():
    w, s = _quantised((300, 200), (128, 128))
    with pytest.raises(DSparkError, match=r"tensor x: scale shape \(3, 2\) .*\(expected \(3, 4\)\)"):
        fp8.dequantize(w, s, (128, 64), name="tensor x")
    with pytest.raises(DSparkError, match="2-D"):
        fp8.dequantize(w.reshape(-1), s, (128, 128))


def _folder(tmp_path, tensors: dict[str, np.ndarray], shards: int = 1) -> str:
    """A folder holding `tensors` over `shards` files (an index json when several)."""
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return str(tmp_path)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(tmp_path)


@pytest.mark.parametrize("suffix", [".weight_scale_inv", ".scale"])
def test_read_weight_finds_the_scale_sibling_even_in_another_shard(tmp_path, suffix):
    block = (128, 128)
    w, s = _quantised((260, 130), block)
    norm = np.linspace(0, 1, 130).astype(ml_dtypes.bfloat16)
    index = open_folder(_folder(tmp_path, {"layers.0.attn.wq_a.weight": w, "layers.0.attn.wq_a" + suffix: s,
                                           "layers.0.attn_norm.weight": norm}, shards=2))
    assert index.file_of("layers.0.attn.wq_a.weight") != index.file_of("layers.0.attn.wq_a" + suffix)
    got = fp8.read_weight(index, "layers.0.attn.wq_a.weight", block)
    np.testing.assert_array_equal(got, _reference(w, s, block))
    same = fp8.read_weight(index, "layers.0.attn_norm.weight", block)
    assert same.dtype == norm.dtype and np.array_equal(same, norm)
    assert fp8.read_weight(index, "layers.0.attn_norm.weight", None).dtype == norm.dtype


def test_float8_without_scale_or_without_config_block_is_one_line(tmp_path):
    w, s = _quantised((10, 10), (128, 128))
    index = open_folder(_folder(tmp_path, {"a.weight": w, "b.weight": w, "b.weight_scale_inv": s}))
    with pytest.raises(DSparkError) as e:
        fp8.read_weight(index, "a.weight", (128, 128))
    msg = str(e.value)
    assert "\n" not in msg and "a.weight" in msg and "model.safetensors" in msg and "scale" in msg
    with pytest.raises(DSparkError, match="b.weight in model.safetensors .*quantization_config"):
        fp8.read_weight(index, "b.weight", None)


def test_block_size_of_configs():
    assert fp8.block_size({"model_type": "deepseek_v3"}) is None
    v3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": [128, 128]}
    assert fp8.block_size({"quantization_config": v3}) == (128, 128)
    assert fp8.block_size({"quantization_config": {"quant_method": "fp8"}}) == (128, 128)
    assert fp8.block_size({"quantization_config": dict(v3, weight_block_size=[64, 32])}) == (64, 32)
    assert fp8.block_size({"quantization_config": dict(v3, activation_scheme="static",
                                                       scale_fmt="ue8m0")}) == (128, 128)


@pytest.mark.parametrize("change,field", [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({"fmt": "e5m2"}, "fmt"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
    ({"weight_block_size": [128]}, "weight_block_size"),
    ({"weight_block_size": [128, 0]}, "weight_block_size"),
])
def test_block_size_refuses_what_it_cannot_serve_naming_the_field(change, field):
    qc = dict({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, **change)
    with pytest.raises(DSparkError) as e:
        fp8.block_size({"quantization_config": qc}, "/m/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("/m/config.json") and f"quantization_config.{field}" in msg
    with pytest.raises(DSparkError, match="JSON object"):
        fp8.block_size({"quantization_config": "fp8"})


def _fp4_reference(packed, scale):
    """Element by element: column 2j is the low nibble of byte j, 2j+1 the high one."""
    rows, half = packed.shape
    out = np.zeros((rows, 2 * half), np.float32)
    for i in range(rows):
        for j in range(half):
            byte = int(packed[i, j]) & 0xFF
            for k, nib in enumerate((byte & 0x0F, byte >> 4)):
                out[i, 2 * j + k] = fp8.E2M1[nib] * float(scale[i, (2 * j + k) // 32])
    return out


def test_fp4_dequantize_equals_the_elementwise_rule_and_the_nibble_order_matters():
    rng = np.random.default_rng(3)
    packed = rng.integers(-128, 128, (5, 40), dtype=np.int8)           # 80 inputs: a partial last group
    scale = (2.0 ** rng.integers(-4, 4, (5, 3))).astype(ml_dtypes.float8_e8m0fnu)
    got = fp8.dequantize_fp4(packed, scale)
    np.testing.assert_array_equal(got, _fp4_reference(packed, scale))
    swapped = ((packed.view(np.uint8) >> 4) | (packed.view(np.uint8) << 4)).view(np.int8)
    assert not np.array_equal(fp8.dequantize_fp4(swapped, scale), got)   # high nibble first: wrong
    with pytest.raises(DSparkError, match="fp4 scale shape"):
        fp8.dequantize_fp4(packed, scale[:, :2])


def test_read_weight_unpacks_fp4_experts_and_block_size_accepts_them(tmp_path):
    rng = np.random.default_rng(4)
    packed = rng.integers(-128, 128, (4, 32), dtype=np.int8)
    scale = (2.0 ** rng.integers(-3, 3, (4, 2))).astype(ml_dtypes.float8_e8m0fnu)
    save_file({"ffn.experts.0.w1.weight": packed, "ffn.experts.0.w1.scale": scale,
               "ffn.gate.weight": np.ones((2, 3), np.float32)}, str(tmp_path / "model.safetensors"))
    index = open_folder(str(tmp_path))
    got = fp8.read_weight(index, "ffn.experts.0.w1.weight", (128, 128))
    np.testing.assert_array_equal(got, _fp4_reference(packed, scale))
    assert fp8.read_weight(index, "ffn.gate.weight", None).dtype == np.float32
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    assert fp8.block_size({"expert_dtype": "fp4", "quantization_config": qc}) == (128, 128)
    with pytest.raises(DSparkError, match="expert_dtype 'int4'"):
        fp8.block_size({"expert_dtype": "int4", "quantization_config": qc})
