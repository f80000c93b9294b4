"""Scheduler: Algorithm 1 against brute force, device forms against numpy, and the
Appendix A counterexample (retrospective search biases the output; the causal rule not)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import scheduler
from dspark_jax.sampling import accept_drafts


def random_case(rng, r, g, jagged=True):
    c = rng.uniform(0.05, 1.0, (r, g))
    survival = np.cumprod(c, axis=1)
    bmax = r * (g + 1)
    if jagged:
        sps = rng.uniform(0.2, 1.0, bmax + 2)
    else:  # decreasing and concave: Theta(B) is unimodal, so the early stop is optimal
        b = np.arange(bmax + 2)
        sps = 1.0 - 0.5 * (b / (bmax + 1)) ** 2
    return survival, sps


def brute_force_best(survival, sps, draft_time=0.0):
    r, g = survival.shape
    return max(scheduler.throughput(survival, sps, d, draft_time=draft_time)
               for d in itertools.product(range(g + 1), repeat=r))


def rule_by_hand(survival, sps, draft_time=0.0):
    """Algorithm 1 written as plainly as possible (the test's own implementation)."""
    r, g = survival.shape
    cands = sorted(((survival[i, j], j, i) for i in range(r) for j in range(g) if survival[i, j] > 0),
                   key=lambda t: (-t[0], t[1], t[2]))
    depth = [0] * r
    best = scheduler.throughput(survival, sps, depth, draft_time=draft_time)
    for _, j, i in cands:
        trial = list(depth)
        trial[i] = j + 1
        theta = scheduler.throughput(survival, sps, trial, draft_time=draft_time)
        if theta <= best:
            break
        depth, best = trial, theta
    return np.array(depth), best


@pytest.mark.parametrize("seed", range(40))
def test_algorithm1_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    r, g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    survival, sps = random_case(rng, r, g, jagged=seed % 2 == 0)
    depths = scheduler.schedule_prefix_lengths(survival, sps)
    assert depths.shape == (r,) and depths.min() >= 0 and depths.max() <= g
    want, want_theta = rule_by_hand(survival, sps)
    np.testing.assert_array_equal(depths, want)
    theta = scheduler.throughput(survival, sps, depths)
    assert theta == pytest.approx(want_theta)
    best = brute_force_best(survival, sps)
    assert theta <= best + 1e-12
    assert theta >= scheduler.throughput(survival, sps, np.zeros(r, int)) - 1e-12  # never worse than no drafts
    if seed % 2 == 1:
        assert theta == pytest.approx(best)
    # the device form agrees
    got = scheduler.schedule_prefix_lengths_jnp(jnp.asarray(survival, jnp.float32), jnp.asarray(sps, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), depths)
    # the production variant with fresh confidences reaches the global optimum
    prod = scheduler.production_depths(survival, survival, sps)
    assert scheduler.throughput(survival, sps, prod) == pytest.approx(best)
    k = scheduler.global_capacity_jnp(jnp.asarray(survival, jnp.float32), jnp.asarray(sps, jnp.float32),
                                      jnp.ones(r, bool))
    dev = scheduler.top_k_depths_jnp(jnp.asarray(survival, jnp.float32), k, jnp.ones(r, bool))
    np.testing.assert_array_equal(np.asarray(dev), prod)


def test_inactive_rows_take_nothing():
    survival = jnp.array([[0.9, 0.8], [0.95, 0.9]])
    sps = jnp.ones(8)
    d = scheduler.schedule_prefix_lengths_jnp(survival, sps, active=jnp.array([False, True]))
    assert int(d[0]) == 0 and int(d[1]) == 2


def test_threshold_and_fixed():
    conf = np.array([[0.9, 0.7, 0.95], [0.4, 0.9, 0.9]])
    np.testing.assert_array_equal(scheduler.threshold_depths(conf, 0.6), [3, 0])
    np.testing.assert_array_equal(scheduler.threshold_depths(conf, 0.8), [1, 0])
    np.testing.assert_array_equal(np.asarray(scheduler.threshold_depths_jnp(jnp.asarray(conf), 0.8)), [1, 0])
    np.testing.assert_array_equal(scheduler.fixed_depths(3, 2), [2, 2, 2])


# Appendix A: gamma = 2, a_1 = 0.8, SPS(1..3) = 1.0, 0.5, 0.45, p = (0.7, 0.3), q = (0.5, 0.5).
# The second position's survival depends on the sampled first draft: high after token 0.
SPS = np.array([0.0, 1.0, 0.5, 0.45])
P = np.array([0.7, 0.3])
Q = np.array([0.5, 0.5])
A2 = {0: 0.8 * 0.9, 1: 0.8 * 0.1}


def first_token_distribution(policy, n=40000, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.choice(2, size=n, p=Q)
    depth = np.array([policy(np.array([[0.8, A2[int(x)]]]), SPS)[0] for x in (0, 1)])[x1]
    x2 = rng.choice(2, size=n, p=Q)
    draft = jnp.asarray(np.stack([x1, x2], 1), jnp.int32)
    q = jnp.broadcast_to(jnp.asarray(Q, jnp.float32), (n, 2, 2))
    p = jnp.broadcast_to(jnp.asarray(P, jnp.float32), (n, 3, 2))
    keys = jax.random.split(jax.random.key(seed), n)
    acc, nxt = accept_drafts(keys, draft, q, p, jnp.asarray(depth, jnp.int32))
    first = np.where(np.asarray(acc) >= 1, x1, np.asarray(nxt))
    return np.bincount(first, minlength=2) / n


def test_appendix_a_counterexample():
    causal = first_token_distribution(scheduler.schedule_prefix_lengths)
    retro = first_token_distribution(scheduler.retrospective_prefix_lengths)
    tol = 4 * np.sqrt(0.25 / 40000)  # ~0.01
    np.testing.assert_allclose(causal, [0.7, 0.3], atol=tol)
    np.testing.assert_allclose(retro, [0.85, 0.15], atol=tol)


@pytest.mark.parametrize("seed", range(24))
def test_drafting_cost_objective_against_brute_force(seed):
    """Theta = tau / (T_draft + 1/SPS(B)): Algorithm 1 follows its rule, the global search
    reaches the optimum, and the gate drafts exactly when the best round beats plain decoding."""
    rng = np.random.default_rng(100 + seed)
    r, g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    survival, sps = random_case(rng, r, g, jagged=seed % 2 == 0)
    draft_time = float(rng.choice([0.0, 0.3, 1.0, 5.0]))
    depths = scheduler.schedule_prefix_lengths(survival, sps, draft_time=draft_time)
    want, want_theta = rule_by_hand(survival, sps, draft_time)
    np.testing.assert_array_equal(depths, want)
    assert scheduler.throughput(survival, sps, depths, draft_time=draft_time) == pytest.approx(want_theta)
    got = scheduler.schedule_prefix_lengths_jnp(jnp.asarray(survival, jnp.float32), jnp.asarray(sps, jnp.float32),
                                                draft_time=jnp.float32(draft_time))
    np.testing.assert_array_equal(np.asarray(got), depths)
    best = brute_force_best(survival, sps, draft_time)
    prod = scheduler.production_depths(survival, survival, sps, draft_time=draft_time)
    assert scheduler.throughput(survival, sps, prod, draft_time=draft_time) == pytest.approx(best)
    k = scheduler.global_capacity_jnp(jnp.asarray(survival, jnp.float32), jnp.asarray(sps, jnp.float32),
                                      jnp.ones(r, bool), jnp.float32(draft_time))
    assert int(k) == int(np.sum(prod))
    pays, spec, plain = scheduler.speculation_pays(survival, sps, draft_time=draft_time)
    assert spec == pytest.approx(best) and plain == pytest.approx(r * sps[r])
    assert pays == (best > r * sps[r])
    assert scheduler.speculation_pays(survival, sps, draft_time=draft_time, margin=0.1)[0] == (best > 1.1 * r * sps[r])
    # D batches at once: each one's best round
    batch = np.stack([survival, survival * 0.5, np.zeros_like(survival)])
    theta, tau = scheduler.best_rounds(batch, sps, draft_time=draft_time)
    for d in range(len(batch)):
        want_theta, want_tau = scheduler.best_round(batch[d], sps, draft_time=draft_time)
        assert theta[d] == pytest.approx(want_theta) and tau[d] == pytest.approx(want_tau)


def test_drafting_cost_moves_the_choice():
    """A fixed drafting cost makes a round worth filling (deeper at equal survival), and
    a large enough one makes plain decoding the better round."""
    survival = np.cumprod(np.full((2, 4), 0.6), axis=1)
    sps = 10.0 / (1.0 + 0.25 * np.arange(11))
    free = scheduler.schedule_prefix_lengths(survival, sps)
    costly = scheduler.schedule_prefix_lengths(survival, sps, draft_time=0.2)
    assert costly.sum() > free.sum()
    assert scheduler.speculation_pays(survival, sps, draft_time=0.0)[0]
    assert not scheduler.speculation_pays(survival, sps, draft_time=0.2)[0]
