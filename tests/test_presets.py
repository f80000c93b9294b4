"""Full-size presets are traced with jax.eval_shape, sharded on 8x1: nothing is allocated."""

import math

import jax
import numpy as np
import pytest

from dspark_jax import config as config_lib
from dspark_jax import mesh as mesh_lib
from dspark_jax import target
from dspark_jax.errors import DSparkError

# Published parameter counts (billions), embeddings counted once when tied.
EXPECTED_B = {"qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen3-14b": 14.77}


def bytes_per_device(shapes, axes, mesh, rules=mesh_lib.SERVING_RULES):
    per_device = 0
    for shape, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=mesh_lib._is_axes)):
        spec = mesh_lib.logical_to_spec(ax, shape.shape, mesh, rules)
        split = math.prod(mesh.shape[a] for a in spec if a is not None)
        per_device += math.prod(shape.shape) * np.dtype(shape.dtype).itemsize // split
    return per_device


@pytest.mark.parametrize("name", sorted(EXPECTED_B))
def test_full_size_preset_eval_shape_on_8x1(name, record_property):
    cfg = config_lib.preset(name, dtype="bfloat16")
    shapes, axes = target.param_shapes_and_axes(cfg)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    assert n == cfg.num_params()
    assert abs(n / 1e9 - EXPECTED_B[name]) < 0.02, n
    total = n * 2
    for spec in ("8x1", "4x2"):
        mesh = mesh_lib.make_mesh(spec)
        serve = bytes_per_device(shapes, axes, mesh)
        train = bytes_per_device(shapes, axes, mesh, mesh_lib.TRAINING_RULES)
        record_property(f"{name}_{spec}_serving_bytes_per_device", serve)
        record_property(f"{name}_{spec}_training_bytes_per_device", train)
        print(f"{name} {spec}: params {n / 1e9:.2f}B, bf16 total {total / 2**30:.2f} GiB, "
              f"serving {serve / 2**30:.2f} GiB/device, training (FSDP) {train / 2**30:.2f} GiB/device")
        # 8x1 serving replicates weights; FSDP splits them over data
        if spec == "8x1":
            assert serve == total
            assert train < total / 7
        else:
            assert serve < total * 0.51 + 2 * cfg.hidden_size * cfg.vocab_size


def test_tiny_preset_and_unknown_preset():
    assert config_lib.preset("qwen3-tiny").num_hidden_layers == 4
    with pytest.raises(DSparkError, match="unknown preset"):
        config_lib.preset("qwen3-1000b")
