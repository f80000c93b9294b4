"""Sparse MoE (dspark_jax.models.moe): routed == dense reference, on one device and with
experts sharded over 8 simulated devices; gradients; cost grows with active experts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dspark_jax import mesh as mesh_lib
from dspark_jax.errors import DSparkError
from dspark_jax.models import moe
from dspark_jax.models.moe import dense_experts, routed_experts

ATOL = 1e-5


def _case(n=37, k=3, x=8, d=16, inter=24, seed=0, dtype=jnp.float32):
    """Random inputs where experts x-2 and x-1 get no token, each token has k distinct
    experts except token 0, routed twice to expert 1."""
    r = np.random.default_rng(seed)
    index = np.stack([r.choice(x - 2, k, replace=False) for _ in range(n)])
    index[0, :2] = 1
    return (jnp.asarray(r.normal(size=(n, d)), dtype),
            jnp.asarray(r.random((n, k)), jnp.float32),
            jnp.asarray(index, jnp.int32),
            jnp.asarray(r.normal(size=(x, 2, inter, d)) * 0.3, dtype),
            jnp.asarray(r.normal(size=(x, d, inter)) * 0.3, dtype))


@functools.cache
def _jit(fn, act=jax.nn.silu, limit=None):
    """One jitted program per (function, act, limit), so tests share compilations."""
    return jax.jit(lambda *a: fn(*a, act, limit))


@pytest.mark.parametrize("limit", [None, 0.5], ids=["plain", "limit"])
def test_routed_matches_dense(limit):
    args = _case()
    want = _jit(dense_experts, limit=limit)(*args)
    got = _jit(routed_experts, limit=limit)(*args)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    assert float(jnp.abs(want).max()) > 0.1  # not trivially zero
    if limit is not None:  # the clamp bites
        assert float(jnp.abs(want - _jit(dense_experts)(*args)).max()) > 1e-2


def test_wrong_variants_fail():
    """The comparison has teeth: swapping gate and up, or ignoring the router weights, or
    dropping the clamp, is caught at the test tolerance."""
    x, w, i, gu, dn = _case()
    want = _jit(dense_experts)(x, w, i, gu, dn)
    swapped = _jit(routed_experts)(x, w, i, gu[:, ::-1], dn)
    unweighted = _jit(routed_experts)(x, jnp.ones_like(w), i, gu, dn)
    for bad in (swapped, unweighted, _jit(routed_experts, limit=0.5)(x, w, i, gu, dn)):
        assert float(jnp.abs(bad - want).max()) > 100 * ATOL


@pytest.mark.parametrize("impl", [moe._looped_gmm, moe._batched_gmm, moe._ragged_gmm],
                         ids=["looped", "batched", "ragged_dot"])
@pytest.mark.parametrize("sizes", [[5, 0, 12, 1, 0, 3], [0, 0, 40, 0, 0, 0], [100, 2, 0, 0, 7, 0]])
def test_grouped_matmul_contract(impl, sizes):
    """Row r of group e gets lhs[r] @ rhs[e].T; rows past sum(sizes) are zero (every
    implementation, several tile heights, empty groups)."""
    r = np.random.default_rng(1)
    m = 120
    lhs = r.normal(size=(m, 6)).astype(np.float32)
    rhs = r.normal(size=(6, 5, 6)).astype(np.float32)
    group = np.repeat(np.arange(6), sizes)
    want = np.zeros((m, 5), np.float32)
    want[:len(group)] = np.einsum("mk,mnk->mn", lhs[:len(group)], rhs[group])
    got = jax.jit(impl)(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [moe._looped_gmm, moe._batched_gmm, moe._ragged_gmm],
                         ids=["looped", "batched", "ragged_dot"])
def test_grouped_matmul_gradients(impl):
    """d/d(lhs, rhs) of every implementation equal those of a per-row gather reference
    (the TPU path's ragged_dot transpose rules included)."""
    r = np.random.default_rng(2)
    sizes = jnp.asarray([5, 0, 12, 1, 0, 3], jnp.int32)
    lhs, rhs = jnp.asarray(r.normal(size=(30, 6)), jnp.float32), jnp.asarray(r.normal(size=(6, 5, 6)), jnp.float32)
    cot = jnp.asarray(r.normal(size=(30, 5)), jnp.float32)
    group = jnp.asarray(np.pad(np.repeat(np.arange(6), np.asarray(sizes)), (0, 9), constant_values=6))

    def reference(a, b, _):
        return jnp.where(group[:, None] < 6, jnp.einsum("mk,mnk->mn", a, b[jnp.minimum(group, 5)]), 0)

    grads = lambda f: jax.jit(jax.grad(lambda a, b: (f(a, b, sizes) * cot).sum(), argnums=(0, 1)))(lhs, rhs)
    for got, want in zip(grads(impl), grads(reference)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_match_dense():
    """Drafters with MoE layers train: d loss / d (x, weights, gate_up, down) agree."""
    args = _case(n=21, k=2)

    def grads(fn):
        loss = lambda x, w, gu, dn: (fn(x, w, args[2], gu, dn, jnp.tanh, 0.8) ** 2).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(args[0], args[1], args[3], args[4])

    for got, want in zip(grads(routed_experts), grads(dense_experts)):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_low_precision_keeps_dtype():
    args = _case(dtype=jnp.bfloat16)
    got = _jit(routed_experts)(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), np.float32(_jit(dense_experts)(*args)), atol=0.05, rtol=0.02)


def test_bad_shapes_are_one_line_errors():
    x, w, i, gu, dn = _case()
    with pytest.raises(DSparkError, match="do not fit"):
        routed_experts(x, w, i, gu[:, :, :, :-1], dn, jax.nn.silu)
    with pytest.raises(DSparkError, match="must both be"):
        dense_experts(x, w[:, :2], i, gu, dn, jax.nn.silu)


def _place(mesh, args):
    """x, weights, index sharded over data (batch); expert weights by their logical axes."""
    x, w, i, gu, dn = args
    tok = lambda a: jax.device_put(a, NamedSharding(mesh, mesh_lib.logical_to_spec(("batch", None), a.shape, mesh)))
    gu, dn = mesh_lib.shard_tree((gu, dn), (("expert", None, "mlp", "embed"), ("expert", "embed", "mlp")), mesh)
    return tok(x), tok(w), tok(i), gu, dn


@pytest.mark.parametrize("spec", ["2x4", "1x8"])
def test_expert_parallel_matches_dense(spec):
    """Under jax.set_mesh, experts split over `model` (8 experts / 4 or 8 devices): each
    device runs its own experts (no all-gather of the expert weights), a psum adds up."""
    mesh = mesh_lib.make_mesh(spec)
    args = _case(n=36, k=2)
    placed = _place(mesh, args)
    assert placed[3].sharding.spec == P("model", None, None, None)
    want = _jit(dense_experts, limit=0.5)(*args)
    with jax.set_mesh(mesh):
        compiled = _jit(routed_experts, limit=0.5).lower(*placed).compile()
        got, hlo = compiled(*placed), compiled.as_text()
        jaxpr = str(jax.make_jaxpr(functools.partial(routed_experts, act=jax.nn.silu))(*placed))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    assert "shard_map" in jaxpr and "all-reduce" in hlo and "all-gather" not in hlo
    local = mesh.shape["model"]
    assert f"f32[{8 // local},2,24,16]" in jaxpr  # each device sees X / model experts


def test_expert_parallel_gradients_and_fallbacks():
    """Gradients through the sharded path equal the dense ones; without a current mesh
    the single-device path runs (jit partitions it), still correct; X not divisible by
    `model` is not split (mesh.py drops the axis) and runs that path too."""
    mesh = mesh_lib.make_mesh("2x4")
    args = _case(n=20, k=2)
    placed = _place(mesh, args)
    loss = lambda fn: jax.jit(jax.grad(lambda gu, dn: (fn(placed[0], placed[1], placed[2], gu, dn,
                                                          jax.nn.silu) ** 2).sum(), argnums=(0, 1)))
    want = loss(dense_experts)(args[3], args[4])
    with jax.set_mesh(mesh):
        got = loss(routed_experts)(placed[3], placed[4])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_jit(routed_experts)(*placed), _jit(dense_experts)(*args), atol=ATOL, rtol=1e-5)
    odd = _place(mesh, _case(n=20, k=2, x=6))  # 6 experts do not split over 4 devices: replicated
    assert odd[3].sharding.spec == P(None, None, "model", None)  # I over `model` instead
    with jax.set_mesh(mesh):
        assert "shard_map" not in str(jax.make_jaxpr(functools.partial(routed_experts, act=jax.nn.silu))(*odd))


def _flops(fn, n, k, x, d=32, inter=64):
    shapes = [((n, d), jnp.float32), ((n, k), jnp.float32), ((n, k), jnp.int32),
              ((x, 2, inter, d), jnp.float32), ((x, d, inter), jnp.float32)]
    cost = _jit(fn).lower(*[jax.ShapeDtypeStruct(s, t) for s, t in shapes]).cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_cost_grows_with_active_not_total_experts():
    """FLOPs of the lowered programs: routed ~flat from 8 to 64 experts and ~linear in K; dense linear in X."""
    routed = {x: _flops(routed_experts, 128, 2, x) for x in (8, 64)}
    assert routed[64] < 2.5 * routed[8]
    assert _flops(dense_experts, 128, 2, 64) > 7 * _flops(dense_experts, 128, 2, 8)
    assert _flops(routed_experts, 128, 8, 16) > 3 * _flops(routed_experts, 128, 1, 16)


def test_gemma4_experts_run_routed():
    """Gemma 4's Experts module: its X axis is `expert` (split over `model`) and it equals
    the dense reference with gelu-tanh, on one device and expert-parallel."""
    from flax.core import meta

    from dspark_jax.models.gemma4_layers import Experts, activation

    x, w, i, gu, dn = _case(n=36, k=2, d=16)
    module = Experts(num_experts=8, hidden=16, intermediate=24)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x, w, i)["params"]
    assert boxed["gate_up_proj"].names == ("expert", None, "mlp", "embed")
    assert boxed["gate_up_proj"].value.shape == gu.shape and boxed["down_proj"].value.shape == dn.shape
    params = {"gate_up_proj": gu, "down_proj": dn}
    want = _jit(dense_experts, activation("gelu_pytorch_tanh"))(x, w, i, params["gate_up_proj"], params["down_proj"])
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x, w, i), want, atol=ATOL, rtol=1e-5)
    mesh = mesh_lib.make_mesh("1x8")
    axes = jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: isinstance(b, meta.Partitioned))
    with jax.set_mesh(mesh):
        got = jax.jit(module.apply)({"params": mesh_lib.shard_tree(params, axes, mesh)}, x, w, i)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
