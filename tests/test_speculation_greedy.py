"""Temperature 0: speculative output == plain greedy decoding, token for token.

Every drafter and head, random per-request depth patterns, mixed prompt lengths, 1 and
8 devices; an oracle drafter drives real acceptances (random drafters are mostly
rejected), and padded slots are shown to be inert.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import generation, speculate, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from tests.helpers import OracleDrafter, make_block_drafter

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [40]]
NEW = 20


@pytest.fixture(scope="module")
def pair():
    tcfg, tparams = target.load(os.path.join(FIXTURES, "qwen3_tiny_untied"))
    plain = generation.generate(tcfg, tparams, PROMPTS, max_new_tokens=NEW,
                                sampling=SamplingParams.make(len(PROMPTS)), seeds=range(len(PROMPTS)))
    return tcfg, tparams, [c.token_ids for c in plain]


def random_depths(gamma, seed):
    rng = np.random.default_rng(seed)
    return lambda state: jnp.asarray(rng.integers(0, gamma + 1, state.anchor.shape[0]), jnp.int32)


def spec_ids(tcfg, tparams, drafter, dparams, **kw):
    comps = generation.generate(tcfg, tparams, PROMPTS, max_new_tokens=NEW, sampling=SamplingParams.make(len(PROMPTS)),
                                seeds=range(len(PROMPTS)), drafter=drafter, dparams=dparams,
                                gamma=drafter.gamma, **kw)
    return [c.token_ids for c in comps], comps


@pytest.mark.parametrize("head,rank,confidence,with_markov", [
    ("vanilla", 16, True, True), ("gated", 16, True, False), ("rnn", 8, False, True), ("vanilla", 0, False, True),
])
def test_block_drafters_equal_greedy(pair, head, rank, confidence, with_markov):
    tcfg, tparams, ref = pair
    drafter, dparams = make_block_drafter(tcfg, head=head, rank=rank, confidence=confidence,
                                          with_markov=with_markov)
    got, comps = spec_ids(tcfg, tparams, drafter, dparams, depth_fn=random_depths(drafter.gamma, 0))
    assert got == ref
    assert all(c.rounds >= 1 for c in comps)


def _oracle(tcfg, ref, corrupt_rate, gamma, seed=0):
    length = max(len(p) for p in PROMPTS) + NEW + gamma + 4
    toks = np.zeros((len(PROMPTS), length), np.int32)
    for i, (p, r) in enumerate(zip(PROMPTS, ref)):
        seq = p + r
        toks[i, :len(seq)] = seq
    corrupt = np.random.default_rng(seed).random(toks.shape) < corrupt_rate
    return OracleDrafter(gamma, tcfg.vocab_size), {"ref": jnp.asarray(toks), "corrupt": jnp.asarray(corrupt)}


@pytest.mark.parametrize("corrupt_rate,fixed_depth", [(0.0, None), (0.3, None), (0.3, 2), (0.0, 0)])
def test_oracle_acceptances_equal_greedy(pair, corrupt_rate, fixed_depth):
    tcfg, tparams, ref = pair
    drafter, dparams = _oracle(tcfg, ref, corrupt_rate, gamma=4)
    kw = {"verify_depth": fixed_depth} if fixed_depth is not None else {"depth_fn": random_depths(4, 1)}
    got, comps = spec_ids(tcfg, tparams, drafter, dparams, **kw)
    assert got == ref
    taus = [c.tau for c in comps]
    if corrupt_rate == 0.0 and fixed_depth is None:
        assert max(taus) > 2.0  # real multi-token acceptances happened
    if fixed_depth == 0:
        assert taus == [1.0] * len(PROMPTS)
    # accepted_per_position is conditional: position k counted only after 1..k-1 accepted
    for c in comps:
        assert all(a >= b for a, b in zip(c.accepted_per_position, c.accepted_per_position[1:]))


def test_stop_tokens_and_max_new_tokens(pair):
    tcfg, tparams, ref = pair
    drafter, dparams = _oracle(tcfg, ref, 0.0, gamma=4)
    stop = ref[0][6]
    comps = generation.generate(tcfg, tparams, PROMPTS, max_new_tokens=9, sampling=SamplingParams.make(4),
                                seeds=range(4), drafter=drafter, dparams=dparams, gamma=4, stop_ids=[stop])
    for c, r in zip(comps, ref):
        want = r[:9]
        if stop in want:
            want = want[:want.index(stop) + 1]
        assert c.token_ids == want


def test_sharded_8_devices_equal_greedy(pair):
    tcfg, tparams, ref = pair
    mesh = mesh_lib.make_mesh("8x1")
    drafter, dparams = make_block_drafter(tcfg, head="vanilla")
    got, _ = spec_ids(tcfg, target.shard(tcfg, tparams, mesh), drafter, drafter.shard(dparams, mesh),
                      depth_fn=random_depths(drafter.gamma, 2))
    assert got == ref
    mesh = mesh_lib.make_mesh("4x2")
    oracle, oparams = _oracle(tcfg, ref, 0.2, gamma=4)
    got, _ = spec_ids(tcfg, target.shard(tcfg, tparams, mesh), oracle, oparams,
                      depth_fn=random_depths(4, 3))
    assert got == ref


def test_padded_draft_slots_are_inert(pair):
    """Changing draft tokens beyond each request's depth changes neither output nor caches."""
    tcfg, tparams, ref = pair
    drafter, dparams = _oracle(tcfg, ref, 0.0, gamma=4)
    tokens, lengths = generation.pad_prompts(PROMPTS)
    b = len(PROMPTS)
    depth = jnp.array([0, 1, 2, 3], jnp.int32)

    def run(corrupt_beyond):
        p = dict(dparams)
        if corrupt_beyond:  # corrupt every position past start + depth
            pos = np.arange(p["ref"].shape[1])[None, :]
            start = np.asarray(lengths)[:, None]
            p["corrupt"] = jnp.asarray(pos > start + np.asarray(depth)[:, None])
        cache = target.init_cache(tcfg, b, 64)
        state = speculate.start(tcfg, drafter, tparams, p, tokens, lengths, cache, drafter.init_cache(b, 64),
                                jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32)), SamplingParams.make(b),
                                jnp.full((b,), 10, jnp.int32), jnp.full((b, 1), -1, jnp.int32), max_new_cap=10)
        state, info = speculate.spec_round(tcfg, drafter, 4, tparams, p, state, depth)
        return jax.device_get((state, info))

    (s1, i1), (s2, i2) = run(False), run(True)
    assert not np.array_equal(i1.draft, i2.draft)  # the masked slots really differ
    np.testing.assert_array_equal(i1.accepted, depth)
    for a, b_ in [(s1.out, s2.out), (s1.n_out, s2.n_out), (s1.cache.k, s2.cache.k), (s1.cache.v, s2.cache.v),
                  (s1.cache.lengths, s2.cache.lengths), (s1.anchor, s2.anchor)]:
        np.testing.assert_array_equal(a, b_)
