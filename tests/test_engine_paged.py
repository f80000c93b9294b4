"""The engine on the paged KV cache: the paged model pass equals the slot-cache pass; at
temperature 0 every request equals plain greedy decoding (staggered arrivals, more
requests than slots, a pool so small that requests wait for pages), also with the Pallas
kernel switched on (interpret mode); pages are reserved on admission, released on
finish, never shared, and thousands of requests leak none."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from dspark_jax.engine import Engine
from dspark_jax.engine.results import PendingRequest, RequestResult
from dspark_jax.engine.slots import SlotTable
from dspark_jax.paged_cache import NULL_PAGE, PageAllocator, PagedKVCache
from tests.test_engine import FULL, GAMMA, MAX_LEN, NEW, PROMPTS, SLOTS, SPS, TARGET, slot_oracle

PAGE = 4


@pytest.fixture(scope="module")
def pair():
    tcfg, tparams = target.load(TARGET)
    ref = target.greedy_decode(tcfg, tparams, PROMPTS, max(NEW), max_len=MAX_LEN)
    return tcfg, tparams, [r[:n] for r, n in zip(ref, NEW)]


def _paged_like(tcfg, batch, pages_per_seq, num_pages, rng):
    """A paged cache whose rows own disjoint, shuffled pages (row b: table row b)."""
    cache = PagedKVCache.init(num_layers=tcfg.num_hidden_layers, num_pages=num_pages, page_size=PAGE,
                              kv_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim, batch=batch,
                              pages_per_seq=pages_per_seq, dtype=tcfg.jnp_dtype)
    perm = rng.permutation(np.arange(1, num_pages))[:batch * pages_per_seq].reshape(batch, pages_per_seq)
    return cache.replace(page_table=jnp.asarray(perm, jnp.int32))


def test_paged_model_pass_equals_slot_cache(pair):
    tcfg, tparams, _ = pair
    rng = np.random.default_rng(0)
    s, w, pps = 3, 4, MAX_LEN // PAGE
    plen = np.array([3, 7, 1], np.int32)
    pre = rng.integers(4, tcfg.vocab_size, (s, 8)).astype(np.int32)
    dense = target.init_cache(tcfg, s, MAX_LEN)
    paged = _paged_like(tcfg, s, pps, s * pps + 2, rng)
    want, dense, _ = target.prefill(tcfg, tparams, jnp.asarray(pre), jnp.asarray(plen), dense)
    got, paged, _ = target.prefill(tcfg, tparams, jnp.asarray(pre), jnp.asarray(plen), paged)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(paged.lengths, plen)
    # a dense multi-token step and the packed pass (both layouts) against the slot cache
    q_lens = np.array([4, 0, 2], np.int32)
    tokens = rng.integers(4, tcfg.vocab_size, (s, w)).astype(np.int32)
    want, dense_after, want_taps = target.step(tcfg, tparams, jnp.asarray(tokens), jnp.asarray(q_lens),
                                               jax.tree.map(jnp.copy, dense), (0,))
    got, paged_after, got_taps = target.step(tcfg, tparams, jnp.asarray(tokens), jnp.asarray(q_lens),
                                             jax.tree.map(jnp.copy, paged), (0,))
    valid = np.arange(w)[None] < q_lens[:, None]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_taps[0])[valid], np.asarray(want_taps[0])[valid], atol=1e-5)
    np.testing.assert_array_equal(paged_after.lengths, plen + q_lens)
    idx = np.flatnonzero(valid)
    rows, cols = idx // w, idx % w
    budget = 8
    pad = budget - len(idx)
    for query_block in (None, w):
        got, after, _ = target.step_packed(
            tcfg, tparams, jnp.asarray(np.pad(tokens.reshape(-1)[idx], (0, pad))), jnp.asarray(np.pad(rows, (0, pad))),
            jnp.asarray(np.pad(plen[rows] + cols, (0, pad), constant_values=MAX_LEN)),
            jnp.asarray(np.pad(np.ones(len(idx), bool), (0, pad))), jax.tree.map(jnp.copy, paged), (0,),
            query_block=query_block)
        np.testing.assert_allclose(np.asarray(got)[:len(idx)], np.asarray(want)[rows, cols], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(after.lengths, plen)  # the caller commits
        np.testing.assert_allclose(after.k_pages, paged_after.k_pages, atol=1e-5)  # same slots written


def _run(engine, prompts, new, arrivals, check_every_step=True):
    """Staggered arrivals; after every step: allocator invariants, each seated request owns
    its reservation, the pages of different requests are disjoint. Returns the results
    and whether a request ever waited for pages with a slot free."""
    ids, step, waited = {}, 0, False
    table = engine.table
    alloc = table.allocator
    while step <= max(arrivals) or not engine.idle:
        for i in arrivals.get(step, []):
            ids[i] = engine.submit(prompts[i], max_new_tokens=new[i], seed=i)
        engine.step()
        step += 1
        if check_every_step:
            alloc.check()
            live = [r.result.request_id for r in table.req if r is not None]
            owned = [p for rid in live for p in alloc.pages(rid)]
            assert len(owned) == len(set(owned)) == alloc.num_used and NULL_PAGE not in owned
            for r in table.req:
                if r is not None:
                    want = table.reserve_tokens(len(r.prompt), r.result.max_new_tokens)
                    assert len(alloc.pages(r.result.request_id)) == -(-want // PAGE)
            if table.waiting and table.free():
                head = table.waiting[0]
                need = table.reserve_tokens(len(head.prompt), head.result.max_new_tokens)
                waited |= not alloc.can_allocate(head.result.request_id, need)
    return [engine.result(ids[i]) for i in range(len(prompts))], waited


def _assert_drained(engine):
    alloc = engine.table.allocator
    alloc.check()
    assert alloc.num_used == 0 and alloc.num_free == alloc.capacity
    assert all(r is None for r in engine.table.req) and not engine.table.waiting
    assert np.all(engine.table.page_table(4) == NULL_PAGE)


def test_paged_engine_equals_greedy_and_waits_for_pages(pair):
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    # the largest request reserves ceil((9 + 10 + GAMMA + 1) / 4) = 6 pages: 12 usable pages
    # hold two requests at most, often fewer, so free slots sit idle while requests wait
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS + 1, max_len=MAX_LEN, policy="production",
                    sps=np.concatenate([SPS, SPS[-1:].repeat(GAMMA + 1)]), buckets=(2, (SLOTS + 1) * (GAMMA + 1)),
                    paged=True, page_size=PAGE, num_pages=13)
    assert engine.paged and isinstance(engine._state.cache, PagedKVCache)
    assert engine.prefill_chunk == 0  # paged admission is by prefill passes
    results, waited = _run(engine, PROMPTS, NEW, {0: [0, 1, 2], 1: [3], 3: [4, 5]})
    assert waited, "the small pool should have made a request wait with a slot free"
    for res, want in zip(results, ref):
        assert res.error is None and res.finished and res.token_ids == want, res.request_id
        assert res.finish_reason == "length"
    assert max(r.tau for r in results if r.rounds) > 1.5  # real acceptances happened
    _assert_drained(engine)


def test_paged_engine_kernel_interpret_equals_greedy(pair):
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed", sps=SPS,
                    buckets=(FULL,), paged=True, page_size=PAGE, attention_impl="gpu", attention_interpret=True)
    assert engine._state.cache.impl == "gpu" and engine._state.cache.interpret
    picks = [0, 2, 3]  # three requests through two slots
    results, _ = _run(engine, [PROMPTS[i] for i in picks], [NEW[i] for i in picks], {0: [0, 1], 1: [2]})
    for res, i in zip(results, picks):
        assert res.error is None and res.token_ids == ref[i], i
    _assert_drained(engine)


def test_paged_engine_refuses_a_request_larger_than_the_pool(pair):
    tcfg, tparams, _ = pair
    engine = Engine(tcfg, tparams, None, None, slots=SLOTS, max_len=MAX_LEN, policy="none", paged=True,
                    page_size=PAGE, num_pages=4)
    rid = engine.submit(PROMPTS[2], max_new_tokens=10)
    err = engine.result(rid).error
    assert err and "\n" not in err and "pages" in err and engine.result(rid).finished
    assert engine.result(rid).finish_reason == "error"
    assert engine.idle and engine.table.allocator.num_used == 0


def test_paged_admission_soak_never_leaks():
    """Thousands of tiny requests through the slot table's host-side admission / release
    (no device rounds): reservations are exact, first come first served, pages never
    shared, nothing leaks."""
    slots, gamma = 6, GAMMA
    table = SlotTable(slots, gamma, 4, PageAllocator(24, PAGE))
    alloc, rng = table.allocator, np.random.default_rng(0)
    total, finished = 3000, 0
    for i in range(total):
        res = RequestResult(i, 0, int(rng.integers(1, 12)))
        prompt = [5 + i % 50] * int(rng.integers(1, 8))
        table.waiting.append(PendingRequest(res, prompt, 0.0, 0, 1.0, i, (), gamma, None))
    order = []
    while finished < total:
        for s, req in table.take_waiting():
            assert table.req[s] is req
            order.append(req.result.request_id)
            want = -(-(len(req.prompt) + req.result.max_new_tokens + gamma + 1) // PAGE)
            assert len(alloc.pages(req.result.request_id)) == want
        if table.waiting and table.free():  # the head waits only when it does not fit
            head = table.waiting[0]
            assert not alloc.can_allocate(head.result.request_id,
                                          table.reserve_tokens(len(head.prompt), head.result.max_new_tokens))
        live = [r.result.request_id for r in table.req if r is not None]
        assert live, "a waiting request must fit once the pool drains"
        pt = table.page_table(8)
        used = pt[pt != NULL_PAGE]
        assert len(used) == len(set(used.tolist())) == alloc.num_used
        for s in rng.permutation(slots)[:int(rng.integers(1, 3))]:  # one or two finish
            if table.req[s] is not None:
                req = table.unseat(int(s))
                assert req.result.request_id not in alloc and table.req[s] is None
                finished += 1
        if finished % 200 == 0:
            alloc.check()
    assert order == list(range(total))  # first come, first served
    assert not table.occupied() and not table.waiting
    alloc.check()
    assert alloc.num_used == 0 and alloc.num_free == alloc.capacity
