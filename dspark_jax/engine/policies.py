"""Verification depth on the device: each policy's depths for one round.

Whether a draft x_j is verified never depends on x_j itself, only on the drafts before
it and on quantities fixed before the round, so every policy stays lossless:
  fixed / max depth   fixed before the round (the room left, a per-request limit);
  threshold           x_j is verified iff c_1..c_j pass, and c_j depends on x_<j only;
  algorithm1          the causal early stop (scheduler.py);
  production          capacity K from the survival of two rounds earlier (rows with none
                      yet read the profile's mean survival), then the top-K candidates by
                      current survival, where (r, j) ranks behind (r, j-1);
  the budget bucket   chosen by the host from earlier rounds; algorithm1 sees SPS past it
                      as 0, production caps K at it, and `cap_depths` admits position-major.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax import scheduler

POLICIES = ("none", "fixed", "threshold", "algorithm1", "production")
SCHEDULED = ("algorithm1", "production")


@struct.dataclass
class Schedule:
    """Per-round scheduling inputs: arrays, so changing them never recompiles."""

    sps: jax.Array         # [Bmax + 1] float32 target steps/s at B verified tokens (index 0 unused)
    threshold: jax.Array   # [] float32 per-step confidence threshold
    draft_time: jax.Array  # [] float32 seconds of one drafting pass (0: the paper's objective)
    prior: jax.Array       # [G] float32 survival assumed for rows with no history yet (production)
    live: jax.Array        # [S] bool: rows the host has not cancelled


def cap_depths(depth: jax.Array, active: jax.Array, budget: int, gamma: int) -> jax.Array:
    """The longest position-major cut of `depth` [S] with sum(active * (1 + depth)) <= budget.

    All first drafts (by row), then all second drafts, ...: whether (r, j) survives the
    cut depends on other rows and on depth[r] > j, never on row r's later drafts.
    """
    room = budget - jnp.sum(active).astype(jnp.int32)
    requested = (jnp.arange(gamma)[:, None] < depth[None, :]) & active[None, :]  # [G, S]
    rank = jnp.cumsum(requested.reshape(-1)).reshape(requested.shape) - 1
    return jnp.sum(requested & (rank < room), axis=0).astype(jnp.int32)


def stale_estimate(stale: jax.Array, prior: jax.Array, live: jax.Array) -> jax.Array:
    """Survival two rounds old [S, G], with `prior` [G] for rows that have none yet (just
    admitted), masked to each row's live positions: what production's capacity reads."""
    known = jnp.any(stale > 0, axis=1, keepdims=True)
    return jnp.where(known, stale, prior[None, :]) * live


def schedule_depths(policy: str, budget: int, confidence: jax.Array, stale: jax.Array, sched: Schedule,
                    active: jax.Array, max_depth: jax.Array):
    """Depths [S] for this round -> (depth, survival [S, G], capacity []).

    confidence [S, G]: this round's c_k; stale [2, S, G]: the survival of the two drafted
    rounds before this one; max_depth [S]: each row's limit (its own and the room left).
    """
    s, g = confidence.shape
    live = active[:, None] & (jnp.arange(g)[None, :] < max_depth[:, None])
    survival = jnp.where(live, jnp.cumprod(confidence, axis=1), 0.0)
    capacity = None
    if policy == "none" or g == 0:
        depth = jnp.zeros((s,), jnp.int32)
    elif policy == "fixed":
        depth = max_depth
    elif policy == "threshold":
        depth = scheduler.threshold_depths_jnp(confidence, sched.threshold)
    elif policy == "algorithm1":
        depth = scheduler.schedule_prefix_lengths_jnp(survival, sched.sps[:budget + 1], active, sched.draft_time)
    elif policy == "production":
        capacity = scheduler.global_capacity_jnp(stale_estimate(stale[0], sched.prior, live), sched.sps, active,
                                                 sched.draft_time)
        capacity = jnp.minimum(capacity, budget - jnp.sum(active)).astype(jnp.int32)
        depth = scheduler.top_k_depths_jnp(survival, capacity, active)
    else:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    depth = jnp.where(active, jnp.minimum(depth, max_depth), 0).astype(jnp.int32)
    depth = cap_depths(depth, active, budget, g)
    if capacity is None:
        capacity = jnp.sum(depth).astype(jnp.int32)
    return depth, survival, capacity


def drafter_has_confidence(drafter) -> bool:
    """Block drafters say so in their config; drafters without one (test oracles) are
    trusted to return meaningful confidences."""
    cfg = getattr(drafter, "cfg", None)
    return cfg is None or bool(getattr(cfg, "has_confidence", False))
