"""The drafter's block attention: block queries over [paged context K/V ; block K/V].

    out = block_attention(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, sm_scale=...)

Shapes: q [B, G, Hq, D] (the G block positions: anchor + mask slots); k_pages, v_pages
[Hkv, P, page, D] (one drafter layer's context K/V pool); ctx_lens [B] int32 visible
context positions (the caller passes "strictly before the anchor"); page_table
[B, pages_per_seq] int32; k_blk, v_blk [B, G, Hkv, D] the block's own K/V. Every block
query sees context positions < ctx_len and all G block keys (bidirectional within the
block, as in dspark_jax.drafters.backbone with `block_mask`). Context slots past ctx_len
are never used, even when they hold NaN. Optional logit soft cap as in verify_attention.

Implementations as in verify_attention ("reference" | "tpu" | "gpu" | "auto"); the
kernels fold the block keys in first (they are always visible, so the running max is
finite from the start), then stream the context pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (MASK_VALUE, combine_splits, gather_pages, heads_to_rows,
                                    masked_attention, next_power_of_2, normalize,
                                    gpu_num_splits, online_softmax_update, prepare_page_table, resolve_impl,
                                    round_up, rows_to_heads, scores, sublane_multiple)

_LANES = 128


def _kv_rows(x: jax.Array, rows: int) -> jax.Array:
    """Block K/V [B, G, Hkv, D] -> [B, Hkv, rows, D] (rows >= G, zero padded)."""
    x = x.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)))


def _last_block(ctx_len, block_tokens: int):
    return jnp.maximum((ctx_len + block_tokens - 1) // block_tokens - 1, 0)


# ============================================================================= reference
def block_attention_reference(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, *,
                              sm_scale: float, softcap: float | None = None):
    """Pure jnp: gather context pages, append the block K/V, masked softmax attention."""
    b, g = q.shape[:2]
    k_ctx = gather_pages(k_pages, page_table)
    v_ctx = gather_pages(v_pages, page_table)
    s = k_ctx.shape[1]
    ctx_ok = jnp.arange(s, dtype=jnp.int32)[None, :] < ctx_lens.astype(jnp.int32)[:, None]   # [B, S]
    mask = jnp.concatenate([jnp.broadcast_to(ctx_ok[:, None, :], (b, g, s)),
                            jnp.ones((b, g, g), bool)], axis=-1)
    k = jnp.concatenate([k_ctx, k_blk.astype(k_ctx.dtype)], axis=1)
    v = jnp.concatenate([v_ctx, v_blk.astype(v_ctx.dtype)], axis=1)
    return masked_attention(q, k, v, mask, sm_scale=sm_scale, softcap=softcap).astype(q.dtype)


# ============================================================================= TPU (Mosaic)
def _block_tpu_kernel(ctx_lens_ref,   # SMEM [B] int32
                      pt_ref,         # SMEM [B * cols] int32, flattened page table
                      q_ref,          # VMEM [R, D]  rows of (block token, group head) for kv head h
                      kb_ref,         # VMEM [Gk, D] block keys of kv head h (rows >= G: zero padding)
                      vb_ref,         # VMEM [Gk, D] block values
                      *refs,          # ppb K pages [page, D], ppb V pages [page, D],
                                      # o [R, D], scratch m/l [R, 128] f32, acc [R, D] f32
                      sm_scale, softcap, block_len, page_size, pages_per_block):
    del pt_ref  # only the index maps read it
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block:2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
    b, j = pl.program_id(0), pl.program_id(2)
    ctx_len = ctx_lens_ref[b]
    blk = page_size * pages_per_block
    rows = q_ref.shape[0]

    @pl.when(j == 0)
    def _init_with_block():
        s = scores(q_ref[...], kb_ref[...], sm_scale=sm_scale, softcap=softcap)     # [R, Gk]
        mask = lax.broadcasted_iota(jnp.int32, s.shape, 1) < block_len
        m0 = jnp.full((rows, 1), MASK_VALUE, jnp.float32)
        m, l, acc = online_softmax_update(s, mask, vb_ref[...], m0, jnp.zeros((rows, 1), jnp.float32),
                                          jnp.zeros(acc_ref.shape, jnp.float32))
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(j <= _last_block(ctx_len, blk))
    def _context_step():
        # Sublane concatenation of whole pages: page_size a multiple of 8 (16 for bf16).
        k = jnp.concatenate([r[...] for r in k_refs], axis=0) if pages_per_block > 1 else k_refs[0][...]
        v = jnp.concatenate([r[...] for r in v_refs], axis=0) if pages_per_block > 1 else v_refs[0][...]
        s = scores(q_ref[...], k, sm_scale=sm_scale, softcap=softcap)              # [R, blk]
        mask = j * blk + lax.broadcasted_iota(jnp.int32, s.shape, 1) < ctx_len
        v_ok = j * blk + lax.broadcasted_iota(jnp.int32, v.shape, 0) < ctx_len
        v = jnp.where(v_ok, v, jnp.zeros((), v.dtype))
        m, l, acc = online_softmax_update(s, mask, v, m_ref[...][:, :1], l_ref[...][:, :1], acc_ref[...])
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = normalize(acc_ref[...], l_ref[...][:, :1]).astype(o_ref.dtype)


def _block_tpu(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, *, sm_scale, softcap,
               pages_per_block, interpret):
    b, g, hq, d = q.shape
    hkv, num_pages, page, _ = k_pages.shape
    rows = round_up(g * (hq // hkv), max(sublane_multiple(q.dtype), sublane_multiple(k_pages.dtype)))
    # Block keys padded to whole sublane tiles (and masked): keeps the [R, Gk] logits
    # aligned, and avoids Mosaic's matrix-vector path for G == 1 (it failed to lower in bf16).
    gk = round_up(g, sublane_multiple(k_pages.dtype))
    ppb = max(1, min(pages_per_block, page_table.shape[1]))
    nblk = pl.cdiv(page_table.shape[1], ppb)
    cols = nblk * ppb
    blk = ppb * page
    pt = prepare_page_table(page_table, num_pages, cols).reshape(-1)

    def page_map(i):
        def index_map(bi, h, j, ctx_lens_ref, pt_ref):
            jj = jnp.minimum(j, _last_block(ctx_lens_ref[bi], blk))   # no new DMA past the context
            return h, pt_ref[bi * cols + jj * ppb + i], 0, 0
        return pl.BlockSpec((None, None, page, d), index_map)

    row_spec = pl.BlockSpec((None, None, rows, d), lambda bi, h, j, *_: (bi, h, 0, 0))
    blk_spec = pl.BlockSpec((None, None, gk, d), lambda bi, h, j, *_: (bi, h, 0, 0))
    kernel = functools.partial(_block_tpu_kernel, sm_scale=sm_scale, softcap=softcap, block_len=g,
                               page_size=page, pages_per_block=ppb)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, nblk),
            in_specs=[row_spec, blk_spec, blk_spec] + [page_map(i) for i in range(ppb)] * 2,
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                            pltpu.VMEM((rows, _LANES), jnp.float32),
                            pltpu.VMEM((rows, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_attention_tpu",
    )(ctx_lens.astype(jnp.int32), pt, heads_to_rows(q.astype(k_pages.dtype), hkv, rows), _kv_rows(k_blk, gk),
      _kv_rows(v_blk, gk), *([k_pages] * ppb), *([v_pages] * ppb))
    return rows_to_heads(out, g, hq)


# ============================================================================= GPU (Triton)
def _block_gpu_kernel(ctx_len_ref,    # [1] int32
                      pt_ref,         # [cols] int32 page ids of this sequence
                      q_ref,          # [R, D]  rows of (block token, group head), R a power of two >= 16
                      kb_ref,         # [Gk, D] block keys, Gk a power of two >= 16 (rows >= G are padding)
                      vb_ref,         # [Gk, D]
                      k_ref,          # [P, page, D] this kv head's context pool
                      v_ref,          # [P, page, D]
                      o_ref,          # [R, D] f32 unnormalised partial output of this split
                      m_ref,          # [R] f32
                      l_ref,          # [R] f32
                      *, sm_scale, softcap, block_len, page_size, pages_per_block, blocks_per_split):
    split = pl.program_id(2)
    ctx_len = ctx_len_ref[0]
    blk = page_size * pages_per_block
    rows, d = q_ref.shape
    q = q_ref[...]
    # Block keys: folded in by split 0 only (other splits mask them out).
    s = scores(q, kb_ref[...], sm_scale=sm_scale, softcap=softcap)
    mask = (lax.broadcasted_iota(jnp.int32, s.shape, 1) < block_len) & (split == 0)
    init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    carry = online_softmax_update(s, mask, vb_ref[...], *init)

    kcol = lax.broadcasted_iota(jnp.int32, (rows, blk), 1)
    vrow = lax.broadcasted_iota(jnp.int32, (blk, d), 0)

    def body(i, carry):
        ids = pt_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[ids].reshape(blk, d)
        v = v_ref[ids].reshape(blk, d)
        s = scores(q, k, sm_scale=sm_scale, softcap=softcap)
        v = jnp.where(i * blk + vrow < ctx_len, v, jnp.zeros((), v.dtype))
        return online_softmax_update(s, i * blk + kcol < ctx_len, v, *carry)

    start = split * blocks_per_split
    stop = jnp.minimum(_last_block(ctx_len, blk) + 1, start + blocks_per_split)
    m, l, acc = lax.fori_loop(start, stop, body, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _block_gpu(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, *, sm_scale, softcap,
               pages_per_block, num_splits, num_warps, num_stages, interpret):
    b, g, hq, d = q.shape
    hkv, num_pages, page, _ = k_pages.shape
    rows = next_power_of_2(max(g * (hq // hkv), 16))
    gk = next_power_of_2(max(g, 16))
    ppb = next_power_of_2(max(1, min(pages_per_block, page_table.shape[1])))
    nblk = pl.cdiv(page_table.shape[1], ppb)
    splits = gpu_num_splits(nblk, b * hkv, num_splits)
    per_split = pl.cdiv(nblk, splits)
    cols = splits * per_split * ppb
    pt = prepare_page_table(page_table, num_pages, cols)

    kernel = functools.partial(_block_gpu_kernel, sm_scale=sm_scale, softcap=softcap, block_len=g,
                               page_size=page, pages_per_block=ppb, blocks_per_split=per_split)
    pool_spec = pl.BlockSpec((None, num_pages, page, d), lambda bi, h, s: (h, 0, 0, 0))
    blk_spec = pl.BlockSpec((None, None, gk, d), lambda bi, h, s: (bi, h, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda bi, h, s: (bi, h, s, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[pl.BlockSpec((1,), lambda bi, h, s: (bi,)),
                  pl.BlockSpec((None, cols), lambda bi, h, s: (bi, 0)),
                  pl.BlockSpec((None, None, rows, d), lambda bi, h, s: (bi, h, 0, 0)),
                  blk_spec, blk_spec, pool_spec, pool_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda bi, h, s: (bi, h, s, 0, 0)),
                   stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="block_attention_gpu",
    )(ctx_lens.astype(jnp.int32), pt, heads_to_rows(q.astype(k_pages.dtype), hkv, rows), _kv_rows(k_blk, gk),
      _kv_rows(v_blk, gk), k_pages, v_pages)
    return rows_to_heads(combine_splits(o, m, l).astype(q.dtype), g, hq)


# ============================================================================= entry point
@functools.partial(jax.jit, static_argnames=("sm_scale", "softcap", "impl", "interpret", "pages_per_block",
                                             "num_splits", "num_warps", "num_stages"))
def block_attention(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, *, sm_scale: float,
                    softcap: float | None = None, impl: str = "auto", interpret=False,
                    pages_per_block: int | None = None, num_splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 2):
    """Drafter block attention -> [B, G, Hq, D] (see the module docstring).

    Block-size arguments as in `verify_attention`.
    """
    b, g, hq, d = q.shape
    hkv, _, page, dk = k_pages.shape
    if hq % hkv or v_pages.shape != k_pages.shape or dk != d:
        raise ValueError(f"block_attention: q {q.shape} does not fit pages {k_pages.shape} / {v_pages.shape}")
    if k_blk.shape != (b, g, hkv, d) or v_blk.shape != k_blk.shape:
        raise ValueError(f"block_attention: k_blk {k_blk.shape} / v_blk {v_blk.shape} must be {(b, g, hkv, d)}")
    if ctx_lens.shape != (b,) or page_table.shape[0] != b:
        raise ValueError(f"block_attention: ctx_lens {ctx_lens.shape} and page_table {page_table.shape} "
                         f"must have batch {b}")
    impl = resolve_impl(impl, interpret)
    if impl == "reference":
        return block_attention_reference(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk,
                                         sm_scale=sm_scale, softcap=softcap)
    k_blk, v_blk = k_blk.astype(k_pages.dtype), v_blk.astype(v_pages.dtype)
    if impl == "tpu":
        return _block_tpu(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, sm_scale=sm_scale,
                          softcap=softcap, pages_per_block=pages_per_block or max(1, 256 // page),
                          interpret=interpret)
    return _block_gpu(q, k_pages, v_pages, ctx_lens, page_table, k_blk, v_blk, sm_scale=sm_scale,
                      softcap=softcap, pages_per_block=pages_per_block or max(1, 64 // page),
                      num_splits=num_splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
