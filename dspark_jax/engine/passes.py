"""The target's passes of a round, packed into a static token budget.

`verify` runs the verification pass over the valid slots of a [S, W] grid (each row's
anchor and the drafts it verifies) and, optionally, prompt chunks of rows being
admitted in the same pass; `prefill` runs a packed prefill of whole prompts. Targets
without a packed pass fall back to their dense [S, W] calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax import target


def _pack(valid: jax.Array, budget: int):
    """(packed grid index [budget] of each valid slot, its validity, the packed index of
    every grid slot [S * W]) for valid [S, W]; at most `budget` slots are valid."""
    s, w = valid.shape
    flat = valid.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=budget, fill_value=s * w)
    ok = idx < s * w
    where = jnp.clip(jnp.cumsum(flat) - 1, 0, budget - 1)
    return jnp.minimum(idx, s * w - 1), ok, where


def verify(tcfg, tparams, tokens: jax.Array, valid: jax.Array, cache, taps_wanted, budget: int, tail=None):
    """Target pass over the valid slots of tokens [S, W] -> (logits [S, W, V], cache, taps).

    The valid slots (at most `budget`) go through one [budget]-token pass and come back to
    the [S, W] layout; entries of invalid slots are garbage nobody reads.

    tail (packed targets only): None, or (tokens [R, C], rows [R], valid [R, C], last [R]):
    prompt chunks in the same pass, line l at positions lengths[rows[l]] + 0..C-1, on its
    own attention grid -> ((logits [S, W, V], logits at each line's token last[l] [R, V]),
    cache, (taps [S, W, E] each, tail taps [R, C, E] each)).
    """
    s, w = tokens.shape
    if not target.supports_packed(tcfg):
        return target.step(tcfg, tparams, tokens, jnp.sum(valid, axis=1).astype(jnp.int32), cache, taps_wanted)
    idx, ok, where = _pack(valid, budget)
    rows, cols = idx // w, idx % w
    tok, pos = tokens.reshape(-1)[idx], cache.lengths[rows] + cols
    select, lines = None, None
    if tail is not None:
        t_tok, t_rows, t_ok, t_last = tail
        lines = t_tok.shape
        r, c = lines
        tok = jnp.concatenate([tok, t_tok.reshape(-1)])
        pos = jnp.concatenate([pos, (cache.lengths[t_rows][:, None] + jnp.arange(c)[None, :]).reshape(-1)])
        rows = jnp.concatenate([rows, jnp.repeat(t_rows, c)])
        ok = jnp.concatenate([ok, t_ok.reshape(-1)])
        select = jnp.concatenate([jnp.arange(budget), budget + jnp.arange(r) * c + t_last])
    logits, cache, taps = target.step_packed(tcfg, tparams, tok, rows, pos, ok, cache, taps_wanted,
                                             query_block=w if budget > s else None, select=select, tail=lines)

    def unpack(x):
        return x[where].reshape((s, w) + x.shape[1:])

    if tail is None:
        return unpack(logits), cache, tuple(unpack(t) for t in taps)
    return ((unpack(logits[:budget]), logits[budget:]), cache,
            (tuple(unpack(t[:budget]) for t in taps), tuple(t[budget:].reshape(lines + t.shape[1:]) for t in taps)))


def prefill(tcfg, tparams, prompts: jax.Array, q_lens: jax.Array, cache, taps_wanted, budget: int | None):
    """Prefill of the q_lens [S] leading tokens of prompts [S, W] (rows with 0 untouched)
    -> (last-token logits [S, V], cache, taps [S, W, E] each). With a budget (>= sum
    q_lens) on a packed target, one packed pass of that many tokens; else a dense pass."""
    s, w = prompts.shape
    if budget is None or not target.supports_packed(tcfg):
        return target.prefill(tcfg, tparams, prompts, q_lens, cache, taps_wanted)
    valid = jnp.arange(w)[None, :] < q_lens[:, None]
    idx, ok, where = _pack(valid, budget)
    last = where[jnp.arange(s) * w + jnp.maximum(q_lens - 1, 0)]
    logits, cache, taps = target.prefill_packed(tcfg, tparams, prompts.reshape(-1)[idx], idx // w, idx % w, ok,
                                                last, cache, taps_wanted, query_block=w)
    return logits, cache, tuple(t[where].reshape((s, w) + t.shape[1:]) for t in taps)
