"""Target verification attention over a paged KV cache (decode is the q_len == 1 case).

    out = verify_attention(q, k_pages, v_pages, kv_lens, q_lens, page_table, sm_scale=...)

Shapes: q [B, T, Hq, D]; k_pages, v_pages [Hkv, P, page, D] (one layer of the pool);
kv_lens [B] int32 counts every token in the cache *including* the T new ones (already
written into the pages); q_lens [B] int32 <= T real queries per row; page_table
[B, pages_per_seq] int32 (entries past a sequence's pages may hold any id: they are
clamped into the pool and masked). Query t < q_lens[b] sits at position
kv_len - q_len + t and sees keys at positions <= its own (and, with `window`, the last
`window` of them); rows t >= q_len return zeros; K/V past kv_len are never used, even
when they hold NaN. Hq must be a multiple of Hkv (GQA); `softcap` applies
softcap * tanh(s / softcap) to the scaled logits.

Three implementations, picked by `impl`:
- "reference": gather pages into a contiguous [B, S, Hkv, D] view, masked softmax (jnp);
- "tpu": Mosaic kernel, grid (B, Hkv, page-blocks), page table / lengths as scalar
  prefetch, online softmax in VMEM scratch;
- "gpu": Triton kernel, grid (B, Hkv, KV-splits), `fori_loop` over page blocks, GQA rows
  padded to a power of two >= 16, splits merged in jnp (flash-decoding);
- "auto": by `jax.default_backend()` ("cpu" -> reference).
Both kernels also run on CPU with `interpret=True` (that is how the tests check them).
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

# TPU stats scratch is lane-dense ([R, 128], value replicated over lanes): a [R, 1] f32
# buffer would occupy the same (8, 128) tiles anyway and needs masked stores.
_LANES = 128


def _row_mask(r, kpos, kv_len, q_len, group: int, window: int | None):
    """Visibility of key position `kpos` to query row `r` (token r // group).

    Written with multiplications only (no vector integer division, which Mosaic lacks):
    with d = kpos - (kv_len - q_len) and t = r // group,
      causal  d <= t        <=>  d * group <= r
      window  t - d < w     <=>  r < (d + w) * group
      valid   t < q_len     <=>  r < q_len * group
    (exact for integers because group > 0). The causal test also implies kpos < kv_len.
    """
    d = kpos - (kv_len - q_len)
    mask = (d * group <= r) & (r < q_len * group)
    if window is not None:
        mask &= r < (d + window) * group
    return mask


def _block_range(kv_len, q_len, block_tokens: int, window: int | None):
    """First and last page-block (of `block_tokens` keys) any valid query of the row sees."""
    hi = jnp.maximum((kv_len + block_tokens - 1) // block_tokens - 1, 0)
    if window is None:
        return jnp.int32(0), hi
    lo = jnp.maximum(kv_len - q_len - window + 1, 0) // block_tokens
    return lo, hi


# ============================================================================= reference
def verify_attention_reference(q, k_pages, v_pages, kv_lens, q_lens, page_table, *, sm_scale: float,
                               window: int | None = None, softcap: float | None = None):
    """Pure jnp: gather the pages into a contiguous cache, then masked softmax attention."""
    b, t = q.shape[:2]
    k = gather_pages(k_pages, page_table)
    v = gather_pages(v_pages, page_table)
    s = k.shape[1]
    kv_lens = kv_lens.astype(jnp.int32)
    q_lens = q_lens.astype(jnp.int32)
    steps = jnp.arange(t, dtype=jnp.int32)
    q_pos = (kv_lens - q_lens)[:, None] + steps[None, :]            # [B, T]
    q_ok = steps[None, :] < q_lens[:, None]
    k_pos = jnp.arange(s, dtype=jnp.int32)
    k_ok = k_pos[None, :] < kv_lens[:, None]                         # [B, S]
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_ok[:, :, None] & k_ok[:, None, :]
    if window is not None:
        mask &= (q_pos[:, :, None] - k_pos[None, None, :]) < window
    return masked_attention(q, k, v, mask, sm_scale=sm_scale, softcap=softcap).astype(q.dtype)


# ============================================================================= TPU (Mosaic)
def _verify_tpu_kernel(kv_lens_ref,   # SMEM [B] int32
                       q_lens_ref,    # SMEM [B] int32
                       pt_ref,        # SMEM [B * cols] int32, flattened page table
                       q_ref,         # VMEM [R, D]   rows of (token, group head) for kv head h
                       *refs,         # ppb K pages [page, D], ppb V pages [page, D],
                                      # o [R, D], scratch m/l [R, 128] f32, acc [R, D] f32
                       sm_scale, softcap, window, group, page_size, pages_per_block):
    del pt_ref  # only the index maps read it
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block:2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
    b, j = pl.program_id(0), pl.program_id(2)
    kv_len, q_len = kv_lens_ref[b], q_lens_ref[b]
    blk = page_size * pages_per_block
    lo, hi = _block_range(kv_len, q_len, blk, window)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= lo) & (j <= hi))
    def _step():
        # Pages are concatenated along the sublane axis: page_size should be a multiple of
        # 8 (16 for bf16) so this is a tile-aligned copy, and blk a multiple of 128 keeps
        # the [R, blk] logits lane-dense.
        k = jnp.concatenate([r[...] for r in k_refs], axis=0) if pages_per_block > 1 else k_refs[0][...]
        v = jnp.concatenate([r[...] for r in v_refs], axis=0) if pages_per_block > 1 else v_refs[0][...]
        rows = q_ref.shape[0]
        s = scores(q_ref[...], k, sm_scale=sm_scale, softcap=softcap)              # [R, blk]
        r = lax.broadcasted_iota(jnp.int32, (rows, blk), 0)
        kpos = j * blk + lax.broadcasted_iota(jnp.int32, (rows, blk), 1)
        mask = _row_mask(r, kpos, kv_len, q_len, group, window)
        v_ok = j * blk + lax.broadcasted_iota(jnp.int32, v.shape, 0) < kv_len
        v = jnp.where(v_ok, v, jnp.zeros((), v.dtype))                                # NaN-safe
        m, l, acc = online_softmax_update(s, mask, v, m_ref[...][:, :1], l_ref[...][:, :1], acc_ref[...])
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = normalize(acc_ref[...], l_ref[...][:, :1]).astype(o_ref.dtype)


def _verify_tpu(q, k_pages, v_pages, kv_lens, q_lens, page_table, *, sm_scale, window, softcap,
                pages_per_block, interpret):
    b, t, hq, d = q.shape
    hkv, num_pages, page, _ = k_pages.shape
    group = hq // hkv
    rows = round_up(t * group, max(sublane_multiple(q.dtype), sublane_multiple(k_pages.dtype)))
    ppb = max(1, min(pages_per_block, page_table.shape[1]))
    nblk = pl.cdiv(page_table.shape[1], ppb)
    cols = nblk * ppb
    blk = ppb * page
    pt = prepare_page_table(page_table, num_pages, cols).reshape(-1)
    qr = heads_to_rows(q.astype(k_pages.dtype), hkv, rows)  # one dtype per matmul

    def page_map(i):
        def index_map(bi, h, j, kv_lens_ref, q_lens_ref, pt_ref):
            # Clamp the block index into the row's needed range: grid steps outside it
            # revisit the same page, so the pipeline issues no new DMA for them.
            lo, hi = _block_range(kv_lens_ref[bi], q_lens_ref[bi], blk, window)
            jj = jnp.minimum(jnp.maximum(j, lo), hi)
            return h, pt_ref[bi * cols + jj * ppb + i], 0, 0
        return pl.BlockSpec((None, None, page, d), index_map)

    row_spec = pl.BlockSpec((None, None, rows, d), lambda bi, h, j, *_: (bi, h, 0, 0))
    kernel = functools.partial(_verify_tpu_kernel, sm_scale=sm_scale, softcap=softcap, window=window,
                               group=group, page_size=page, pages_per_block=ppb)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, nblk),
            in_specs=[row_spec] + [page_map(i) for i in range(ppb)] * 2,
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                            pltpu.VMEM((rows, _LANES), jnp.float32),
                            pltpu.VMEM((rows, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="verify_attention_tpu",
    )(kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), pt, qr, *([k_pages] * ppb), *([v_pages] * ppb))
    return rows_to_heads(out, t, hq)


# ============================================================================= GPU (Triton)
def _verify_gpu_kernel(kv_len_ref,    # [1] int32
                       q_len_ref,     # [1] int32
                       pt_ref,        # [cols] int32 page ids of this sequence
                       q_ref,         # [R, D]  rows of (token, group head), R a power of two >= 16
                       k_ref,         # [P, page, D]  this kv head's pool
                       v_ref,         # [P, page, D]
                       o_ref,         # [R, D] f32, unnormalised partial output of this split
                       m_ref,         # [R] f32 running max of this split
                       l_ref,         # [R] f32 softmax denominator of this split
                       *, sm_scale, softcap, window, group, page_size, pages_per_block, blocks_per_split):
    split = pl.program_id(2)
    kv_len, q_len = kv_len_ref[0], q_len_ref[0]
    blk = page_size * pages_per_block
    rows, d = q_ref.shape
    lo, hi = _block_range(kv_len, q_len, blk, window)
    start = jnp.maximum(lo, split * blocks_per_split)
    stop = jnp.minimum(hi + 1, (split + 1) * blocks_per_split)
    q = q_ref[...]
    r = lax.broadcasted_iota(jnp.int32, (rows, blk), 0)
    kcol = lax.broadcasted_iota(jnp.int32, (rows, blk), 1)
    vrow = lax.broadcasted_iota(jnp.int32, (blk, d), 0)

    def body(i, carry):
        ids = pt_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[ids].reshape(blk, d)   # gather pages_per_block pages
        v = v_ref[ids].reshape(blk, d)
        s = scores(q, k, sm_scale=sm_scale, softcap=softcap)
        mask = _row_mask(r, i * blk + kcol, kv_len, q_len, group, window)
        v = jnp.where(i * blk + vrow < kv_len, v, jnp.zeros((), v.dtype))
        return online_softmax_update(s, mask, v, *carry)

    init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = lax.fori_loop(start, stop, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _verify_gpu(q, k_pages, v_pages, kv_lens, q_lens, page_table, *, sm_scale, window, softcap,
                pages_per_block, num_splits, num_warps, num_stages, interpret):
    b, t, hq, d = q.shape
    hkv, num_pages, page, _ = k_pages.shape
    group = hq // hkv
    rows = next_power_of_2(max(t * group, 16))
    ppb = next_power_of_2(max(1, min(pages_per_block, page_table.shape[1])))
    nblk = pl.cdiv(page_table.shape[1], ppb)
    splits = gpu_num_splits(nblk, b * hkv, num_splits)
    per_split = pl.cdiv(nblk, splits)
    cols = splits * per_split * ppb
    pt = prepare_page_table(page_table, num_pages, cols)
    qr = heads_to_rows(q.astype(k_pages.dtype), hkv, rows)  # Triton dots need one operand dtype

    kernel = functools.partial(_verify_gpu_kernel, sm_scale=sm_scale, softcap=softcap, window=window,
                               group=group, page_size=page, pages_per_block=ppb, blocks_per_split=per_split)
    pool_spec = pl.BlockSpec((None, num_pages, page, d), lambda bi, h, s: (h, 0, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda bi, h, s: (bi, h, s, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[pl.BlockSpec((1,), lambda bi, h, s: (bi,)),
                  pl.BlockSpec((1,), lambda bi, h, s: (bi,)),
                  pl.BlockSpec((None, cols), lambda bi, h, s: (bi, 0)),
                  pl.BlockSpec((None, None, rows, d), lambda bi, h, s: (bi, h, 0, 0)),
                  pool_spec, pool_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda bi, h, s: (bi, h, s, 0, 0)),
                   stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="verify_attention_gpu",
    )(kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), pt, qr, k_pages, v_pages)
    out = combine_splits(o, m, l).astype(q.dtype)   # [B, Hkv, R, D]
    return rows_to_heads(out, t, hq)


# ============================================================================= entry point
@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "softcap", "impl", "interpret",
                                             "pages_per_block", "num_splits", "num_warps", "num_stages"))
def verify_attention(q, k_pages, v_pages, kv_lens, q_lens, page_table, *, sm_scale: float,
                     window: int | None = None, softcap: float | None = None, impl: str = "auto",
                     interpret=False, pages_per_block: int | None = None, num_splits: int | None = None,
                     num_warps: int = 4, num_stages: int = 2):
    """Paged verification attention -> [B, T, Hq, D] (see the module docstring).

    Block sizes: `pages_per_block` pages are processed per grid step (TPU) or loop
    iteration (GPU; rounded to a power of two); default: about 256 (TPU) / 64 (GPU) keys.
    `num_splits` (GPU) splits each sequence's pages across programs (default: enough
    programs to fill the device). `interpret` (bool, or `pltpu.InterpretParams` for the
    TPU kernel) runs a kernel in the Pallas interpreter, e.g. on CPU.
    """
    b, t, hq, d = q.shape
    hkv, _, page, dk = k_pages.shape
    if hq % hkv or v_pages.shape != k_pages.shape or dk != d:
        raise ValueError(f"verify_attention: q {q.shape} does not fit pages {k_pages.shape} / {v_pages.shape}")
    if kv_lens.shape != (b,) or q_lens.shape != (b,) or page_table.shape[0] != b:
        raise ValueError(f"verify_attention: kv_lens {kv_lens.shape}, q_lens {q_lens.shape} and page_table "
                         f"{page_table.shape} must have batch {b}")
    impl = resolve_impl(impl, interpret)
    common = dict(sm_scale=sm_scale, window=window, softcap=softcap)
    if impl == "reference":
        return verify_attention_reference(q, k_pages, v_pages, kv_lens, q_lens, page_table, **common)
    if impl == "tpu":
        ppb = pages_per_block or max(1, 256 // page)
        return _verify_tpu(q, k_pages, v_pages, kv_lens, q_lens, page_table, pages_per_block=ppb,
                           interpret=interpret, **common)
    ppb = pages_per_block or max(1, 64 // page)
    return _verify_gpu(q, k_pages, v_pages, kv_lens, q_lens, page_table, pages_per_block=ppb,
                       num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                       interpret=interpret, **common)
