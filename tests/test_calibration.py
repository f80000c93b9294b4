"""Calibration metrics, acceptance labels and STS on hand examples and synthetic rounds."""

import numpy as np
import pytest

from dspark_jax import calibration as cal


def test_ece_hand_computed():
    # 2 bins: [0, .5) holds p = .1, .2 (mean .15) with y = 0, 1 (mean .5): gap .35
    #         [.5, 1] holds p = .8, 1.0 (mean .9) with y = 1, 1 (mean 1): gap .1
    p = [0.1, 0.2, 0.8, 1.0]
    y = [0, 1, 1, 1]
    assert cal.ece(p, y, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.1)
    # weighting by bin size: 3 in the low bin, 1 in the high one
    assert cal.ece([0.1, 0.1, 0.1, 0.9], [0, 0, 0, 0], bins=2) == pytest.approx(0.75 * 0.1 + 0.25 * 0.9)
    assert cal.ece([0.3, 0.7], [0.3, 0.7], bins=10) == pytest.approx(0.0)
    # mask drops entries
    assert cal.ece(p, y, bins=2, mask=[False, False, True, True]) == pytest.approx(0.1)
    assert np.isnan(cal.ece([], []))


def test_auc_hand_computed_with_ties():
    assert cal.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert cal.auc([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)
    assert cal.auc([0.1, 0.8, 0.9], [1, 1, 0]) == pytest.approx(0.0)
    # a positive tied with a negative counts one half: pairs (p.5,n.5)=.5, (p.5,n.2)=1
    assert cal.auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert cal.auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert np.isnan(cal.auc([0.2, 0.4], [1, 1]))


def test_brier_and_reliability_curve():
    assert cal.brier([0.1, 0.9, 0.5], [0, 1, 1]) == pytest.approx((0.01 + 0.01 + 0.25) / 3)
    conf, freq, n = cal.reliability_curve([0.1, 0.2, 0.8, 1.0], [0, 1, 1, 1], bins=2)
    np.testing.assert_allclose(conf, [0.15, 0.9])
    np.testing.assert_allclose(freq, [0.5, 1.0])
    np.testing.assert_array_equal(n, [2, 2])
    conf, freq, n = cal.reliability_curve([0.1], [1], bins=4)
    assert n.tolist() == [1, 0, 0, 0] and np.isnan(conf[1]) and freq[0] == 1.0


def test_prefix_and_conditional_outcomes():
    accepted = [2, 0, 3, 1]
    depth = [3, 2, 3, 1]
    labels, valid = cal.prefix_outcomes(accepted, depth, 3)
    assert labels.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert valid.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
    labels, valid = cal.conditional_outcomes(accepted, depth, 3)
    # round 0: x1, x2 accepted, x3 rejected -> k=1,2,3 all observed
    # round 1: x1 rejected -> only k=1 observed; round 3: depth 1 -> only k=1
    assert valid.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    rate, count = cal.conditional_acceptance(accepted, depth, 3)
    assert count.tolist() == [4, 2, 2]
    np.testing.assert_allclose(rate, [3 / 4, 2 / 2, 1 / 2])
    rate, count = cal.conditional_acceptance([0], [1], 2)
    assert count.tolist() == [1, 0] and rate[0] == 0 and np.isnan(rate[1])
    with pytest.raises(ValueError):
        cal.prefix_outcomes([3], [2], 3)


def test_confidence_logits_round_trip():
    z = np.array([[-3.0, 0.5, 8.0], [1.0, -0.2, 40.0]])
    t = np.array([2.0, 0.5, 1.5])
    c = np.round(cal.apply_sts(z, t), 6)
    back = cal.confidence_logits(c, t)
    np.testing.assert_allclose(back[:, :2], z[:, :2], atol=1e-3)
    assert back[1, 2] == pytest.approx(cal.logit(1 - 1e-6) * 1.5)   # saturated: clipped


def synthetic_rounds(n=6000, gamma=4, seed=0, scale=3.0):
    """True per-step acceptance probabilities p_k; the head reports scale * logit(p_k)
    (over-confident); rounds accept the longest prefix of Bernoulli(p_k) successes."""
    rng = np.random.default_rng(seed)
    p = rng.beta(4, 1.5, (n, gamma)).clip(0.02, 0.995)
    ok = rng.uniform(size=(n, gamma)) < p
    accepted = np.argmin(np.concatenate([ok, np.zeros((n, 1), bool)], 1), axis=1)
    depth = rng.integers(1, gamma + 1, n)          # a scheduler verifies varying depths
    accepted = np.minimum(accepted, depth)
    return scale * cal.logit(p), accepted, depth


def test_fit_sts_fixes_over_confidence():
    z, accepted, depth = synthetic_rounds()
    temps = cal.fit_sts(z, accepted, depth)
    assert temps.shape == (4,) and np.all(temps > 1.5)
    before = cal.position_metrics(cal.sigmoid(z), accepted, depth)
    after = cal.position_metrics(cal.apply_sts(z, temps), accepted, depth)
    for b, a in zip(before["prefix"], after["prefix"]):
        assert b["ece"] > a["ece"] and a["ece"] < 0.03, (b, a)
    assert before["prefix_pooled"]["ece"] > 0.05 > 0.02 > after["prefix_pooled"]["ece"]
    assert after["step_pooled"]["ece"] < 0.03
    # order preserving: per position, calibrated confidences rank rounds as the logits do
    c = cal.apply_sts(z, temps)
    for k in range(4):
        np.testing.assert_array_equal(np.argsort(c[:, k], kind="stable"), np.argsort(z[:, k], kind="stable"))
        assert after["step"][k]["auc"] == pytest.approx(before["step"][k]["auc"])


def test_fit_sts_calibrated_input_stays_near_one_and_edge_cases():
    z, accepted, depth = synthetic_rounds(scale=1.0, seed=1)
    temps = cal.fit_sts(z, accepted, depth)
    np.testing.assert_allclose(temps, 1.0, rtol=0.35)
    # a position never verified inherits the previous temperature
    temps = cal.fit_sts(z[:, :2], np.minimum(accepted, 1), np.ones_like(depth), grid=[0.5, 1.0, 2.0])
    assert temps[1] == temps[0]
    with pytest.raises(ValueError):
        cal.apply_sts(z, [1.0, 2.0])
