"""Routed (sparse) mixture-of-experts MLPs: each token runs only the experts it is sent to.

    y = routed_experts(x, weights, index, gate_up, down, jax.nn.silu)

The N*K (token, expert) assignments are sorted by expert, their rows gathered, and two
grouped matmuls (one group per expert) compute down_e @ (act(gate_e x) * up_e x) for each
row; the rows are weighted by the router and summed back per token. Shapes are static
(every assignment has a row), so it jits and differentiates.

Expert parallelism: when a mesh whose expert mesh axis (`expert` in dspark_jax/mesh.py's
rules, i.e. `model`) has size > 1 and divides X is the current mesh (`jax.set_mesh`),
the call becomes a `shard_map`: each device holds X / M experts, runs them on the tokens
routed to them (tokens stay sharded over the batch axis) and a psum over the expert axis
adds the partial outputs. Without such a mesh the single-device path runs; jit's sharding
propagation still makes it correct for sharded parameters, only not sparse per device.

The grouped matmul is `jax.lax.ragged_dot` on TPU (a native grouped GEMM). On CPU jax
lowers ragged_dot to a masked product over every group, and XLA:GPU by default rewrites
it the same way (X times the work), so there rows are padded per expert to whole tiles
and each tile multiplies its own expert's weights: on GPU one batched matmul over the
tiles (weights gathered per tile), on CPU a loop over the tiles in use (small batched
matmuls are slow on XLA:CPU).

`dense_experts` (every expert on every token, router-weighted mix) is the reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dspark_jax import mesh as mesh_lib
from dspark_jax.errors import DSparkError

Act = Callable[[jax.Array], jax.Array]

# mesh axes the logical `expert` and `batch` axes map to (the same in both rule tables)
_EXPERT_AXIS = dict(mesh_lib.SERVING_RULES)["expert"]
_TOKEN_AXIS = dict(mesh_lib.SERVING_RULES)["batch"]


def _check(x, weights, index, gate_up, down) -> None:
    n, d = x.shape
    num, two, inter, d2 = gate_up.shape
    if (two, d2) != (2, d) or down.shape != (num, d, inter):
        raise DSparkError(f"expert weights gate_up {gate_up.shape} / down {down.shape} do not fit x {x.shape} "
                          "(want gate_up [X, 2, I, d], down [X, d, I])")
    if weights.shape != index.shape or weights.shape[0] != n:
        raise DSparkError(f"router weights {weights.shape} and index {index.shape} must both be [N={n}, K]")


def _glu(gu: jax.Array, act: Act, limit: float | None) -> jax.Array:
    """[..., 2, I] float32 (gate, up) -> act(gate) * up, with DeepSeek-V4's clamp when `limit`."""
    gate, up = gu[..., 0, :], gu[..., 1, :]
    if limit is not None:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return act(gate) * up


def dense_experts(x, weights, index, gate_up, down, act: Act, limit: float | None = None) -> jax.Array:
    """Reference: every expert on every token; the router weights (zero off the top-K) mix them.

    x [N, d], weights [N, K] float32, index [N, K] int32, gate_up [X, 2, I, d], down [X, d, I]
    -> [N, d] in x's dtype; float32 accumulation.
    """
    _check(x, weights, index, gate_up, down)
    gu = jnp.einsum("nd,xgfd->nxgf", x.astype(gate_up.dtype), gate_up, preferred_element_type=jnp.float32)
    h = _glu(gu, act, limit).astype(down.dtype)                                           # [N, X, I]
    y = jnp.einsum("nxf,xdf->nxd", h, down, preferred_element_type=jnp.float32)           # [N, X, d]
    mix = (jax.nn.one_hot(index, gate_up.shape[0], dtype=jnp.float32) * weights[..., None]).sum(-2)
    return jnp.einsum("nx,nxd->nd", mix, y).astype(x.dtype)


def _tile_rows(rows: int, groups: int) -> int:
    """Tile height of the tiled grouped matmuls: about a quarter of the mean group size, 8..128."""
    t = 8
    while t < 128 and 4 * t <= rows // max(groups, 1):
        t *= 2
    return t


def _to_tiles(lhs: jax.Array, sizes: jax.Array, groups: int, t: int):
    """Pad each group's rows (lhs [m, k], sorted by group) to whole tiles of t rows.

    -> (padded rows [tiles * t, k], group of each tile [tiles], padded position of each row
    [m] (out of range past sum(sizes)), tiles in use); `tiles` is the static bound
    m / t + min(groups, m): at most one partial tile per non-empty group.
    """
    m, k = lhs.shape
    tiles = -(-m // t) + min(groups, m)
    ends = jnp.cumsum(sizes)
    padded = -(-sizes // t) * t
    pad_ends = jnp.cumsum(padded)
    row = jnp.arange(m, dtype=sizes.dtype)
    grp = jnp.searchsorted(ends, row, side="right")  # `groups` past the last group
    gc = jnp.minimum(grp, groups - 1)
    pos = jnp.where(grp < groups, pad_ends[gc] - padded[gc] + row - (ends[gc] - sizes[gc]), tiles * t)
    lhs_p = jnp.zeros((tiles * t, k), lhs.dtype).at[pos].set(lhs, mode="drop")
    starts = jnp.arange(tiles, dtype=sizes.dtype) * t
    tile_grp = jnp.minimum(jnp.searchsorted(pad_ends, starts, side="right"), groups - 1)
    return lhs_p, tile_grp, pos, pad_ends[-1] // t


def _batched_gmm(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    """Grouped matmul as one batched matmul over tiles, each with its group's matrix
    gathered. lhs [m, k] (rows sorted by group), rhs [g, n, k], sizes [g] -> [m, n]
    float32; rows past sum(sizes) are zero."""
    (m, k), (g, n, _) = lhs.shape, rhs.shape
    t = _tile_rows(m, g)
    lhs_p, tile_grp, pos, _ = _to_tiles(lhs, sizes, g, t)
    out = jnp.einsum("tsk,tnk->tsn", lhs_p.reshape(-1, t, k), rhs[tile_grp], preferred_element_type=jnp.float32)
    return out.reshape(-1, n).at[pos].get(mode="fill", fill_value=0)


def _looped_gmm(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    """The same contract as a loop over tiles that multiplies the tiles in use only and
    reads each tile's matrix in place (no gathered copy of the weights)."""
    (m, k), (g, n, _) = lhs.shape, rhs.shape
    t = _tile_rows(m, g)
    lhs_p, tile_grp, pos, used = _to_tiles(lhs, sizes, g, t)

    def tile(out, i):
        def multiply(out):
            a = jax.lax.dynamic_slice_in_dim(lhs_p, i * t, t)                      # [t, k]
            w = jax.lax.dynamic_index_in_dim(rhs, tile_grp[i], keepdims=False)     # [n, k]
            y = jnp.dot(a, w.T, preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(out, y, i * t, 0)
        return jax.lax.cond(i < used, multiply, lambda o: o, out), None

    zeros = jnp.zeros_like(lhs_p, jnp.float32, shape=(lhs_p.shape[0], n))  # varies where lhs does (shard_map)
    out, _ = jax.lax.scan(tile, zeros, jnp.arange(lhs_p.shape[0] // t))
    return out.at[pos].get(mode="fill", fill_value=0)


def _ragged_gmm(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    """The same contract through jax.lax.ragged_dot_general (rhs contracted on its last axis)."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(lhs, rhs, sizes, dims, preferred_element_type=jnp.float32)


def _gmm(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    return jax.lax.platform_dependent(lhs, rhs, sizes, tpu=_ragged_gmm, cpu=_looped_gmm, default=_batched_gmm)


def _local_experts(x, weights, index, gate_up, down, act, limit, first) -> jax.Array:
    """Run the experts held here (global ids first .. first + X_local - 1) on the
    assignments routed to them; other assignments contribute zero. -> [N, d] float32."""
    n, d = x.shape
    k = index.shape[1]
    num, _, inter, _ = gate_up.shape
    local = index.reshape(-1).astype(jnp.int32) - first
    key = jnp.where((local >= 0) & (local < num), local, num)   # foreign assignments sort last
    order = jnp.argsort(key, stable=True)
    sizes = jnp.zeros((num,), jnp.int32).at[key].add(1, mode="drop")
    rows = x.astype(gate_up.dtype)[order // k]                   # [N*K, d]
    gu = _gmm(rows, gate_up.reshape(num, 2 * inter, d), sizes).reshape(-1, 2, inter)
    h = _glu(gu, act, limit).astype(down.dtype)
    y_sorted = _gmm(h, down, sizes)                              # [N*K, d] float32
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = y_sorted[inverse].reshape(n, k, d)
    return jnp.einsum("nk,nkd->nd", weights.astype(jnp.float32), y)


def _expert_mesh(num_experts: int):
    """The current mesh when it splits the experts over the expert axis, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or _EXPERT_AXIS not in mesh.axis_names or mesh.manual_axes:  # not inside a shard_map
        return None
    size = mesh.shape[_EXPERT_AXIS]
    return mesh if size > 1 and num_experts % size == 0 else None


def routed_experts(x, weights, index, gate_up, down, act: Act, limit: float | None = None) -> jax.Array:
    """Sparse MoE: y[n] = sum_k weights[n, k] * down[e] @ (act(gate[e] x[n]) * up[e] x[n]), e = index[n, k].

    x [N, d] (any float dtype), weights [N, K] float32 (already normalised/scaled),
    index [N, K] int32 in [0, X), gate_up [X, 2, I, d] (gate = [:, 0], up = [:, 1]),
    down [X, d, I], act e.g. jax.nn.silu; `limit` clamps gate from above and up to
    [-limit, limit] before act(gate) * up. -> [N, d] in x's dtype; float32 accumulation.
    Under a current mesh with the expert axis > 1, experts run sharded (module docstring).
    """
    _check(x, weights, index, gate_up, down)
    mesh = _expert_mesh(gate_up.shape[0])
    if mesh is None:
        return _local_experts(x, weights, index, gate_up, down, act, limit, 0).astype(x.dtype)

    tok = _TOKEN_AXIS if _TOKEN_AXIS in mesh.axis_names and x.shape[0] % mesh.shape[_TOKEN_AXIS] == 0 else None
    per_device = gate_up.shape[0] // mesh.shape[_EXPERT_AXIS]

    def shard(xs, ws, ix, gu, dn):
        first = jax.lax.axis_index(_EXPERT_AXIS) * per_device
        return jax.lax.psum(_local_experts(xs, ws, ix, gu, dn, act, limit, first), _EXPERT_AXIS)

    y = jax.shard_map(shard, mesh=mesh,
                      in_specs=(P(tok), P(tok), P(tok), P(_EXPERT_AXIS), P(_EXPERT_AXIS)),
                      out_specs=P(tok))(x, weights, index, gate_up, down)
    return y.astype(x.dtype)
