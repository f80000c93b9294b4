"""Attention arithmetic shared by targets and drafters: RoPE, masks and the jnp core.

Everything here is a pure function of arrays. `attend` is the reference path (and the
CPU path); the Pallas kernels in `pallas_kernels/` compute the same thing on GPU/TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row then stays finite instead of turning NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_frequencies(head_dim: int, theta: float, rotary_dim: int | None = None) -> jax.Array:
    """Inverse frequencies [rotary_dim // 2] of the rotate-half RoPE convention."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, H, D]; positions: [B, T] int; inv_freq: [R/2] (R <= D).

    The first R features of each head rotate (pairs i and i + R/2); the rest pass through.
    """
    half = inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def causal_mask(q_pos: jax.Array, q_valid: jax.Array, k_pos: jax.Array, k_valid: jax.Array,
                window: int | None = None) -> jax.Array:
    """[B, T, S] bool: query t sees key s iff both are valid and k_pos <= q_pos
    (and, with a sliding window, q_pos - k_pos < window)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & q_valid[:, :, None] & k_valid[:, None, :]
    if window is not None:
        mask &= (qp - kp) < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
           softcap: float | None = None) -> jax.Array:
    """Grouped-query attention. q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S].

    Rows with no visible key return zeros; V is zeroed where no query can see it, so
    uninitialised (even NaN) cache slots never leak into the output. The output has the
    query's dtype (a cache may be stored wider: kv_cache.storage_dtype).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    m = mask[:, None, None, :, :]
    scores = jnp.where(m, scores, MASK_VALUE)
    probs = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    seen = mask.any(axis=1)[:, :, None, None]  # [B, S, 1, 1]
    v = jnp.where(seen, v, jnp.zeros((), v.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
