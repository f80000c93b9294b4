"""Warping (temperature, top-k, top-p) and lossless speculative acceptance.

All functions are pure and per-request vectorised: sampling parameters are [B] arrays,
so one compiled step serves any mix of greedy and sampled requests. The SAME `warp` is
applied to target and draft logits; temperature 0 turns a distribution into the one-hot
argmax, which makes rejection sampling reduce exactly to greedy matching.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import DSparkError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters, each [B]."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array        # int32; 0 = off
    top_p: jax.Array        # float32; 1 = off
    # static (part of the tree structure, so one compiled program per value): True promises
    # that every row whose tokens are kept is greedy, and the draws skip building
    # distributions (`draw`, `greedy_accept`); False makes no promise
    greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
        """Broadcast scalars or per-request sequences to [batch], validating them."""
        t = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
        k = np.broadcast_to(np.asarray(top_k, np.int32), (batch,))
        p = np.broadcast_to(np.asarray(top_p, np.float32), (batch,))
        validate(t, k, p)
        return cls(jnp.asarray(t), jnp.asarray(k), jnp.asarray(p), greedy=bool(np.all(t == 0)))

    def promise_greedy(self, greedy: bool) -> "SamplingParams":
        """The same arrays with the static promise set (the caller vouches for it)."""
        return self if self.greedy == greedy else dataclasses.replace(self, greedy=bool(greedy))


def validate(temperature, top_k, top_p) -> None:
    t, k, p = (np.asarray(x) for x in (temperature, top_k, top_p))
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise DSparkError(f"temperature must be a finite number >= 0; got {t.tolist()}")
    if np.any(k < 0):
        raise DSparkError(f"top-k must be >= 0 (0 = off); got {k.tolist()}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise DSparkError(f"top-p must be in (0, 1]; got {p.tolist()}")


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) as int32, the same index (the first maximum; the first NaN
    if any), from a max and a min instead of XLA:CPU's variadic argmax reduction, which
    ran 4-5x slower over [rows, vocabulary] logits."""
    v = x.shape[-1]
    nan = jnp.isnan(x)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == jnp.max(x, axis=-1, keepdims=True))
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1).astype(jnp.int32)


def _bcast(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def warp(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Logits [B, ..., V] -> probabilities [B, ..., V] under each row's sampling params.

    The two sorts that top-k / top-p need cost more than a small model's forward pass
    on a CPU, so they run (lax.cond) only when some sampled row asks for a truncation,
    and a batch of greedy rows skips the softmax as well. Every branch gives each row
    exactly the distribution the full rule gives it.
    """
    logits = logits.astype(jnp.float32)
    nd, v = logits.ndim, logits.shape[-1]
    greedy = jax.nn.one_hot(argmax(logits), v, dtype=jnp.float32)
    if sp.greedy:
        return greedy
    t = _bcast(sp.temperature, nd)
    sampled = sp.temperature > 0
    truncated = sampled & ((sp.top_k > 0) & (sp.top_k < v) | (sp.top_p < 1))

    def plain(scaled):
        return jax.nn.softmax(scaled, axis=-1)

    def nucleus(scaled):
        # top-k: keep logits >= the k-th largest (ties at the boundary are kept)
        k = _bcast(sp.top_k, nd)
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, v - 1), axis=-1)
        scaled = jnp.where((k > 0) & (scaled < kth), -jnp.inf, scaled)
        # top-p (nucleus): smallest prefix of the sorted distribution with mass >= p
        probs = jax.nn.softmax(scaled, axis=-1)
        sorted_p = -jnp.sort(-probs, axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each entry
        keep_sorted = before < _bcast(sp.top_p, nd)
        # the smallest kept probability is the threshold in the unsorted order
        thresh = jnp.min(jnp.where(keep_sorted, sorted_p, jnp.inf), axis=-1, keepdims=True)
        probs = jnp.where(probs >= thresh, probs, 0.0)
        return probs / jnp.sum(probs, axis=-1, keepdims=True)

    def sampled_probs(scaled):
        return jax.lax.cond(jnp.any(truncated), nucleus, plain, scaled)

    scaled = logits / jnp.where(t > 0, t, 1.0)
    probs = jax.lax.cond(jnp.any(sampled), sampled_probs, lambda x: greedy, scaled)
    return jnp.where(t > 0, probs, greedy)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per row from probabilities [..., V] (zeros are never drawn): the Gumbel-max
    trick, as jax.random.categorical draws, with the cheaper `argmax`."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return argmax(logp + jax.random.gumbel(key, logp.shape, jnp.float32))


def sample_rows(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per request with its own key: keys [B], probs [B, ..., V].

    When every distribution has a single nonzero entry (a greedy batch: `warp` at
    temperature 0 gives one-hots), that entry is the draw whatever the key, so the
    draw is its argmax and the Gumbel noise (the costliest part of a small model's
    round on a CPU, at V noise draws per row) is skipped (lax.cond): the same
    result, not an approximation."""
    def draw(p):
        return jax.vmap(sample)(keys, p)

    def only_entry(p):
        return argmax(p)

    certain = jnp.all(jnp.sum(probs > 0, axis=-1) == 1)
    return jax.lax.cond(certain, only_entry, draw, probs)


def draw(keys: jax.Array, logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """One token per request from logits [B, ..., V] under its sampling parameters:
    `sample_rows(keys, warp(logits, sp))`, or the argmax when `sp.greedy` promises
    greedy rows (the same token, without building the distributions)."""
    if sp.greedy:
        return argmax(logits)
    return sample_rows(keys, warp(logits, sp))


def greedy_accept(draft: jax.Array, logits: jax.Array, depth: jax.Array):
    """`accept_drafts` for greedy rows, from the target's logits [B, G+1, V]: a draft
    survives while it equals the target's argmax, and the next token is the argmax after
    the last survivor (the correction at a rejection, the bonus token otherwise). This
    is exactly what rejection sampling gives on one-hot distributions."""
    b, g = draft.shape
    best = argmax(logits)  # [B, G+1]
    ok = (draft == best[:, :g]) & (jnp.arange(g)[None, :] < depth[:, None])
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_drafts(keys: jax.Array, draft: jax.Array, q: jax.Array, p: jax.Array,
                  depth: jax.Array):
    """Lossless speculative acceptance for a batch.

    draft [B, G]: draft tokens x_1..x_G; q [B, G, V]: their (warped) draft distributions;
    p [B, G+1, V]: warped target distributions, p[:, k] is the target's distribution for
    the token after slot k (so x_{k+1} is judged against p[:, k]); depth [B] in [0, G]:
    how many drafts were verified.

    Returns (n_accepted [B], next_token [B]): x_1..x_n are kept and next_token is the
    residual resample at the first rejection, or the bonus token from p[:, depth].
    """
    b, g = draft.shape
    k_accept, k_next = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (g,)))(k_accept)
    p_x = jnp.take_along_axis(p[:, :g], draft[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    ok = (u * q_x < p_x) & (jnp.arange(g)[None, :] < depth[:, None])
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), n[:, None, None], axis=1)[:, 0]
    rejected = (n < depth)[:, None]
    residual = jnp.maximum(p_n - q_n, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # mass 0 cannot happen after a genuine rejection (p(x) < q(x) implies mass elsewhere);
    # falling back to p keeps the function total.
    dist = jnp.where(rejected & (mass > 0), residual / jnp.where(mass > 0, mass, 1.0), p_n)
    return n, sample_rows(k_next, dist)
