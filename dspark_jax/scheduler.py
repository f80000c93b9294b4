"""Verification-depth scheduling: how many drafts each request verifies this round.

Inputs are prefix survival probabilities a[r, j] (request r, draft position j+1; the
cumulative product of STS-calibrated confidences, non-increasing in j) and the engine's
profiled throughput curve sps[B] = target forward steps per second at a batch of B
tokens (index 0 unused). A round verifies B = sum_r (1 + l_r) tokens and is expected to
commit tau* = sum_r (1 + sum_{j<=l_r} a[r, j]); the objective is the round's token rate

    Theta = tau* / (T_draft + 1 / SPS(B))

where T_draft (seconds, `draft_time`, default 0) is the drafting pass that every
speculative round pays whatever its depths. With T_draft = 0 this is the paper's
tau* x SPS(B). On hardware where verification is nearly free (a memory-bound GPU) the
two agree; where drafting costs as much as a verification step (a CPU, a tiny target)
the fixed cost makes each round worth filling and decides whether drafting pays at
all: `speculation_pays` compares the best speculative round predicted from earlier
rounds' survival with a plain decoding round (R tokens at SPS(R), no drafting).
The engine can also hand in its measured round rates instead (profile_sps.py, "round
profile"): sps[B] = speculative engine rounds per second at budget B, drafting,
acceptance and host work included, with draft_time = 0.

Policies (all pure; `*_jnp` variants run inside jit on device):

- `schedule_prefix_lengths(survival, sps, *, draft_time=0.0)` -- Algorithm 1 with causal
  early stop: admit candidates (r, j) in decreasing a[r, j]; keep each while Theta
  improves, and STOP at the first that does not. The early stop is required for
  losslessness: a[r, j+1] depends on the sampled x[r, j], and a search that looks past
  a drop would let that token decide whether it is itself verified (the Appendix A
  counterexample).
- `production_depths(survival, stale_survival, sps, *, draft_time=0.0)` -- capacity K
  from the confidences of two rounds earlier (global search, no early stop: K cannot
  depend on the current tokens), then the current top-K candidates by survival. The
  engine lets rows with no history yet (just admitted) count with a running mean.
- `threshold_depths(confidence, threshold)` -- verify while each step's c_k >= threshold.
- `fixed_depths(num_requests, depth)`.

`retrospective_prefix_lengths` (global search on the CURRENT survival) exists only to
demonstrate the bias in tests; never serve with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(survival: np.ndarray, sps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    survival = np.asarray(survival, np.float64)
    sps = np.asarray(sps, np.float64)
    if survival.ndim != 2:
        raise ValueError(f"survival must be [R, gamma]; got shape {survival.shape}")
    if sps.ndim != 1 or len(sps) < survival.shape[0] + 1:
        raise ValueError(f"sps must be 1-D with an entry for every batch up to R = {survival.shape[0]}")
    return survival, sps


def rate(tau, sps_b, draft_time=0.0):
    """Theta = tau / (draft_time + 1 / sps_b), written so that sps_b = 0 (a budget past
    the table) gives 0; works on numpy and jax arrays alike."""
    return tau * sps_b / (1.0 + draft_time * sps_b)


def throughput(survival, sps, depths, *, draft_time: float = 0.0) -> float:
    """Theta of a depth assignment (tau* x SPS(B) when draft_time is 0)."""
    survival, sps = _check(survival, sps)
    depths = np.asarray(depths)
    b = int(np.sum(1 + depths))
    tau = float(np.sum(1 + np.array([survival[r, :l].sum() for r, l in enumerate(depths)])))
    return float(rate(tau, float(sps[b]), draft_time)) if b < len(sps) else 0.0


def _sorted_candidates(survival: np.ndarray):
    """Candidates (r, j) with a > 0 in decreasing a; ties by position then request, so
    within a request the order always respects prefixes (a is non-increasing in j)."""
    r_idx, j_idx = np.nonzero(survival > 0)
    order = np.lexsort((r_idx, j_idx, -survival[r_idx, j_idx]))
    return r_idx[order], j_idx[order]


def schedule_prefix_lengths(survival, sps, *, draft_time: float = 0.0) -> np.ndarray:
    """Algorithm 1 (causal early stop). survival [R, gamma], sps 1-D -> depths int [R]."""
    survival, sps = _check(survival, sps)
    r_count = survival.shape[0]
    depths = np.zeros(r_count, np.int64)
    b, tau = r_count, float(r_count)
    best = rate(tau, sps[b], draft_time)
    for r, j in zip(*_sorted_candidates(survival)):
        if j != depths[r] or b + 1 >= len(sps):
            break  # (prefix order is guaranteed; a table end stops the search)
        theta = rate(tau + survival[r, j], sps[b + 1], draft_time)
        if theta <= best:
            break
        depths[r], b, tau, best = j + 1, b + 1, tau + survival[r, j], theta
    return depths


def _capacity_curves(survival: np.ndarray, sps: np.ndarray, draft_time: float):
    """For D batches, survival [D, R, gamma]: (the admissible K values, Theta [D, K] when a
    batch's top-K candidates are admitted (-inf past its candidates: a > 0 only), their
    expected tokens tau [D, K])."""
    d, r_count, g = survival.shape
    gains = -np.sort(-survival.reshape(d, r_count * g), axis=1)
    ks = np.arange(r_count * g + 1)
    ks = ks[r_count + ks < len(sps)]
    taus = r_count + np.concatenate([np.zeros((d, 1)), np.cumsum(gains, axis=1)], axis=1)[:, ks]
    theta = rate(taus, sps[r_count + ks][None, :], draft_time)
    theta = np.where(ks[None, :] <= np.sum(gains > 0, axis=1, keepdims=True), theta, -np.inf)
    return ks, theta, taus


def global_capacity(survival: np.ndarray, sps: np.ndarray, *, draft_time: float = 0.0) -> int:
    """argmax over K of Theta when the top-K candidates are admitted (no early stop)."""
    ks, theta, _ = _capacity_curves(np.asarray(survival, np.float64)[None], np.asarray(sps, np.float64),
                                    draft_time)
    return int(ks[np.argmax(theta[0])])


def speculation_pays(survival, sps, *, draft_time: float, plain_sps=None,
                     margin: float = 0.0) -> tuple[bool, float, float]:
    """Whether a speculative round is expected to beat a plain decoding round.

    survival [R, gamma]: the best available estimate of this round's prefix survival
    (earlier rounds' values: the decision must not depend on this round's drafts).
    draft_time: seconds a speculative round costs beyond 1 / sps[B]. plain_sps: rate of a
    plain round at R tokens, indexed by R (None: `sps`, the target pass alone). margin: how much
    faster the speculative round must be predicted to be (0.1: by 10%). Returns
    (pays, predicted Theta of the best speculative round (drafting included), Theta of a
    plain round: R tokens, nothing drafted).
    """
    survival, sps = _check(survival, sps)
    r_count = survival.shape[0]
    spec, _ = best_round(survival, sps, draft_time=draft_time)
    plain_sps = sps if plain_sps is None else np.asarray(plain_sps, np.float64)
    plain = float(r_count * plain_sps[r_count])
    return spec > plain * (1.0 + margin), spec, plain


def best_round(survival, sps, *, draft_time: float = 0.0) -> tuple[float, float]:
    """(Theta, expected tokens tau) of the best speculative round on these estimates:
    the top-K candidates at the global capacity K. Its seconds are tau / Theta."""
    survival, sps = _check(survival, sps)
    theta, tau = best_rounds(survival[None], sps, draft_time=draft_time)
    return float(theta[0]), float(tau[0])


def best_rounds(survival, sps, *, draft_time: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`best_round` of D batches at once: survival [D, R, gamma] -> (Theta [D], tau [D]).
    The candidates admitted are the K largest survivals (a > 0), for the best K."""
    survival = np.asarray(survival, np.float64)
    sps = np.asarray(sps, np.float64)
    if survival.ndim != 3:
        raise ValueError(f"survival must be [D, R, gamma]; got shape {survival.shape}")
    if sps.ndim != 1 or len(sps) < survival.shape[1] + 1:
        raise ValueError(f"sps must be 1-D with an entry for every batch up to R = {survival.shape[1]}")
    _, theta, taus = _capacity_curves(survival, sps, draft_time)
    best = np.argmax(theta, axis=1)
    rows = np.arange(len(best))
    return theta[rows, best], taus[rows, best]


def rows_worth_drafting(survival, sps, *, draft_time: float = 0.0) -> np.ndarray:
    """bool [R]: the requests with a draft among the top-K candidates at the global
    capacity K (the engine drafts only for these when its gate has chosen to draft)."""
    survival, sps = _check(survival, sps)
    return _top_k_depths(survival, global_capacity(survival, sps, draft_time=draft_time)) > 0


def _top_k_depths(survival: np.ndarray, k: int) -> np.ndarray:
    depths = np.zeros(survival.shape[0], np.int64)
    r_idx, j_idx = _sorted_candidates(survival)
    for r, j in zip(r_idx[:k], j_idx[:k]):
        depths[r] = max(depths[r], j + 1)
    return depths


def retrospective_prefix_lengths(survival, sps, *, draft_time: float = 0.0) -> np.ndarray:
    """Global search on the current survival (BIASED; for demonstrations only)."""
    survival, sps = _check(survival, sps)
    return _top_k_depths(survival, global_capacity(survival, sps, draft_time=draft_time))


def production_depths(survival, stale_survival, sps, *, draft_time: float = 0.0) -> np.ndarray:
    """Capacity from survival of two rounds earlier, filled with the current top-K."""
    survival, sps = _check(survival, sps)
    stale, _ = _check(stale_survival, sps)
    return _top_k_depths(survival, global_capacity(stale, sps, draft_time=draft_time))


def threshold_depths(confidence, threshold: float) -> np.ndarray:
    """Depth = number of leading positions whose per-step confidence c_k >= threshold."""
    ok = np.asarray(confidence) >= threshold
    return np.cumprod(ok, axis=1).sum(axis=1)


def fixed_depths(num_requests: int, depth: int) -> np.ndarray:
    return np.full(num_requests, depth, np.int64)


# ----------------------------------------------------------------- on-device (jit) forms

def _sorted_gains_jnp(survival: jax.Array, active: jax.Array):
    r, g = survival.shape
    # position-major flattening (index j * r + r_) and ONE stable sort on -a: ties keep
    # position-then-request order, the numpy tie order, without a three-key lexsort
    a = jnp.where(active[None, :], survival.T, 0.0).reshape(-1)
    order = jnp.argsort(-a, stable=True)
    return a[order], order % r, order // r


def _depths_from_admitted(order_r, order_j, admitted, r):
    return jnp.zeros((r,), jnp.int32).at[order_r].max(jnp.where(admitted, order_j + 1, 0).astype(jnp.int32))


def schedule_prefix_lengths_jnp(survival: jax.Array, sps: jax.Array, active: jax.Array | None = None,
                                draft_time=0.0):
    """Algorithm 1 inside jit: [R, G] survival, sps [Bmax+1] -> depths [R] int32.

    Inactive rows (finished requests) take no tokens and do not count in B.
    """
    r, g = survival.shape
    active = jnp.ones((r,), bool) if active is None else active
    gains, order_r, order_j = _sorted_gains_jnp(survival, active)
    base = jnp.sum(active).astype(jnp.int32)
    k = jnp.arange(1, r * g + 1)
    b = base + k
    taus = base + jnp.cumsum(gains)
    theta = rate(taus, jnp.take(sps, jnp.minimum(b, sps.shape[0] - 1)) * (b < sps.shape[0]), draft_time)
    theta0 = rate(base, sps[jnp.minimum(base, sps.shape[0] - 1)], draft_time)
    prev = jnp.concatenate([jnp.reshape(theta0, (1,)).astype(theta.dtype), theta[:-1]])
    improving = (theta > prev) & (gains > 0)
    admitted = jnp.cumprod(improving.astype(jnp.int32)) > 0
    return _depths_from_admitted(order_r, order_j, admitted, r)


def global_capacity_jnp(survival: jax.Array, sps: jax.Array, active: jax.Array, draft_time=0.0) -> jax.Array:
    """K maximising Theta over top-K admissions (no early stop), inside jit."""
    r, g = survival.shape
    gains, _, _ = _sorted_gains_jnp(survival, active)
    base = jnp.sum(active).astype(jnp.int32)
    k = jnp.arange(r * g + 1)
    b = base + k
    taus = base + jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(gains)])
    theta = jnp.where(b < sps.shape[0], rate(taus, jnp.take(sps, jnp.minimum(b, sps.shape[0] - 1)), draft_time),
                      -1.0)
    theta = jnp.where(jnp.concatenate([jnp.array([True]), gains > 0]), theta, -1.0)
    return jnp.argmax(theta).astype(jnp.int32)


def top_k_depths_jnp(survival: jax.Array, k: jax.Array, active: jax.Array) -> jax.Array:
    r, g = survival.shape
    gains, order_r, order_j = _sorted_gains_jnp(survival, active)
    admitted = (jnp.arange(r * g) < k) & (gains > 0)
    return _depths_from_admitted(order_r, order_j, admitted, r)


def threshold_depths_jnp(confidence: jax.Array, threshold) -> jax.Array:
    return jnp.sum(jnp.cumprod((confidence >= threshold).astype(jnp.int32), axis=1), axis=1)
