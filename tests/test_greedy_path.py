"""The greedy program: when every kept row is greedy (SamplingParams.greedy, a static
promise) rounds draw by argmax and accept by argmax matching, without building
distributions or splitting keys. It must give exactly what the general rule gives on
greedy rows, and the engine may promise it only while no sampled request is seated:
a sampled request next to greedy ones keeps sampling (a promise broken there would turn
its draws into argmaxes, which the last test shows the check catches)."""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import sampling, target
from dspark_jax.engine import Engine
from dspark_jax.engine import round as engine_round
from dspark_jax.engine.slots import SlotTable
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter

TARGET = os.path.join(FIXTURES, "qwen3_tiny_untied")


def test_argmax_is_jnp_argmax():
    """The first maximum (ties are common in low-precision logits), the first NaN."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (6, 3, 257)).astype(np.float32)
    x[0, :, 3] = np.nan
    x[1, :, 5] = -np.inf
    x[2] = -np.inf
    for y in (x, x.astype(jnp.bfloat16), rng.normal(size=(64, 2048)).astype(np.float32)):
        want = np.asarray(jnp.argmax(jnp.asarray(y), axis=-1))
        np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(jnp.asarray(y))), want)


def test_greedy_accept_is_rejection_sampling_on_one_hots():
    """On greedy rows (one-hot p and q) accept_drafts keeps drafts while they equal the
    target's argmax, then takes the argmax after them: greedy_accept, whatever the keys."""
    rng = np.random.default_rng(1)
    b, g, v = 64, 5, 7
    logits = jnp.asarray(rng.integers(0, 3, (b, g + 1, v)).astype(np.float32))  # ties included
    best = np.asarray(jnp.argmax(logits, axis=-1))
    # drafts that match the argmax for a random prefix, then may not
    draft = np.where(rng.random((b, g)) < 0.8, best[:, :g], rng.integers(0, v, (b, g)))
    depth = jnp.asarray(rng.integers(0, g + 1, b))
    sp = sampling.SamplingParams.make(b, 0.0)
    assert sp.greedy
    p = sampling.warp(logits, sp.promise_greedy(False))
    q = jax.nn.one_hot(jnp.asarray(draft), v)
    keys = jax.random.split(jax.random.key(2), b)
    n, nxt = sampling.accept_drafts(keys, jnp.asarray(draft), q, p, depth)
    n_g, nxt_g = sampling.greedy_accept(jnp.asarray(draft), logits, depth)
    np.testing.assert_array_equal(np.asarray(n_g), np.asarray(n))
    np.testing.assert_array_equal(np.asarray(nxt_g), np.asarray(nxt))
    assert 0 < int(np.sum(np.asarray(n) < np.asarray(depth))) < b  # both outcomes occur


def test_the_promise_follows_the_temperatures():
    assert sampling.SamplingParams.make(3, 0.0).greedy
    assert not sampling.SamplingParams.make(3, [0.0, 0.7, 0.0]).greedy
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 11)).astype(np.float32))
    keys = jax.random.split(jax.random.key(4), 3)
    plain = sampling.SamplingParams.make(3, 0.0).promise_greedy(False)
    np.testing.assert_array_equal(np.asarray(sampling.draw(keys, logits, plain.promise_greedy(True))),
                                  np.asarray(sampling.sample_rows(keys, sampling.warp(logits, plain))))


@pytest.fixture(scope="module")
def pair():
    tcfg, tparams = target.load(TARGET)
    drafter, dparams = make_block_drafter(tcfg, block_size=3)
    return tcfg, tparams, drafter, dparams


def mixed_batch(pair, monkeypatch, seeds=range(6)):
    """A greedy request beside a sampled one (T = 2), once per seed -> (the greedy
    request's tokens per run, the sampled request's tokens per run, the (promise, sampled
    request taking part) pairs the rounds ran under)."""
    tcfg, tparams, drafter, dparams = pair
    engine = Engine(tcfg, tparams, drafter, dparams, slots=2, max_len=32, policy="fixed", buckets=(8,))
    greedy, sampled, promises = [], [], set()
    run_rounds = engine_round.rounds
    params = inspect.signature(run_rounds)

    def watched_rounds(*args, **kwargs):
        state = params.bind(*args, **kwargs).arguments["state"]
        # the promise the rounds run under, and whether a sampled request takes part
        active = ~np.asarray(state.done)
        promises.add((state.sampling.greedy, bool(np.any(active & (np.asarray(state.sampling.temperature) > 0)))))
        return run_rounds(*args, **kwargs)

    monkeypatch.setattr(engine_round, "rounds", watched_rounds)
    for seed in seeds:
        g = engine.submit([5, 101, 7, 8, 9], max_new_tokens=8)
        s = engine.submit([5, 101, 7, 8, 9], max_new_tokens=8, temperature=2.0, seed=seed)
        engine.run_until_done()
        greedy.append(engine.result(g).token_ids)
        sampled.append(engine.result(s).token_ids)
    return greedy, sampled, promises


def test_a_sampled_request_keeps_the_engine_off_the_greedy_program(pair, monkeypatch):
    tcfg, tparams, _, _ = pair
    want = target.greedy_decode(tcfg, tparams, [[5, 101, 7, 8, 9]], 8, max_len=32)[0]
    greedy, sampled, promises = mixed_batch(pair, monkeypatch)
    assert (False, True) in promises and (True, True) not in promises  # greedy only when alone
    assert all(g == want for g in greedy)
    assert len({tuple(s) for s in sampled}) >= 3  # the seeds draw different continuations


def test_a_broken_promise_is_caught(pair, monkeypatch):
    """Forcing the greedy program on the mixed batch turns the sampled request's draws
    into argmaxes: every seed then gives the greedy continuation, which the check above
    rejects."""
    monkeypatch.setattr(SlotTable, "all_greedy", lambda self: True)
    greedy, sampled, _ = mixed_batch(pair, monkeypatch)
    assert len({tuple(s) for s in sampled}) == 1 and sampled[0] == greedy[0]


def test_warmup_compiles_both_programs(pair):
    """Traffic that mixes greedy and sampled requests switches programs; warmup (by
    default) compiles both, so serving such traffic compiles no round and no prefill."""
    tcfg, tparams, drafter, dparams = pair
    engine = Engine(tcfg, tparams, drafter, dparams, slots=2, max_len=32, policy="fixed", buckets=(8,))
    engine.warmup([5])
    compiled = engine_round.rounds._cache_size(), engine_round.prefill._cache_size()
    engine.submit([5, 101, 7, 8, 9], max_new_tokens=8)
    engine.submit([5, 101, 7, 8, 9], max_new_tokens=8, temperature=2.0, seed=1)
    engine.run_until_done()
    engine.submit([5, 101, 7], max_new_tokens=4)  # greedy alone again
    engine.run_until_done()
    assert {key[4] for key in engine.metrics.programs if key[0] == "round"} == {True, False}  # both ran
    assert (engine_round.rounds._cache_size(), engine_round.prefill._cache_size()) == compiled
