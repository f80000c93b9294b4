"""Slot-based KV caches: one fixed-length row per request, per layer.

A cache is a pytree, so it flows through `jax.jit` and can be donated. Entries at
positions >= `lengths[b]` are garbage by contract: every reader masks them, and writes
of padded query slots are dropped (scatter index out of range with mode="drop").

K/V are stored in `storage_dtype(model dtype)`: the model's dtype, except 16-bit floats
on the CPU, which keep float32 (twice the memory): XLA:CPU scatters a few positions
into a bfloat16 cache by converting the whole buffer to float32 and back, and converts
it again for every attention read (a plain round over 8 slots of the demo pair took
about 30% less time without them). bfloat16 values are exact in float32 and attention
returns the query's dtype, so the numbers differ from a bfloat16 cache's only in that
the attention weights are not rounded to bfloat16 before they weigh V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array        # [L, B, S, Hkv, D]
    v: jax.Array        # [L, B, S, Hkv, D]
    lengths: jax.Array  # [B] int32: committed tokens per request

    @classmethod
    def init(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        """An empty cache for a model computing in `dtype` (stored in storage_dtype(dtype))."""
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        dtype = storage_dtype(dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def storage_dtype(dtype):
    """The dtype a slot cache keeps K/V in for a model computing in `dtype` (see above)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


# Logical axes of each cache field (mapped to the mesh in dspark_jax/mesh.py).
KV_CACHE_AXES = KVCache(k=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
                        v=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
                        lengths=("batch",))


def write_index(positions: jax.Array, valid: jax.Array, max_len: int) -> jax.Array:
    """Cache row index of each new token; invalid slots point past the end (dropped)."""
    return jnp.where(valid, positions, max_len)


def write_layer(cache: jax.Array, layer: int, new: jax.Array, index: jax.Array) -> jax.Array:
    """Scatter new [B, T, H, D] into cache[layer] at rows index [B, T]; out-of-range rows drop."""
    b = jnp.arange(new.shape[0])[:, None]
    return cache.at[layer, b, index].set(new.astype(cache.dtype), mode="drop")


def reset_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """Mark the requests selected by the bool mask `rows` [B] as empty (length 0)."""
    return cache.replace(lengths=jnp.where(rows, 0, cache.lengths))
