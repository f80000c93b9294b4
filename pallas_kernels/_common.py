"""Pieces shared by the paged attention kernels: masks, layouts, the online softmax.

Only jax is imported here (the kernels do not depend on `dspark_jax`). The arithmetic is
written once and used by the jnp references, the TPU (Mosaic) kernels and the GPU
(Triton) kernels, so the three agree by construction on masking and NaN handling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Same finite "minus infinity" as dspark_jax.attention.MASK_VALUE: a fully masked row
# stays finite (its probabilities are then zeroed explicitly).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "tpu", "gpu", "reference")

# q @ k.T without materialising the transpose (contract the last dim of both).
_NT_DIMS = (((1,), (1,)), ((), ()))


def resolve_impl(impl: str, interpret) -> str:
    """"auto" -> the kernel for the default backend ("reference" on CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return {"tpu": "tpu", "gpu": "gpu"}.get(backend, "reference")
    if impl in ("tpu", "gpu") and backend != impl and not interpret:
        raise ValueError(f"impl={impl!r} on a {backend} backend runs only with interpret=True")
    return impl


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def sublane_multiple(dtype) -> int:
    """TPU second-minor tile: 8 rows of 32-bit, 16 of 16-bit, 32 of 8-bit values."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def gpu_num_splits(num_blocks: int, programs: int, num_splits: int | None) -> int:
    if num_splits is None:
        # Enough programs to fill a large GPU (~132 SMs, a few programs each) when the
        # batch x kv-heads grid alone is small; never more splits than page blocks.
        num_splits = max(1, 256 // max(programs, 1))
    return max(1, min(num_splits, num_blocks))


# ----------------------------------------------------------------------------- layouts
def heads_to_rows(q: jax.Array, kv_heads: int, rows: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, Hkv, rows, D]; row r = token r // G, group head r % G (G = Hq/Hkv).

    Rows past T * G are zero padding (the kernels treat them as invalid queries).
    """
    b, t, hq, d = q.shape
    g = hq // kv_heads
    x = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))


def rows_to_heads(o: jax.Array, t: int, q_heads: int) -> jax.Array:
    """Inverse of `heads_to_rows`: [B, Hkv, rows, D] -> [B, T, Hq, D]."""
    b, hkv, _, d = o.shape
    g = q_heads // hkv
    return o[:, :, :t * g].reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, q_heads, d)


def prepare_page_table(page_table: jax.Array, num_pages: int, columns: int) -> jax.Array:
    """Clamp page ids into [0, P) (a kernel never reads outside the pool) and pad to `columns`.

    Entries past a sequence's length are masked by every reader, so padding them with page
    0 (or clamping a sentinel) only costs a read that is never used.
    """
    pt = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    return jnp.pad(pt, ((0, 0), (0, columns - pt.shape[1])))


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """[Hkv, P, page, D] pages + [B, pages_per_seq] table -> contiguous [B, pages_per_seq * page, Hkv, D]."""
    hkv, num_pages, page, d = pages.shape
    b, pps = page_table.shape
    x = pages[:, jnp.clip(page_table, 0, num_pages - 1)]  # [Hkv, B, pps, page, D]
    return x.transpose(1, 2, 3, 0, 4).reshape(b, pps * page, hkv, d)


# ----------------------------------------------------------------------------- reference
def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, sm_scale: float,
                     softcap: float | None) -> jax.Array:
    """GQA softmax attention, the arithmetic of `dspark_jax.attention.attend`.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S]. Rows with no visible key give
    zeros; V is zeroed where no query sees it, so NaN in unused slots cannot leak.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    m = mask[:, None, None, :, :]
    s = jnp.where(m, s, MASK_VALUE)
    p = jnp.where(m, jax.nn.softmax(s, axis=-1), 0.0).astype(v.dtype)
    seen = mask.any(axis=1)[:, :, None, None]
    v = jnp.where(seen, v, jnp.zeros((), v.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", p, v)
    return out.reshape(b, t, hq, v.shape[-1])


# ----------------------------------------------------------------------------- kernel math
def dot_precision(dtype):
    """The kernels' dot precision for inputs of `dtype`: full float32 for float32 inputs
    (Triton would otherwise round them to TF32, 1e-3 off the reference on an H200), the
    backend's default for narrower ones."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scores(q: jax.Array, k: jax.Array, *, sm_scale: float, softcap: float | None) -> jax.Array:
    """q [R, D] x k [K, D] -> f32 logits [R, K], scaled and optionally soft-capped."""
    s = lax.dot_general(q, k, _NT_DIMS, preferred_element_type=jnp.float32,
                        precision=dot_precision(q.dtype)) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


def online_softmax_update(s, mask, v, m, l, acc):
    """One flash-attention step over a block of K keys.

    s, mask: [R, K] logits and visibility; v: [K, Dv] (already zeroed where unwritten);
    m, l: running max / denominator, [R, 1] (TPU scratch) or [R] (GPU loop carry);
    acc: [R, Dv] f32. Starting from m = MASK_VALUE, l = 0, acc = 0, masked entries never
    contribute: p is zeroed explicitly, so an all-masked prefix (m == MASK_VALUE) cannot
    turn exp(MASK - MASK) = 1 into weight.
    """
    keep = m.ndim == 2
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=keep))
    m_b = m_new if keep else m_new[:, None]
    p = jnp.where(mask, jnp.exp(s - m_b), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=keep)
    alpha_b = alpha if keep else alpha[:, None]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=dot_precision(v.dtype))
    return m_new, l_new, alpha_b * acc + pv


def normalize(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l, with zeros for rows that saw no key (l == 0). l: [R, 1]."""
    ok = l > 0.0
    return jnp.where(ok, acc / jnp.where(ok, l, 1.0), 0.0)


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge KV-split partial results. o: [..., S, R, D] unnormalised; m, l: [..., S, R]."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - m_all)
    l_all = jnp.sum(w * l, axis=-2)
    o_all = jnp.sum(w[..., None] * o, axis=-3)
    return normalize(o_all, l_all[..., None])
