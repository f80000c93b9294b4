"""Chunked prefill mixed into the engine's rounds: a prompt chunk riding along in a
verification pass computes what a dense pass computes; at temperature 0 every request
still equals greedy decoding with prompts split into several chunks; at temperature 1 a
request samples exactly the tokens it samples when admitted by a separate prefill pass
(same keys); a drafter's prompt lines ingest into their own rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from dspark_jax.engine import Engine
from tests.test_engine import ADAPTIVE, FULL, MAX_LEN, NEW, PROMPTS, SLOTS, SPS, pair, run_staggered, slot_oracle

assert pair  # a fixture, used by name


def test_tail_lines_equal_a_dense_pass(pair):
    """Row 0 verifies 2 tokens after a 3-token context while row 1's 5-token prompt chunk
    rides along as a tail line: logits and cache equal one dense [2, 5] step."""
    tcfg, tparams, _ = pair
    cache = target.init_cache(tcfg, 2, 16)
    _, cache, _ = target.prefill(tcfg, tparams, jnp.asarray([[3, 4, 5], [0, 0, 0]], jnp.int32),
                                 jnp.asarray([3, 0], jnp.int32), cache)
    grid = jnp.asarray([[7, 8, 0, 0, 0], [11, 12, 13, 14, 15]], jnp.int32)
    def copy(c):  # the passes donate their cache
        return jax.tree.map(jnp.copy, c)

    dense, dense_cache, _ = target.step(tcfg, tparams, grid, jnp.asarray([2, 5], jnp.int32), copy(cache))

    budget = 4  # two verified tokens and two empty packed slots
    tokens = jnp.concatenate([grid[0, :2], jnp.zeros((2,), jnp.int32), grid[1]])
    rows = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1, 1], jnp.int32)
    positions = jnp.concatenate([jnp.asarray([3, 4, 0, 0], jnp.int32), jnp.arange(5, dtype=jnp.int32)])
    valid = jnp.asarray([True, True, False, False] + [True] * 5)
    for query_block in (None, 2):
        logits, packed_cache, _ = target.step_packed(tcfg, tparams, tokens, rows, positions, valid, copy(cache),
                                                     query_block=query_block, tail=(1, 5))
        np.testing.assert_allclose(np.asarray(logits[:2]), np.asarray(dense[0, :2]), atol=2e-4)
        np.testing.assert_allclose(np.asarray(logits[budget:]), np.asarray(dense[1]), atol=2e-4)
        for a, b in ((packed_cache.k, dense_cache.k), (packed_cache.v, dense_cache.v)):
            np.testing.assert_allclose(np.asarray(a)[:, 0, :5], np.asarray(b)[:, 0, :5], atol=1e-6)
            np.testing.assert_allclose(np.asarray(a)[:, 1, :5], np.asarray(b)[:, 1, :5], atol=1e-6)


@pytest.mark.parametrize("policy", ["fixed", "production"])
def test_chunked_prefill_equals_greedy(pair, policy):
    """Chunks of 3 tokens: the longer prompts enter over several rounds while the other
    slot decodes; every request still equals greedy decoding, streamed the same."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
                    buckets=ADAPTIVE if policy == "production" else (FULL,), prefill_chunk=3)
    assert engine.prefill_chunk == 3
    streamed = {}
    results = run_staggered(engine, streamed)
    for res, want in zip(results, ref):
        assert res.error is None and res.token_ids == want, (policy, res.request_id)
        assert streamed[res.request_id] == want
    m = engine.metrics
    mixed = m.prefill_chunks
    assert mixed > 3, m.as_dict()  # some prompts went in chunks while the other slot decoded
    assert m.tokens == sum(NEW)


def test_chunked_admission_samples_like_a_prefill_pass(pair):
    """Plain decoding at temperature 1: a request's keys do not depend on how it was
    admitted, so a chunked admission must sample exactly the separate pass's tokens. A
    first token drawn from the wrong position or with the wrong key would differ."""
    tcfg, tparams, _ = pair

    def sampled(chunk):
        engine = Engine(tcfg, tparams, slots=SLOTS, max_len=MAX_LEN, policy="none", prefill_chunk=chunk,
                        buckets=(SLOTS,))  # one bucket: fewer (slow) sampling programs to compile
        arrivals = {0: [0, 1, 2], 1: [3], 3: [4, 5]}
        ids, step = {}, 0
        while step <= max(arrivals) or not engine.idle:
            for i in arrivals.get(step, []):
                ids[i] = engine.submit(PROMPTS[i], max_new_tokens=NEW[i], temperature=1.0, seed=100 + i)
            engine.step()
            step += 1
        return [engine.result(ids[i]).token_ids for i in range(len(PROMPTS))], engine.metrics.prefill_chunks

    separate, none_mixed = sampled(0)
    chunked, mixed = sampled(2)
    assert none_mixed == 0 and mixed > 0
    assert chunked == separate
    assert len({tuple(t) for t in chunked}) > 1  # not all identical (the tokens are really sampled)


def test_prompt_lines_ingest_into_their_rows(pair, tmp_path):
    """A block drafter's `ingest_lines` (prompt chunks ingest apart from the slots) writes
    what `ingest` writes when each line sits on its row of an [S, W] grid: same K/V, same
    lengths; an empty line writes nothing. A line sent to the wrong row differs."""
    from tests.test_engine import random_block_drafter

    tcfg, tparams, _ = pair
    drafter, dparams = random_block_drafter(tcfg, tparams, tmp_path / "drafter")
    rng = np.random.default_rng(0)
    e = len(drafter.tap_layers) * tcfg.hidden_size
    base = drafter.init_cache(SLOTS + 1, MAX_LEN)
    base = base.replace(lengths=jnp.asarray([3, 5, 2], jnp.int32))
    feats = jnp.asarray(rng.normal(size=(2, 6, e)), tcfg.jnp_dtype)
    rows, start, count = jnp.asarray([2, 0], jnp.int32), jnp.asarray([2, 3], jnp.int32), jnp.asarray([6, 4])
    nxt = jnp.zeros((2, 6), jnp.int32)
    lines = drafter.ingest_lines(dparams, tparams, base, feats, nxt, rows, start, count)
    grid = jnp.zeros((SLOTS + 1, 6, e), tcfg.jnp_dtype).at[rows].set(feats)
    grid_start = jnp.asarray([3, 5, 2]).at[rows].set(start)
    grid_count = jnp.zeros((SLOTS + 1,), jnp.int32).at[rows].set(count)
    dense = drafter.ingest(dparams, tparams, base, grid, jnp.zeros((SLOTS + 1, 6), jnp.int32), grid_start, grid_count)
    for a, b in zip(jax.tree.leaves(lines), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(lines.lengths).tolist() == [7, 5, 8]
    empty = drafter.ingest_lines(dparams, tparams, base, feats, nxt, rows, start + 1, jnp.zeros((2,), jnp.int32))
    for a, b in zip(jax.tree.leaves(empty), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wrong = drafter.ingest_lines(dparams, tparams, base, feats, nxt, rows[::-1], start, count)
    assert not np.array_equal(np.asarray(wrong.k), np.asarray(dense.k))
