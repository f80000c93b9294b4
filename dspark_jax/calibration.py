"""Confidence calibration: metrics, observed acceptance labels, and STS (method doc 3.2).

Pure numpy: used on host-side rollout traces, never inside a jitted step.

Conventions. A speculation round proposes gamma drafts with per-step confidences
c_1..c_gamma, verifies the first `depth` of them and accepts the first `accepted`
(accepted <= depth). Positions k are 1-based in the text and 0-based in arrays.

- Prefix acceptance (what a_k = prod_{i<=k} c_i predicts): position k is observed iff
  k <= depth; its label is 1 iff accepted >= k.
- Conditional acceptance (what c_k predicts): position k is observed iff k <= depth and
  x_1..x_{k-1} were accepted (accepted >= k - 1); its label is 1 iff accepted >= k.

STS fits one temperature per position on the confidence head's logits, in order, so
that the cumulative product a_k matches the observed prefix acceptance (lowest ECE).
Dividing a logit by a positive temperature is monotone, so each position's ranking of
rounds (hence its AUC) is unchanged.
"""

from __future__ import annotations

import numpy as np

DEFAULT_GRID = np.geomspace(0.05, 20.0, 241)   # log-spaced, ratio ~1.025 between neighbours
CLIP = 1e-6


# ---------------------------------------------------------------------------- metrics

def _flat(probs, outcomes, mask=None):
    p = np.asarray(probs, np.float64).reshape(-1)
    y = np.asarray(outcomes, np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and outcomes {y.shape} differ in size")
    if mask is not None:
        m = np.asarray(mask, bool).reshape(-1)
        p, y = p[m], y[m]
    return p, y


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]; 1.0 falls in the last bin."""
    return np.clip((p * bins).astype(np.int64), 0, bins - 1)


def ece(probs, outcomes, bins: int = 15, mask=None) -> float:
    """Expected calibration error: sum_b (n_b / N) |mean(p in b) - mean(y in b)| over
    `bins` equal-width bins of [0, 1]. NaN when there is nothing to score."""
    p, y = _flat(probs, outcomes, mask)
    if p.size == 0:
        return float("nan")
    idx = _bin_index(p, bins)
    gap = np.bincount(idx, weights=p - y, minlength=bins)   # n_b * (mean p - mean y)
    return float(np.abs(gap).sum() / p.size)


def auc(scores, labels, mask=None) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, ties given their mean rank, so a
    tie between a positive and a negative counts one half. NaN with only one class."""
    s, y = _flat(scores, labels, mask)
    y = y > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, np.float64)
    # mean rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def brier(probs, outcomes, mask=None) -> float:
    """Mean squared error between probabilities and 0/1 outcomes; NaN when empty."""
    p, y = _flat(probs, outcomes, mask)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def reliability_curve(probs, outcomes, bins: int = 15, mask=None):
    """(mean confidence [bins], observed frequency [bins], count [bins]) per equal-width
    bin; empty bins hold NaN (plotting skips them)."""
    p, y = _flat(probs, outcomes, mask)
    idx = _bin_index(p, bins)
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / n
        freq = np.bincount(idx, weights=y, minlength=bins) / n
    return conf, freq, n.astype(np.int64)


def summary(probs, outcomes, mask=None, bins: int = 15) -> dict:
    """{n, mean_conf, observed, ece, auc, brier} of one set of predictions."""
    p, y = _flat(probs, outcomes, mask)
    nan = float("nan")
    return {"n": int(p.size), "mean_conf": float(p.mean()) if p.size else nan,
            "observed": float(y.mean()) if p.size else nan, "ece": ece(p, y, bins),
            "auc": auc(p, y), "brier": brier(p, y)}


# ------------------------------------------------------------------- labels and rates

def _rounds(accepted, depth, gamma: int):
    a = np.asarray(accepted, np.int64).reshape(-1)
    d = np.asarray(depth, np.int64).reshape(-1)
    if a.shape != d.shape:
        raise ValueError(f"accepted {a.shape} and depth {d.shape} differ in size")
    if np.any(a > d) or np.any(a < 0) or np.any(d > gamma):
        raise ValueError("need 0 <= accepted <= depth <= gamma for every round")
    k = np.arange(1, gamma + 1)[None, :]
    return a[:, None], d[:, None], k


def prefix_outcomes(accepted, depth, gamma: int):
    """(labels [N, G] int8, valid [N, G] bool): label[n, k-1] = accepted >= k, observed
    only where k <= depth (an unverified draft says nothing about its acceptance)."""
    a, d, k = _rounds(accepted, depth, gamma)
    return (a >= k).astype(np.int8), k <= d


def conditional_outcomes(accepted, depth, gamma: int):
    """(labels [N, G] int8, valid [N, G] bool) for the per-step c_k: position k is
    observed only if it was verified and x_1..x_{k-1} were all accepted."""
    a, d, k = _rounds(accepted, depth, gamma)
    return (a >= k).astype(np.int8), (k <= d) & (a >= k - 1)


def conditional_acceptance(accepted, depth, gamma: int):
    """(rate [G], count [G]): per position k, the fraction of rounds that accepted x_k
    among the rounds that verified x_k with x_1..x_{k-1} accepted (NaN if none did)."""
    labels, valid = conditional_outcomes(accepted, depth, gamma)
    count = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = (labels * valid).sum(0) / count
    return rate, count


# ------------------------------------------------------------------------------ STS

def sigmoid(x):
    x = np.asarray(x, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free


def logit(p, eps: float = CLIP):
    p = np.clip(np.asarray(p, np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def confidence_logits(confidences, temperatures=None, eps: float = CLIP):
    """Recover the confidence head's raw logits from traced confidences c = sigmoid(z / t).

    z = logit(clip(c, eps, 1 - eps)) * t. The clipping matters: float32 sigmoid saturates
    to exactly 0 or 1 beyond |z / t| ~ 17, and traces keep 6 decimals, so confidences
    within 1e-6 of 0 or 1 come back as |z / t| = 13.8; such rounds are (almost) certain
    either way, and a temperature can only move them towards 1/2 together.
    """
    c = np.asarray(confidences, np.float64)
    z = logit(c, eps)
    if temperatures is not None:
        z = z * np.asarray(temperatures, np.float64)[:c.shape[-1]]
    return z


def apply_sts(conf_logits, temps):
    """Per-step calibrated confidences c_k = sigmoid(z_k / t_k): [N, G] -> [N, G]."""
    z = np.asarray(conf_logits, np.float64)
    t = np.asarray(temps, np.float64)
    if t.shape != z.shape[-1:]:
        raise ValueError(f"{t.size} temperatures for {z.shape[-1]} positions")
    if np.any(t <= 0):
        raise ValueError("temperatures must be > 0")
    return sigmoid(z / t)


def prefix_survival(conf):
    """a_k = prod_{i<=k} c_i along the last axis."""
    return np.cumprod(np.asarray(conf, np.float64), axis=-1)


def _ece_rows(p: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of p [T, N] against y [N]."""
    t, n = p.shape
    idx = _bin_index(p, bins) + bins * np.arange(t)[:, None]
    gap = np.bincount(idx.reshape(-1), weights=(p - y[None, :]).reshape(-1), minlength=t * bins)
    return np.abs(gap.reshape(t, bins)).sum(1) / n


def fit_sts(conf_logits, accepted, depth, grid=None, bins: int = 15,
            chunk_elems: int = 1 << 22) -> np.ndarray:
    """Sequential Temperature Scaling: temperatures [G] for raw head logits [N, G].

    For k = 1..G in order: over the rounds that verified position k, pick from `grid`
    the t_k whose a_k = prod_{i<=k} sigmoid(z_i / t_i) (t_1..t_{k-1} already fixed) has
    the lowest ECE against the observed prefix acceptance (accepted >= k). Ties go to the
    temperature closest to 1; a position never verified keeps the previous temperature
    (1 for the first).
    """
    z = np.asarray(conf_logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"conf_logits must be [N, G]; got shape {z.shape}")
    g = z.shape[1]
    grid = np.asarray(DEFAULT_GRID if grid is None else grid, np.float64).reshape(-1)
    if grid.size == 0 or np.any(grid <= 0):
        raise ValueError("the temperature grid must be non-empty and positive")
    # prefer temperatures near 1 among equal ECEs: scan candidates in that order
    grid = grid[np.argsort(np.abs(np.log(grid)), kind="stable")]
    labels, valid = prefix_outcomes(accepted, depth, g)
    temps = np.ones(g)
    prev = np.ones(z.shape[0])                 # a_{k-1} under the fitted t_1..t_{k-1}
    for k in range(g):
        rows = valid[:, k]
        if rows.any():
            y = labels[rows, k].astype(np.float64)
            base, zk = prev[rows], z[rows, k]
            step = max(1, chunk_elems // max(1, rows.sum()))
            scores = np.concatenate([
                _ece_rows(base[None, :] * sigmoid(zk[None, :] / grid[i:i + step, None]), y, bins)
                for i in range(0, grid.size, step)])
            temps[k] = grid[int(np.argmin(scores))]   # argmin keeps the first (closest to 1)
        elif k > 0:
            temps[k] = temps[k - 1]
        prev = prev * sigmoid(z[:, k] / temps[k])
    return temps


# ------------------------------------------------------------------------- reports

def position_metrics(conf, accepted, depth, bins: int = 15) -> dict:
    """Confidence quality of per-step confidences conf [N, G] on rounds (accepted, depth):

    {"prefix": [summary of a_k vs accepted >= k, per k], "prefix_pooled": summary,
     "step": [summary of c_k vs conditional acceptance, per k], "step_pooled": summary}
    """
    c = np.asarray(conf, np.float64)
    g = c.shape[1]
    a = prefix_survival(c)
    py, pv = prefix_outcomes(accepted, depth, g)
    sy, sv = conditional_outcomes(accepted, depth, g)
    return {"prefix": [summary(a[:, k], py[:, k], pv[:, k], bins) for k in range(g)],
            "prefix_pooled": summary(a, py, pv, bins),
            "step": [summary(c[:, k], sy[:, k], sv[:, k], bins) for k in range(g)],
            "step_pooled": summary(c, sy, sv, bins)}
