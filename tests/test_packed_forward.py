"""Gemma 4's packed pass: it computes what the dense cached call computes, and the engine
serves Gemma 4 targets with token budgets and chunked prefill.

The target is a tiny random Gemma 4 with every switch on (sliding layers with a 4-token
window, full layers, KV sharing, K = V, per-layer inputs, MoE, soft-capping). Every
prompt below is longer than the window, so a packed layout that ignored the window, or
read another row's keys, or wrote K/V to the wrong slot, would change the logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from dspark_jax.config_gemma4 import gemma4_tiny
from dspark_jax.drafters import gemma4_drafter as g4
from dspark_jax.engine import Engine
from tests.test_engine import ADAPTIVE, FULL, GAMMA, MAX_LEN, NEW, PROMPTS, SLOTS, SPS, run_staggered, slot_oracle

CFG = gemma4_tiny()
B, S, W = 3, 24, 4                       # cache rows, cache length, verification width
PROMPT_LENS = np.array([7, 10, 6])      # all longer than the 4-token window
Q_LENS = np.array([4, 2, 3])             # tokens each row verifies after its prompt
TOL = 1e-5


def fill(shapes, seed, scale=1.0):
    """Random parameters without compiling an init: matrices N(0, 0.02 * scale), vectors 1."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(
        (rng.normal(0, 0.02 * scale, s.shape) if len(s.shape) > 1 else np.ones(s.shape)).astype(s.dtype)), shapes)


def random_params(seed):
    """Random target parameters, peaked enough that greedy decoding has no near-ties."""
    return fill(target.param_shapes_and_axes(CFG)[0], seed, scale=4.0)


@pytest.fixture(scope="module")
def model():
    """(params, cache after a dense prefill of PROMPT_LENS, verification tokens [B, W])."""
    params = random_params(0)
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(4, CFG.vocab_size, (B, 16)), jnp.int32)
    _, cache, _ = target.prefill(CFG, params, prompts, jnp.asarray(PROMPT_LENS, jnp.int32),
                                 target.init_cache(CFG, B, S))
    return params, cache, np.asarray(rng.integers(4, CFG.vocab_size, (B, W)), np.int32)


def copy(cache):  # the passes donate their cache
    return jax.tree.map(jnp.copy, cache)


def assert_same_kv(got, want, upto):
    """Every K/V field of two Gemma4Caches agrees on each row's first upto[b] positions."""
    for name in ("sliding_k", "sliding_v", "full_k", "full_v"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        for r, m in enumerate(upto):
            np.testing.assert_allclose(a[:, r, :m], b[:, r, :m], atol=TOL, rtol=TOL, err_msg=f"{name} row {r}")


@pytest.mark.parametrize("layout", ["tokens", "grid", "tail"])
def test_packed_equals_dense_call(model, layout):
    """The rows' verification tokens packed into a budget with empty slots (one token per
    row, the [rows, W] grid, or row 1 as a tail line of prompt chunk) give the dense
    step's logits, taps and K/V; the cache's lengths stay the caller's to commit."""
    params, cache, tokens = model
    dense, dense_cache, dense_taps = target.step(CFG, params, jnp.asarray(tokens), jnp.asarray(Q_LENS, jnp.int32),
                                                 copy(cache), (0, 4))
    heads = [0, 2] if layout == "tail" else [0, 1, 2]
    rows = np.concatenate([np.full(Q_LENS[r], r) for r in heads])
    cols = np.concatenate([np.arange(Q_LENS[r]) for r in heads])
    budget = len(rows) + 2  # two empty slots: invalid tokens write nothing
    pad = budget - len(rows)
    p_tok = np.concatenate([tokens[rows, cols], np.zeros(pad, np.int32)])
    p_rows = np.concatenate([rows, np.zeros(pad, np.int64)])
    p_pos = np.concatenate([PROMPT_LENS[rows] + cols, np.full(pad, S)])
    p_ok = np.arange(budget) < len(rows)
    tail = None
    if layout == "tail":  # row 1 rides along as one line of W tokens, Q_LENS[1] of them real
        tail = (1, W)
        p_tok = np.concatenate([p_tok, tokens[1]])
        p_rows = np.concatenate([p_rows, np.ones(W, np.int64)])
        p_pos = np.concatenate([p_pos, PROMPT_LENS[1] + np.arange(W)])
        p_ok = np.concatenate([p_ok, np.arange(W) < Q_LENS[1]])
    logits, packed_cache, taps = target.step_packed(
        CFG, params, jnp.asarray(p_tok, jnp.int32), jnp.asarray(p_rows, jnp.int32), jnp.asarray(p_pos, jnp.int32),
        jnp.asarray(p_ok), copy(cache), (0, 4), query_block=W if layout == "grid" else None, tail=tail)
    logits, taps = np.asarray(logits), [np.asarray(t) for t in taps]
    want, want_taps = np.asarray(dense), [np.asarray(t) for t in dense_taps]
    n = len(rows)
    np.testing.assert_allclose(logits[:n], want[rows, cols], atol=TOL, rtol=TOL)
    for a, b in zip(taps, want_taps):
        np.testing.assert_allclose(a[:n], b[rows, cols], atol=TOL, rtol=TOL)
    if tail:
        line = np.arange(Q_LENS[1])
        np.testing.assert_allclose(logits[budget:][line], want[1, line], atol=TOL, rtol=TOL)
        for a, b in zip(taps, want_taps):
            np.testing.assert_allclose(a[budget:][line], b[1, line], atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(packed_cache.lengths, PROMPT_LENS)
    assert_same_kv(packed_cache, dense_cache, PROMPT_LENS + Q_LENS)


def test_packed_prefill_equals_dense_prefill(model):
    """Prompts packed into one pass on the [rows, W] grid of an empty cache: the last
    tokens' logits and the cache equal a dense prefill's."""
    params, _, _ = model
    rng = np.random.default_rng(2)
    width = 16
    prompts = rng.integers(4, CFG.vocab_size, (B, width)).astype(np.int32)
    dense, dense_cache, _ = target.prefill(CFG, params, jnp.asarray(prompts), jnp.asarray(PROMPT_LENS, jnp.int32),
                                           target.init_cache(CFG, B, S))
    valid = np.arange(width)[None] < PROMPT_LENS[:, None]
    idx = np.flatnonzero(valid)
    budget = 32
    pad = budget - len(idx)
    last = np.cumsum(PROMPT_LENS) - 1
    logits, cache, _ = target.prefill_packed(
        CFG, params, jnp.asarray(np.pad(prompts.reshape(-1)[idx], (0, pad))),
        jnp.asarray(np.pad(idx // width, (0, pad)), jnp.int32), jnp.asarray(np.pad(idx % width, (0, pad)), jnp.int32),
        jnp.asarray(np.arange(budget) < len(idx)), jnp.asarray(last, jnp.int32), target.init_cache(CFG, B, S),
        query_block=width)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), atol=TOL, rtol=TOL)
    assert_same_kv(cache, dense_cache, PROMPT_LENS)


# ------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def served():
    """A Gemma 4 target for the engine and its plain greedy reference."""
    params = random_params(3)
    ref = target.greedy_decode(CFG, params, PROMPTS, max(NEW), max_len=MAX_LEN)
    return params, [r[:n] for r, n in zip(ref, NEW)]


def block_drafter(seed=5):
    """A random Gemma 4 DSpark drafter drafting GAMMA tokens from target taps 0 and 3."""
    cfg = g4.new_config(CFG, num_layers=1, target_layer_ids=(0, 3), block_size=GAMMA, mask_token_id=3,
                        markov_rank=8, markov_head_type="vanilla", enable_confidence_head=True,
                        confidence_head_with_markov=True)
    drafter = g4.Gemma4BlockDrafter(cfg, CFG, GAMMA)
    return drafter, fill(drafter.param_shapes_and_axes()[0], seed)


@pytest.mark.parametrize("drafter,policy", [("oracle", "fixed"), ("block", "production")])
def test_engine_chunked_prefill_equals_greedy(served, drafter, policy):
    """Staggered requests, prompts entering in chunks of 3 beside decoding rows, packed
    verification (the grid layout for "fixed"'s full budget, one token per row in
    "production"'s small budget), an oracle drafter (real acceptances) or a random DSpark
    drafter fed the target's taps: every request's tokens equal plain greedy decoding."""
    params, ref = served
    if drafter == "oracle":  # drafts the reference, a quarter of it corrupted: real acceptances
        d, dparams = slot_oracle(CFG, ref)
    else:
        d, dparams = block_drafter()
    engine = Engine(CFG, params, d, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
                    buckets=ADAPTIVE if policy == "production" else (FULL,), prefill_chunk=3)
    assert engine.prefill_chunk == 3  # Gemma 4 targets take chunked prefill now
    results = run_staggered(engine)
    for res, want in zip(results, ref):
        assert res.error is None and res.token_ids == want, (drafter, policy, res.request_id)
    m = engine.metrics
    assert m.prefill_chunks > 0 and m.tokens == sum(NEW), m.as_dict()
    if drafter == "oracle":
        assert m.tokens > 2 * m.active, m.as_dict()  # most rounds accepted drafts
