"""Temperature > 0: speculative sampling has exactly the (warped) target's distribution.

On a tiny pair with a 6-token vocabulary, the joint distribution of the first three
generated tokens, sampled with speculation (a real DSpark drafter, gamma 2) in one big
batch, is compared with the exact distribution computed from the target by a chi-square
test. Four tokens are generated so that t2 and t3 both pass verification (the engine
verifies no draft past max_new_tokens). The same test is shown to FAIL for a
deliberately biased acceptance rule.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import generation, sampling, target
from dspark_jax.config import qwen3_tiny
from dspark_jax.engine import round as engine_round
from tests.helpers import make_block_drafter

V = 6
PROMPT = [1, 4, 2, 5, 0]
N = 6000


@pytest.fixture(scope="module")
def pair():
    tcfg = qwen3_tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    tparams = target.init_params(tcfg, jax.random.key(7))
    tparams = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, tparams)  # peaked, varied p
    drafter, dparams = make_block_drafter(tcfg, rank=8, layers=1, block_size=2, taps=(0,), scale=12.0, seed=3)
    return tcfg, tparams, drafter, dparams


def exact_joint(tcfg, tparams, sp):
    """P(t1, t2, t3) of plain sampling from the warped target, [V, V, V]."""
    seqs = np.array([PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    n = len(PROMPT)
    h, _, _ = target.forward(tcfg, tparams, jnp.asarray(seqs), jnp.full((len(seqs),), n + 2, jnp.int32))
    spb = sampling.SamplingParams.make(len(seqs), *sp)
    p = np.asarray(sampling.warp(target.logits(tcfg, tparams, h), spb), np.float64)
    p1 = p[0, n - 1]
    p2 = p[::V, n].reshape(V, V)          # [t1, t2]
    p3 = p[:, n + 1].reshape(V, V, V)      # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def sampled_joint(tcfg, tparams, drafter, dparams, sp):
    comps = generation.generate(tcfg, tparams, [PROMPT] * N, max_new_tokens=4,
                                sampling=sampling.SamplingParams.make(N, *sp), seeds=range(N),
                                drafter=drafter, dparams=dparams, gamma=drafter.gamma)
    counts = np.zeros((V, V, V))
    for c in comps:
        counts[tuple(c.token_ids[:3])] += 1
    rounds = sum(c.rounds for c in comps)
    return counts, rounds


def chi_square_z(counts, probs):
    """Wilson-Hilferty z-score of Pearson's chi-square (bins with expectation < 5 pooled)."""
    exp, obs = probs.ravel() * counts.sum(), counts.ravel()
    small = exp < 5
    exp = np.append(exp[~small], exp[small].sum())
    obs = np.append(obs[~small], obs[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    df = int(keep.sum()) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def biased_accept(keys, draft, q, p, depth):
    """WRONG on purpose: also accepts every draft whose q(x) >= p(x)."""
    b, g = draft.shape
    k_accept, k_next = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (g,)))(k_accept)
    p_x = jnp.take_along_axis(p[:, :g], draft[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    ok = ((u * q_x < p_x) | (q_x >= p_x)) & (jnp.arange(g)[None, :] < depth[:, None])
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    mass = residual.sum(-1, keepdims=True)
    dist = jnp.where((n < depth)[:, None] & (mass > 0), residual / jnp.where(mass > 0, mass, 1), p_n)
    return n, sampling.sample_rows(k_next, dist)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [(1.0, 0, 0.9), (0.8, 4, 1.0)], ids=["T1-top_p0.9", "T0.8-top_k4"])
def test_speculative_sampling_matches_target(pair, sp):
    tcfg, tparams, drafter, dparams = pair
    probs = exact_joint(tcfg, tparams, sp)
    counts, rounds = sampled_joint(tcfg, tparams, drafter, dparams, sp)
    # the drafter is neither perfect nor useless: some drafts are accepted, some rejected
    tau = (4 * N - N) / rounds
    assert 1.05 < tau < 2.95, tau
    z = chi_square_z(counts, probs)
    assert z < 4.0, f"speculative samples deviate from the target distribution (z={z:.2f})"


@pytest.mark.slow
def test_biased_acceptance_rule_fails_the_same_test(pair, monkeypatch):
    tcfg, tparams, drafter, dparams = pair
    sp = (1.0, 0, 0.9)
    probs = exact_joint(tcfg, tparams, sp)
    monkeypatch.setattr(engine_round, "accept_drafts", biased_accept)
    jax.clear_caches()
    try:
        counts, _ = sampled_joint(tcfg, tparams, drafter, dparams, sp)
    finally:
        jax.clear_caches()
    z = chi_square_z(counts, probs)
    assert z > 10.0, f"the biased sampler was not detected (z={z:.2f})"


def _warp_by_the_rule(logits, t, k, p):
    """One row's warp written out in numpy: greedy one-hot, or temperature, top-k, top-p."""
    if t == 0:
        return np.eye(len(logits))[np.argmax(logits)]
    z = logits / t
    if k > 0:
        z = np.where(z >= np.sort(z)[::-1][min(k, len(z)) - 1], z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = probs >= probs[order][before < p].min()
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("mix", ["greedy", "plain", "truncated", "all"])
def test_warp_branches_match_the_rule(mix):
    """warp skips its sorts (and softmax) for batches that need none; every row must still
    get exactly the rule's distribution, whichever branch the batch takes."""
    rng = np.random.default_rng(len(mix))
    b, v = 8, 40
    logits = rng.normal(size=(b, 3, v)).astype(np.float32) * 3
    t = {"greedy": np.zeros(b), "plain": rng.choice([0.0, 0.7, 1.3], b)}.get(mix, rng.choice([0.0, 0.8, 1.0], b))
    k = rng.choice([0, 3, 10], b) if mix in ("truncated", "all") else np.zeros(b, int)
    p = rng.choice([1.0, 0.5, 0.9], b) if mix in ("truncated", "all") else np.ones(b)
    if mix == "all":
        t[0], k[1], p[2] = 0.0, 5, 0.3
    got = np.asarray(sampling.warp(jnp.asarray(logits), sampling.SamplingParams.make(b, t, k, p)))
    for r in range(b):
        for s in range(3):
            np.testing.assert_allclose(got[r, s], _warp_by_the_rule(logits[r, s].astype(np.float64), t[r], k[r],
                                                                    p[r]), atol=2e-6)


def test_sample_rows_skips_the_noise_only_when_every_row_is_certain():
    """sample_rows draws by argmax (no Gumbel noise) when every row has a single nonzero
    entry, which is then every key's draw; one row with two nonzero entries sends the
    whole batch through the keyed draw, whose frequencies follow that row's
    distribution (an argmax there would give a point mass and fail)."""
    v = 16
    certain = np.zeros((4, v), np.float32)
    certain[np.arange(4), [3, 0, 15, 7]] = 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    got = np.asarray(sampling.sample_rows(keys, jnp.asarray(certain)))
    np.testing.assert_array_equal(got, [3, 0, 15, 7])
    np.testing.assert_array_equal(got, np.asarray(jax.vmap(sampling.sample)(keys, jnp.asarray(certain))))

    mixed = certain.copy()
    mixed[2] = 0.0
    mixed[2, [1, 9]] = [0.3, 0.7]
    probs = jnp.asarray(mixed)
    runs = jax.random.split(jax.random.PRNGKey(1), 600)
    rows = np.asarray(jax.jit(jax.vmap(lambda k: sampling.sample_rows(jax.random.split(k, 4), probs)))(runs))
    keyed = jax.jit(jax.vmap(lambda k: jax.vmap(sampling.sample)(jax.random.split(k, 4), probs)))(runs)
    np.testing.assert_array_equal(rows, np.asarray(keyed))
    np.testing.assert_array_equal(rows[:, [0, 1, 3]], np.broadcast_to([3, 0, 7], (600, 3)))
    draws = rows[:, 2]
    assert set(draws.tolist()) == {1, 9}
    share = float(np.mean(draws == 1))
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(draws)), share
