"""One mesh: parsing, logical-axis rules, and sharded == unsharded on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dspark_jax import mesh as mesh_lib
from dspark_jax import target
from dspark_jax.config import qwen3_tiny
from dspark_jax.errors import DSparkError


@pytest.mark.parametrize("spec,want", [("8x1", (8, 1)), ("4x2", (4, 2)), ("1x1", (1, 1)), (" 2X4 ", (2, 4))])
def test_parse_mesh(spec, want):
    assert mesh_lib.parse_mesh(spec) == want


@pytest.mark.parametrize("bad", ["8", "8x", "x1", "0x1", "8x1x1", "axb", "", "-1x8"])
def test_parse_mesh_rejects(bad):
    with pytest.raises(DSparkError, match="DATAxMODEL"):
        mesh_lib.parse_mesh(bad)


def test_mesh_needs_enough_devices():
    with pytest.raises(DSparkError, match="needs 16 devices"):
        mesh_lib.make_mesh("16x1")


def test_rules_map_logical_axes_and_skip_indivisible():
    mesh = mesh_lib.make_mesh("4x2")
    spec = mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh)
    assert spec == P(None, "model", None)
    # FSDP table puts embed on data as well
    spec = mesh_lib.logical_to_spec(("embed", "mlp"), (64, 128), mesh, mesh_lib.TRAINING_RULES)
    assert spec == P("data", "model")
    # 3 kv heads do not split over 2 devices: replicated instead of failing
    assert mesh_lib.logical_to_spec(("kv_heads",), (3,), mesh) == P(None)
    assert mesh_lib.logical_to_spec(("batch", "seq"), (8, 5), mesh) == P("data", None)
    with pytest.raises(DSparkError, match="no mesh rule"):
        mesh_lib.logical_to_spec(("nonsense",), (4,), mesh)


def _run(cfg, params, tokens, lengths, steps, mesh=None):
    cache = target.init_cache(cfg, tokens.shape[0], 32)
    if mesh is not None:
        params = target.shard(cfg, params, mesh)
        cache = target.shard_cache(cache, mesh)
        put = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh, x.ndim, x.shape[0]))  # noqa: E731
        tokens, lengths, steps = put(tokens), put(lengths), put(steps)
    last, cache, taps = target.prefill(cfg, params, tokens, lengths, cache, tap_layers=(0, 2))
    logits, cache, _ = target.step(cfg, params, steps, jnp.full((tokens.shape[0],), 3, jnp.int32), cache)
    return [np.asarray(x) for x in (last, logits, cache.k, taps[1])]


@pytest.mark.parametrize("spec", ["8x1", "4x2", "2x4"])
def test_sharded_equals_unsharded(spec):
    cfg = qwen3_tiny()
    params = target.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 9)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 10, 8), jnp.int32)
    steps = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 4)), jnp.int32)
    ref = _run(cfg, params, tokens, lengths, steps)
    mesh = mesh_lib.make_mesh(spec)
    got = _run(cfg, params, tokens, lengths, steps, mesh)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # the parameters really are split: q_proj's heads over `model`
    sharded = target.shard(cfg, params, mesh)
    q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "model", None)
