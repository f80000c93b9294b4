"""The DSpark objective: each loss term by hand, anchors, targets and the block-sparse mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import objective


def test_position_weights():
    np.testing.assert_allclose(objective.position_weights(3, 4.0), [1.0, np.exp(-0.25), np.exp(-0.5)], rtol=1e-6)


def test_losses_match_hand_computation():
    # one block of G=2 positions over a vocabulary of 3
    q_logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]]))
    p_logits = jnp.log(jnp.array([[[0.6, 0.2, 0.2], [0.3, 0.3, 0.4]]]))
    targets = jnp.array([[0, 2]])
    tvalid = jnp.array([[True, True]])
    w = jnp.array([1.0, 0.5])
    conf_logits = jnp.array([[0.0, 1.0]])
    out = objective.losses(q_logits, p_logits, targets, tvalid, w, conf_logits)
    ce = -(1.0 * np.log(0.5) + 0.5 * np.log(0.8)) / 1.5
    tv1, tv2 = 0.1 + 0.1 + 0.0, 0.2 + 0.2 + 0.4
    tv = (1.0 * tv1 + 0.5 * tv2) / 1.5
    c1, c2 = 1 - tv1 / 2, 1 - tv2 / 2
    s1, s2 = 0.5, 1 / (1 + np.exp(-1.0))
    bce1 = -(c1 * np.log(s1) + (1 - c1) * np.log(1 - s1))
    bce2 = -(c2 * np.log(s2) + (1 - c2) * np.log(1 - s2))
    conf = (1.0 * bce1 + 0.5 * bce2) / 1.5
    np.testing.assert_allclose(out["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(out["tv"], tv, rtol=1e-5)
    np.testing.assert_allclose(out["conf"], conf, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], 0.1 * ce + 0.9 * tv + 1.0 * conf, rtol=1e-5)
    dflash = objective.losses(q_logits, p_logits, targets, tvalid, w, kind="dflash")
    np.testing.assert_allclose(dflash["loss"], ce, rtol=1e-5)
    # invalid positions do not count
    half = objective.losses(q_logits, p_logits, targets, jnp.array([[True, False]]), w, conf_logits)
    np.testing.assert_allclose(half["ce"], -np.log(0.5), rtol=1e-5)


def test_confidence_target_is_not_differentiated():
    q = jnp.log(jnp.array([[[0.5, 0.5]]]))
    p = jnp.log(jnp.array([[[0.9, 0.1]]]))

    def conf_only(ql):
        return objective.losses(ql, p, jnp.array([[0]]), jnp.array([[True]]), jnp.ones(1),
                                jnp.zeros((1, 1)), ce_weight=0, tv_weight=0)["loss"]

    assert float(jnp.abs(jax.grad(conf_only)(q)).max()) == 0.0


def test_anchor_sampling_respects_answer_mask():
    mask = jnp.array([[0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 0]])
    for seed in range(5):
        anchors, valid = objective.sample_anchors(jax.random.key(seed), mask, 4)
        a, v = np.asarray(anchors), np.asarray(valid)
        assert set(a[0][v[0]]) == {2, 3, 6}  # all three candidates taken (fewer than 4)
        assert v[1].sum() == 0  # no answer token has an answer successor
        assert len(set(a[0][v[0]])) == v[0].sum()
    anchors, valid = objective.sample_anchors(jax.random.key(0), jnp.ones((1, 50)), 8)
    assert np.asarray(valid).all() and len(set(np.asarray(anchors)[0])) == 8
    assert np.all(np.diff(np.asarray(anchors)[0]) > 0)


def test_block_targets_are_a_valid_prefix():
    ids = jnp.arange(10)[None] + 100
    mask = jnp.array([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1]])
    tok, tv = objective.block_targets(ids, mask, jnp.array([[1, 7]]), jnp.array([[True, True]]), 3)
    np.testing.assert_array_equal(tok[0, 0], [102, 103, 104])
    np.testing.assert_array_equal(tv[0, 0], [True, True, False])   # position 4 is not an answer
    np.testing.assert_array_equal(tv[0, 1], [True, True, False])   # position 10 is past the end


@pytest.mark.parametrize("seed", range(3))
def test_block_sparse_mask_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    b, n, g, length = 2, 3, 4, 12
    anchors = np.sort(rng.integers(0, length, (b, n)), axis=1)
    valid = rng.random((b, n)) < 0.8
    got = np.asarray(objective.block_sparse_mask(jnp.asarray(anchors), jnp.asarray(valid), length, g))
    want = np.zeros((b, n * g, length + n * g), bool)
    for bi in range(b):
        for i in range(n):
            for k in range(g):
                row = i * g + k
                for s in range(length):
                    want[bi, row, s] = valid[bi, i] and s < anchors[bi, i]
                for j in range(n):
                    for kk in range(g):
                        want[bi, row, length + j * g + kk] = (i == j)
    np.testing.assert_array_equal(got, want)
