"""Temperature 0: speculative output == plain greedy decoding, token for token.

Every drafter and head, random per-request depth limits and (threshold policy) depths
that vary round by round, mixed prompt lengths, 1 and 8 devices; an oracle drafter
drives real acceptances (random drafters are mostly rejected), and draft slots past a
request's depth are shown to be inert.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import generation, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.engine import Engine
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
    """A random depth limit in [0, gamma] per prompt (the fixed policy's max_depths)."""
    return np.random.default_rng(seed).integers(0, gamma + 1, len(PROMPTS))


@dataclasses.dataclass(frozen=True)
class ConfidentOracle(OracleDrafter):
    """The oracle, reporting confidences dparams["conf"] [B, L] by absolute position: under
    the threshold policy its depths vary round by round and row by row."""

    def propose(self, dparams, tparams, dcache, anchor, start, sampling, keys):
        tok, q, _ = super().propose(dparams, tparams, dcache, anchor, start, sampling, keys)
        conf = dparams["conf"]
        pos = jnp.clip(start[:, None] + 1 + jnp.arange(self.gamma)[None, :], 0, conf.shape[1] - 1)
        return tok, q, jnp.take_along_axis(conf, pos, axis=1)


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
    runs = [dict(max_depths=random_depths(drafter.gamma, 0))]
    if confidence:  # depths from the confidence head, varying round by round
        runs.append(dict(policy="threshold"))
    for kw in runs:
        got, comps = spec_ids(tcfg, tparams, drafter, dparams, **kw)
        assert got == ref, kw
        assert all(c.rounds >= 1 for c in comps)


def _oracle(tcfg, ref, corrupt_rate, gamma, seed=0):
    length = max(len(p) for p in PROMPTS) + NEW + gamma + 4
    toks = np.zeros((len(PROMPTS), length), np.int32)
    for i, (p, r) in enumerate(zip(PROMPTS, ref)):
        seq = p + r
        toks[i, :len(seq)] = seq
    rng = np.random.default_rng(seed)
    corrupt = rng.random(toks.shape) < corrupt_rate
    # confidences (read by the threshold policy only): mostly above its 0.5, now and then below
    conf = np.where(rng.random(toks.shape) < 0.8, 0.9, 0.1).astype(np.float32)
    return ConfidentOracle(gamma, tcfg.vocab_size), {"ref": jnp.asarray(toks), "corrupt": jnp.asarray(corrupt),
                                                     "conf": jnp.asarray(conf)}


@pytest.mark.parametrize("corrupt_rate,fixed_depth", [(0.0, None), (0.3, None), (0.3, 2), (0.0, 0)])
def test_oracle_acceptances_equal_greedy(pair, corrupt_rate, fixed_depth):
    tcfg, tparams, ref = pair
    drafter, dparams = _oracle(tcfg, ref, corrupt_rate, gamma=4)
    if fixed_depth is not None:
        runs = [{"verify_depth": fixed_depth}]
    else:  # random per-request limits; depths varying round by round (threshold on the confidences)
        runs = [{"max_depths": random_depths(4, 1)}, {"policy": "threshold"}]
    for kw in runs:
        got, comps = spec_ids(tcfg, tparams, drafter, dparams, **kw)
        assert got == ref, kw
        taus = [c.tau for c in comps]
        if corrupt_rate == 0.0 and fixed_depth is None:
            assert max(taus) > 2.0, kw  # real multi-token acceptances happened
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
    drafter, dparams = make_block_drafter(tcfg, head="vanilla")
    got, _ = spec_ids(tcfg, tparams, drafter, dparams, mesh=mesh_lib.make_mesh("8x1"),
                      max_depths=random_depths(drafter.gamma, 2))
    assert got == ref
    oracle, oparams = _oracle(tcfg, ref, 0.2, gamma=4)
    got, _ = spec_ids(tcfg, tparams, oracle, oparams, mesh=mesh_lib.make_mesh("4x2"), policy="threshold")
    assert got == ref


@dataclasses.dataclass(frozen=True)
class CorruptPast(OracleDrafter):
    """The oracle with clean references, its drafts past index dparams["past"][row]
    (0-based) replaced by wrong tokens in every round."""

    def propose(self, dparams, tparams, dcache, anchor, start, sampling, keys):
        tok, _, conf = super().propose(dparams, tparams, dcache, anchor, start, sampling, keys)
        wrong = jnp.arange(self.gamma)[None, :] >= dparams["past"][:, None]
        tok = jnp.where(wrong, (tok + 1) % self.vocab, tok)
        return tok, jax.nn.one_hot(tok, self.vocab), conf


def test_padded_draft_slots_are_inert(pair):
    """Changing the draft tokens past each request's depth changes neither the output nor
    any round's verified depth or acceptances (they are never verified, and nothing of
    them reaches the caches: the later rounds' outputs would show it)."""
    tcfg, tparams, ref = pair
    _, dparams = _oracle(tcfg, ref, 0.0, gamma=4)
    depth = [0, 1, 2, 3]

    def run(past):
        p = dict(dparams, past=jnp.asarray(past, jnp.int32))
        e = Engine(tcfg, tparams, CorruptPast(4, tcfg.vocab_size), p, slots=len(PROMPTS), max_len=64,
                   policy="fixed", trace=True)
        ids = [e.submit(prompt, max_new_tokens=NEW, max_depth=d) for prompt, d in zip(PROMPTS, depth)]
        e.run_until_done()
        return [e.result(i) for i in ids]

    clean, corrupt = run([4] * len(PROMPTS)), run(depth)
    assert [r.token_ids for r in clean] == [r.token_ids for r in corrupt] == ref
    for c, w, d in zip(clean, corrupt, depth):
        drafts_c, drafts_w = ([t["draft_tokens"] for t in r.trace] for r in (c, w))
        if d < 4:
            assert drafts_c != drafts_w  # the slots past the depth really differ
        for r in (c, w):
            # every round verifies its depth (less only where max_new_tokens leaves no room)
            # and accepts all of it (the drafts up to the depth are right)
            assert [t["accepted"] for t in r.trace] == [t["verify_depth"] for t in r.trace]
            assert r.trace[0]["verify_depth"] == d and all(t["verify_depth"] <= d for t in r.trace)
        assert [(t["verify_depth"], t["accepted"]) for t in c.trace] == \
            [(t["verify_depth"], t["accepted"]) for t in w.trace]
        assert c.rounds == w.rounds
