"""The DSpark / DFlash training objective as pure functions of arrays.

Per sequence, up to `num_anchors` anchors a are sampled where the anchor and its first
target are answer tokens. Each anchor forms one block [x_a, mask x (G-1)] at positions
a..a+G-1 predicting x_{a+1}..x_{a+G}; all blocks share one drafter pass through a
block-sparse mask (block i sees context strictly before a_i and its own block).
In z-lab's convention (block_convention=zlab) the anchor's position predicts nothing:
positions a+1..a+G-1 predict x_{a+1}..x_{a+G-1} against the target at a..a+G-2, so
train/step.py drops position 0's hidden state and the last target and target
distribution, and weights G - 1 drafts.
Losses are weighted by w_k = exp(-(k-1)/decay) and by validity (a prefix of in-answer
targets): DSpark = 0.1 CE + 0.9 TV + 1.0 BCE(c_k, 1 - TV_k/2); DFlash = CE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def position_weights(block: int, decay: float) -> jax.Array:
    """w_k = exp(-(k-1)/decay), k = 1..block."""
    return jnp.exp(-jnp.arange(block, dtype=jnp.float32) / decay)


def anchor_candidates(loss_mask: jax.Array) -> jax.Array:
    """[B, L] bool: a is an anchor candidate iff a and a+1 are both answer tokens."""
    m = loss_mask.astype(bool)
    return m & jnp.pad(m[:, 1:], ((0, 0), (0, 1)))


def sample_anchors(key: jax.Array, loss_mask: jax.Array, num_anchors: int):
    """Up to num_anchors distinct anchors per row, uniformly without replacement.

    Returns (anchors [B, N] int32 ascending among valid ones, valid [B, N] bool).
    """
    ok = anchor_candidates(loss_mask)
    n = min(num_anchors, loss_mask.shape[1])
    scores = jnp.where(ok, jax.random.uniform(key, ok.shape), -1.0)
    top, idx = jax.lax.top_k(scores, n)
    valid = top >= 0
    # order valid anchors by position (invalid ones last) for readable masks
    order = jnp.argsort(jnp.where(valid, idx, loss_mask.shape[1] + idx), axis=1)
    idx = jnp.take_along_axis(idx, order, axis=1)
    valid = jnp.take_along_axis(valid, order, axis=1)
    return idx.astype(jnp.int32), valid


def block_targets(input_ids: jax.Array, loss_mask: jax.Array, anchors: jax.Array, valid: jax.Array,
                  block: int):
    """targets [B, N, G] = x_{a+k}; tvalid [B, N, G]: a prefix of in-answer, in-range targets."""
    length = input_ids.shape[1]
    pos = anchors[..., None] + 1 + jnp.arange(block)[None, None, :]
    inside = pos < length
    posc = jnp.minimum(pos, length - 1)
    tok = jnp.take_along_axis(input_ids[:, None, :], posc, axis=2)
    ans = jnp.take_along_axis(loss_mask[:, None, :].astype(bool), posc, axis=2) & inside
    tvalid = (jnp.cumprod(ans.astype(jnp.int32), axis=-1) > 0) & valid[..., None]
    return tok, tvalid


def block_sparse_mask(anchors: jax.Array, valid: jax.Array, length: int, block: int) -> jax.Array:
    """[B, N*G, L + N*G]: block i's queries see context < a_i and block i's own keys."""
    b, n = anchors.shape
    q_block = jnp.repeat(jnp.arange(n), block)                       # [NG]
    ctx = jnp.arange(length)[None, None, :] < jnp.repeat(anchors, block, axis=1)[:, :, None]
    own = q_block[:, None] == q_block[None, :]                        # [NG, NG]
    ctx = ctx & jnp.repeat(valid, block, axis=1)[:, :, None]
    return jnp.concatenate([ctx, jnp.broadcast_to(own, (b, n * block, n * block))], axis=-1)


def bce_with_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def losses(q_logits, p_logits, targets, tvalid, weights, conf_logits=None, *, ce_weight=0.1,
           tv_weight=0.9, conf_weight=1.0, kind="dspark"):
    """Scalar losses. q_logits/p_logits [..., G, V] (draft / target), targets [..., G],
    tvalid [..., G] bool, weights [G], conf_logits [..., G] or None."""
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    p = jax.nn.softmax(p_logits.astype(jnp.float32), axis=-1)
    w = weights * tvalid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1e-6)
    ce_k = -jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
    ce = jnp.sum(w * ce_k) / denom
    tv_k = jnp.sum(jnp.abs(jnp.exp(logq) - p), axis=-1)  # ||q - p||_1 in [0, 2]
    tv = jnp.sum(w * tv_k) / denom
    out = {"ce": ce, "tv": tv, "accept_rate": jnp.sum(w * (1 - tv_k / 2)) / denom, "weight": denom}
    if kind == "dflash":
        out["loss"] = ce
        return out
    total = ce_weight * ce + tv_weight * tv
    if conf_logits is not None:
        c_star = jax.lax.stop_gradient(1.0 - tv_k / 2)
        conf = jnp.sum(w * bce_with_logits(conf_logits, c_star)) / denom
        out["conf"] = conf
        total = total + conf_weight * conf
    out["loss"] = total
    return out
