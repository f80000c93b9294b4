"""Paged KV cache: allocator invariants, write/gather against the slot cache, kernels on top."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.attention import attend, causal_mask
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache, write_index, write_layer
from dspark_jax.paged_cache import (NULL_PAGE, PageAllocator, PagedKVCache, advance, gather, reset_rows,
                                    write)
from pallas_kernels.verify_attention import verify_attention


def test_allocator_random_operations_never_leak_or_share():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=64, page_size=4)
    tokens: dict[int, int] = {}
    next_id, ooms = 0, 0
    for step in range(5000):
        op = rng.integers(3)
        if op == 0 or not tokens:                       # admit
            n = int(rng.integers(0, 40))
            try:
                alloc.allocate(next_id, n)
                tokens[next_id] = n
            except DSparkError:
                ooms += 1
                assert next_id not in alloc
            next_id += 1
        elif op == 1:                                   # grow
            rid = list(tokens)[rng.integers(len(tokens))]
            n = tokens[rid] + int(rng.integers(0, 12))
            before = alloc.pages(rid)
            try:
                after = alloc.allocate(rid, n)
                tokens[rid] = n
                assert after[:len(before)] == before     # growth keeps existing pages in order
            except DSparkError:
                ooms += 1
                assert alloc.pages(rid) == before        # all or nothing
        else:                                           # release
            rid = list(tokens)[rng.integers(len(tokens))]
            assert alloc.release(rid) == -(-tokens.pop(rid) // 4)
        if step % 50 == 0:
            alloc.check()
            owned = [p for r in tokens for p in alloc.pages(r)]
            assert len(owned) == len(set(owned)) == alloc.num_used
            assert NULL_PAGE not in owned
            assert all(len(alloc.pages(r)) == -(-n // 4) for r, n in tokens.items())
    assert ooms > 0, "the pool should have run dry at least once"
    for rid in list(tokens):
        alloc.release(rid)
    alloc.check()
    assert alloc.num_free == alloc.capacity == 63 and alloc.num_used == 0


def test_allocator_errors_are_one_line():
    alloc = PageAllocator(num_pages=5, page_size=8)
    alloc.allocate("a", 17)                              # 3 pages
    with pytest.raises(DSparkError, match="out of KV cache pages") as e:
        alloc.allocate("b", 17)
    assert "\n" not in str(e.value) and "b" not in alloc and alloc.num_free == 1
    assert alloc.can_allocate("a", 32) and not alloc.can_allocate("a", 33)
    with pytest.raises(DSparkError, match="unknown request"):
        alloc.release("zzz")
    with pytest.raises(DSparkError):
        PageAllocator(num_pages=1, page_size=8)
    alloc.release("a")
    assert alloc.allocate("c", 32) == (1, 2, 3, 4)        # freed pages come back; page 0 never


def test_page_table_padding():
    alloc = PageAllocator(num_pages=16, page_size=4)
    alloc.allocate("x", 9)
    alloc.allocate("y", 1)
    table = alloc.page_table(["x", None, "y"], pages_per_seq=4)
    assert table.dtype == np.int32 and table.shape == (3, 4)
    np.testing.assert_array_equal(table[0], list(alloc.pages("x")) + [NULL_PAGE])
    np.testing.assert_array_equal(table[1], [NULL_PAGE] * 4)
    assert alloc.page_table(["x", "y"]).shape == (2, 3)
    with pytest.raises(DSparkError, match="page table has room"):
        alloc.page_table(["x"], pages_per_seq=2)


@jax.jit
def _write_both(paged, dense, layer, k, v, positions, valid):
    """The same tokens into the paged cache and into the slot cache (jitted: eager scatters are slow)."""
    paged = write(paged, layer, k, v, positions, valid)
    idx = write_index(positions, valid, dense.max_len)
    return paged, dense.replace(k=write_layer(dense.k, layer, k, idx), v=write_layer(dense.v, layer, v, idx))


def _steps(rng, batch, lengths, max_t):
    """Random multi-token steps: q_lens in [0, max_t], positions continuing each row."""
    q_lens = rng.integers(0, max_t + 1, size=batch)
    positions = lengths[:, None] + np.arange(max_t)[None, :]
    return q_lens, positions, np.arange(max_t)[None, :] < q_lens[:, None]


def test_write_gather_matches_slot_cache():
    """Same tokens through KVCache.write_layer and paged write: equal on every written slot."""
    rng = np.random.default_rng(1)
    b, t, hkv, d, page, layers = 3, 5, 2, 8, 4, 2
    alloc = PageAllocator(num_pages=32, page_size=page)
    pps = 8
    paged = PagedKVCache.init(num_layers=layers, num_pages=32, page_size=page, kv_heads=hkv, head_dim=d,
                              batch=b, pages_per_seq=pps)
    dense = KVCache.init(num_layers=layers, batch=b, max_len=pps * page, kv_heads=hkv, head_dim=d)
    lengths = np.zeros(b, np.int64)
    for _ in range(5):
        q_lens, pos, valid = _steps(rng, b, lengths, t)
        for r in range(b):
            alloc.allocate(r, int(lengths[r] + q_lens[r]))
        paged = paged.replace(page_table=jnp.asarray(alloc.page_table(range(b), pps)))
        for layer in range(layers):
            k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
            paged, dense = _write_both(paged, dense, layer, k, v, jnp.asarray(pos), jnp.asarray(valid))
        lengths += q_lens
        paged = advance(paged, jnp.asarray(q_lens))
    np.testing.assert_array_equal(paged.lengths, lengths)
    for layer in range(layers):
        gk, gv = gather(paged, layer)
        for r in range(b):
            n = int(lengths[r])
            np.testing.assert_array_equal(gk[r, :n], dense.k[layer, r, :n])
            np.testing.assert_array_equal(gv[r, :n], dense.v[layer, r, :n])
    # Nothing was written outside the owned pages (the NULL page and free pages stay zero).
    owned = sorted(p for r in range(b) for p in alloc.pages(r))
    untouched = np.setdiff1d(np.arange(32), owned)
    assert not np.asarray(paged.k_pages[:, :, untouched]).any()
    assert list(reset_rows(paged, jnp.array([True, False, True])).lengths) == [0, lengths[1], 0]


def test_write_drops_invalid_and_out_of_table_slots():
    cache = PagedKVCache.init(num_layers=1, num_pages=4, page_size=2, kv_heads=1, head_dim=1, batch=1,
                              pages_per_seq=2)
    cache = cache.replace(page_table=jnp.array([[1, 2]], jnp.int32))
    k = jnp.ones((1, 4, 1, 1))
    pos = jnp.array([[0, 3, 4, 9]])                       # 4 and 9 lie past pages_per_seq * page_size
    out = write(cache, 0, k, 2 * k, pos, jnp.array([[True, False, True, True]]))
    flat = np.asarray(out.k_pages[0, 0, :, :, 0])
    assert flat[1, 0] == 1 and flat.sum() == 1           # only position 0 landed


def test_paged_verification_matches_dense_model_path():
    """A verification step written through the paged cache and attended with the kernels
    equals the dense Qwen3 path (KVCache + causal_mask + attend)."""
    rng = np.random.default_rng(2)
    b, t, hkv, g, d, page, pps, pool = 2, 8, 2, 2, 16, 4, 6, 24
    prior = np.array([13, 6])
    q_lens = jnp.array([8, 3], jnp.int32)
    alloc = PageAllocator(num_pages=pool, page_size=page)
    paged = PagedKVCache.init(num_layers=1, num_pages=pool, page_size=page, kv_heads=hkv, head_dim=d,
                              batch=b, pages_per_seq=pps)
    dense = KVCache.init(num_layers=1, batch=b, max_len=pps * page, kv_heads=hkv, head_dim=d)
    alloc.allocate("noise", 9)                           # interleave another owner's pages
    for r in range(b):
        alloc.allocate(r, int(prior[r] + q_lens[r]))
    paged = paged.replace(page_table=jnp.asarray(alloc.page_table([0, 1], pps)),
                          lengths=jnp.asarray(prior, jnp.int32))
    # history, then the verification tokens
    hist_pos = np.arange(16)[None, :].repeat(b, 0)
    hist_valid = hist_pos < prior[:, None]
    pos = prior[:, None] + np.arange(t)[None, :]
    valid = np.arange(t)[None, :] < np.asarray(q_lens)[:, None]
    for p_, v_ in [(hist_pos, hist_valid), (pos, valid)]:
        k = jnp.asarray(rng.standard_normal((b, p_.shape[1], hkv, d)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, p_.shape[1], hkv, d)), jnp.float32)
        paged, dense = _write_both(paged, dense, 0, k, v, jnp.asarray(p_), jnp.asarray(v_))
    q = jnp.asarray(rng.standard_normal((b, t, hkv * g, d)), jnp.float32)

    @jax.jit
    def dense_attention(q, k, v, pos, valid):
        slots = jnp.broadcast_to(jnp.arange(k.shape[1]), (b, k.shape[1]))
        mask = causal_mask(pos, valid, slots, jnp.ones_like(slots, bool))
        return attend(q, k, v, mask, scale=0.25)

    want = dense_attention(q, dense.k[0], dense.v[0], jnp.asarray(pos), jnp.asarray(valid))
    kv_lens = paged.lengths + q_lens
    for impl in ("reference", "tpu"):
        got = verify_attention(q, paged.k_pages[0], paged.v_pages[0], kv_lens, q_lens, paged.page_table,
                               sm_scale=0.25, impl=impl, interpret=impl != "reference")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
