"""The jit-compiled, static-shape speculation round for a batch of requests.

One round, for every active request r with verification depth l_r in [0, gamma]:
  draft   the drafter proposes x_1..x_gamma after the anchor x_0 (the last committed
          token, whose K/V is not in the target cache yet), with draft distributions q;
  verify  ONE target pass over [x_0, x_1..x_l] (1 + l_r valid slots, the rest inert);
  accept  lossless rejection sampling; commit x_1..x_n plus a residual or bonus token;
  update  target cache length += n + 1; the drafter ingests the target features of the
          committed positions; stop tokens and max_new_tokens end requests.
Nothing here syncs with the host; shapes depend only on (batch, gamma, cache length).
Plain decoding is the same round with gamma = 0 and no drafter. A state with a
`FeatureLog` keeps every committed position's features there, and the drafter ingests
them only for rows it is current on in rounds that draft (lazy ingest: the engine
flushes a row's backlog before drafting for it).

A drafter is a static object (hashable, passed as a jit static argument) offering:
  tap_layers                               target layers whose outputs it reads
  init_cache(batch, max_len)               its cache pytree
  ingest(dparams, tparams, dcache, feats [B,T,F], next_tokens [B,T], start [B], count [B])
      -> dcache    (feats of positions start..start+count-1; next_tokens[t] is the token
                    at position start+t+1)
  propose(dparams, tparams, dcache, anchor [B], start [B], sampling, keys [B])
      -> (draft [B,G] int32, q [B,G,V] warped draft probs, confidence [B,G] float32)
                   (with sampling.greedy, q may be [B,G,1]: greedy acceptance never reads it)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax import target
from dspark_jax.kv_cache import KVCache
from dspark_jax.sampling import SamplingParams, accept_drafts, draw, greedy_accept, warp


@struct.dataclass
class DecodeState:
    cache: KVCache
    draft_cache: Any
    anchor: jax.Array     # [B] int32: last committed token (not yet in the target cache)
    keys: jax.Array       # [B] per-request PRNG keys
    done: jax.Array       # [B] bool
    out: jax.Array        # [B, N] int32 generated tokens
    n_out: jax.Array      # [B] int32
    max_new: jax.Array    # [B] int32
    stop_ids: jax.Array   # [B, S] int32, -1 = unused
    sampling: SamplingParams
    log: Any = None       # FeatureLog, or None: every round ingests its committed positions


@struct.dataclass
class FeatureLog:
    """The target features of every position in each row's cache, for a drafter that
    ingests lazily (the engine's gated policies).

    Row b's drafter cache holds positions 0..synced[b]-1; its later positions, up to the
    target cache length, are only here. Every round writes its committed positions, a
    prompt its positions as it enters; a drafted round also ingests them at once for rows
    the drafter is current on. `slot_round.flush_log` hands a row's backlog to the
    drafter before the row drafts, so a request never drafted for costs the drafter
    nothing. Memory: batch x max_len x the taps' width (the drafter's cache is about
    that size again).
    """

    feats: jax.Array   # [B, L, F] target features at each position (the drafter's taps, concatenated), as bits
    next: jax.Array    # [B, L] int32 the token after each position
    synced: jax.Array  # [B] int32 positions the drafter has ingested
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)  # the features' dtype

    @classmethod
    def init(cls, batch: int, max_len: int, feat_dim: int, dtype) -> "FeatureLog":
        # stored as unsigned ints of the same width: XLA:CPU scatters bfloat16 by converting
        # the whole buffer to float32 and back (~1 ms a round at 8 x 272 x 768), ints in place
        bits = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
        return cls(feats=jnp.zeros((batch, max_len, feat_dim), bits), next=jnp.zeros((batch, max_len), jnp.int32),
                   synced=jnp.zeros((batch,), jnp.int32), dtype=jnp.dtype(dtype))

    def write(self, feats: jax.Array, nxt: jax.Array, rows: jax.Array, start: jax.Array,
              count: jax.Array) -> "FeatureLog":
        """Line l (feats [R, T, F], next tokens [R, T]) holds positions start[l] ..
        start[l] + count[l] - 1 of row rows[l]."""
        t = feats.shape[1]
        steps = jnp.arange(t, dtype=jnp.int32)[None, :]
        pos = jnp.where(steps < count[:, None], start[:, None] + steps, self.next.shape[1])  # past the end: dropped
        row = rows[:, None]
        bits = jax.lax.bitcast_convert_type(feats.astype(self.dtype), self.feats.dtype)
        return self.replace(feats=self.feats.at[row, pos].set(bits, mode="drop"),
                            next=self.next.at[row, pos].set(nxt, mode="drop"))

    def read(self, rows: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(features [R, T, F], next tokens [R, T]) at positions pos [R, T] of rows [R]."""
        feats = self.feats[rows[:, None], pos]
        return jax.lax.bitcast_convert_type(feats, self.dtype), self.next[rows[:, None], pos]


@struct.dataclass
class RoundInfo:
    draft: jax.Array       # [B, G]
    confidence: jax.Array  # [B, G]
    depth: jax.Array       # [B] verified depth (0 for inactive rows)
    accepted: jax.Array    # [B] accepted drafts n
    committed: jax.Array   # [B] tokens appended to the output this round
    active: jax.Array      # [B] bool: the row took part in this round


def split_keys(keys: jax.Array, n: int) -> tuple[jax.Array, ...]:
    parts = jax.vmap(lambda k: jax.random.split(k, n))(keys)  # [B, n]
    return tuple(parts[:, i] for i in range(n))


def commit(state: DecodeState, new_tokens: jax.Array, count: jax.Array, active: jax.Array):
    """Append new_tokens[:, :count] to each active row, honouring stop ids and max_new."""
    b, width = new_tokens.shape
    slot = jnp.arange(width)[None, :]
    room = state.max_new - state.n_out
    limit = jnp.where(active, jnp.minimum(count, room), 0)
    is_stop = (new_tokens[:, :, None] == state.stop_ids[:, None, :]).any(-1) & (slot < limit[:, None])
    first_stop = jnp.argmax(is_stop, axis=1)
    hit = is_stop.any(axis=1)
    limit = jnp.where(hit, first_stop + 1, limit)
    index = jnp.where(slot < limit[:, None], state.n_out[:, None] + slot, state.out.shape[1])
    out = state.out.at[jnp.arange(b)[:, None], index].set(new_tokens, mode="drop")
    n_out = state.n_out + limit
    done = state.done | (active & (hit | (n_out >= state.max_new)))
    return state.replace(out=out, n_out=n_out, done=done), limit


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "max_new_cap"),
                   donate_argnames=("cache", "draft_cache"))
def start(tcfg, drafter, tparams, dparams, prompts, lengths, cache, draft_cache, keys,
          sampling: SamplingParams, max_new, stop_ids, max_new_cap: int):
    """Prefill prompts [B, T] (right-padded, `lengths` [B]) and sample the first token."""
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    last, cache, taps = target.prefill(tcfg, tparams, prompts, lengths, cache, taps_wanted)
    k_first, keys = split_keys(keys, 2)
    first = draw(k_first, last, sampling)
    if drafter is not None:
        feats = jnp.concatenate(taps, axis=-1)
        nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros_like(prompts[:, :1])], axis=1)
        nxt = jnp.where(jnp.arange(prompts.shape[1])[None] == (lengths - 1)[:, None], first[:, None], nxt)
        draft_cache = drafter.ingest(dparams, tparams, draft_cache, feats, nxt,
                                     jnp.zeros_like(lengths), lengths)
    b = prompts.shape[0]
    state = DecodeState(cache=cache, draft_cache=draft_cache, anchor=first, keys=keys,
                        done=jnp.zeros((b,), bool), out=jnp.zeros((b, max_new_cap), jnp.int32),
                        n_out=jnp.zeros((b,), jnp.int32), max_new=max_new, stop_ids=stop_ids,
                        sampling=sampling)
    state, _ = commit(state, first[:, None], jnp.ones((b,), jnp.int32), jnp.ones((b,), bool))
    return state


def draft_block(drafter, gamma: int, tparams, dparams, state: DecodeState, key):
    """(draft [B, G], q [B, G, V], confidence [B, G]); q may be [B, G, 1] when nothing is
    drafted or the sampling promises greedy rows (acceptance then never reads it)."""
    b = state.anchor.shape[0]
    if drafter is not None and gamma > 0:
        return drafter.propose(dparams, tparams, state.draft_cache, state.anchor, state.cache.lengths,
                               state.sampling, key)
    return (jnp.zeros((b, gamma), jnp.int32), jnp.zeros((b, gamma, 1), jnp.float32),
            jnp.zeros((b, gamma), jnp.float32))


def accept_and_commit(drafter, gamma: int, tparams, dparams, state: DecodeState, draft, q, logits,
                       cache, taps, depth, active, k_accept, keys, drafted: bool = True, chunk=None):
    """Lossless acceptance of the verified drafts, then every update a round makes:
    target cache length, drafter ingest of the committed positions, anchor, output.
    On a state with a `FeatureLog` the committed positions go to the log, and only a
    round that drafts ingests them, for the rows the drafter is current on.

    chunk: None, or (length [B], next tokens [B, W] or None) of prompt chunks that rode
    along in the verification pass (rows with length > 0, never active): their cache
    length grows by the chunk, and the drafter ingests it in the same call (taps are then
    [B, W, E]), or, with next tokens None, leaves it to the caller (taps stay [B, G + 1, E]).
    Returns (state, accepted n [B], committed tokens [B, G + 1], appended [B]).
    """
    pos0 = state.cache.lengths
    if state.sampling.greedy:  # argmax matching: the same outcome without distributions
        n, nxt = greedy_accept(draft, logits, depth)
    else:
        p = warp(logits, state.sampling)
        if drafter is None or gamma == 0 or not drafted:
            q = jnp.zeros(q.shape[:2] + p.shape[-1:], jnp.float32)  # nothing is drafted
        elif q.shape[-1] != p.shape[-1]:
            raise ValueError(f"drafter vocabulary {q.shape[-1]} != target vocabulary {p.shape[-1]}")
        n, nxt = accept_drafts(k_accept, draft, q, p, depth)
    n = jnp.where(active, n, 0)
    count = jnp.where(active, n + 1, 0)
    slot = jnp.arange(gamma + 1)[None, :]
    committed = jnp.where(slot < n[:, None], jnp.pad(draft, ((0, 0), (0, 1))), nxt[:, None])
    written, follow = count, committed
    ingested = count  # positions the drafter ingests here, per row
    if chunk is not None:
        length, nxt_chunk = chunk
        written = jnp.where(length > 0, length, count)
        if nxt_chunk is not None:
            padded = jnp.pad(committed, ((0, 0), (0, nxt_chunk.shape[1] - gamma - 1)))
            follow = jnp.where((length > 0)[:, None], nxt_chunk, padded)
            ingested = written
    cache = cache.replace(lengths=pos0 + written)
    draft_cache, log = state.draft_cache, state.log
    if drafter is not None:
        feats = jnp.concatenate(taps, axis=-1)
        if log is None:
            draft_cache = drafter.ingest(dparams, tparams, draft_cache, feats, follow, pos0, ingested)
        else:  # everything goes to the log; a drafted round also ingests for rows the drafter is current on
            log = log.write(feats, follow, jnp.arange(pos0.shape[0]), pos0, ingested)
            if drafted and gamma > 0:
                now = log.synced == pos0
                count_now = jnp.where(now, ingested, 0)
                draft_cache = drafter.ingest(dparams, tparams, draft_cache, feats, follow,
                                             jnp.where(now, pos0, log.synced), count_now)
                log = log.replace(synced=log.synced + count_now)
    state = state.replace(cache=cache, draft_cache=draft_cache, log=log,
                          anchor=jnp.where(active, nxt, state.anchor), keys=keys)
    state, appended = commit(state, committed, count, active)
    return state, n, committed, appended


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "gamma"), donate_argnames=("state",))
def spec_round(tcfg, drafter, gamma: int, tparams, dparams, state: DecodeState, depth: jax.Array):
    """One speculation round; `depth` [B] is each request's verification depth in [0, gamma]."""
    active = ~state.done
    depth = jnp.where(active, jnp.clip(depth, 0, gamma), 0).astype(jnp.int32)
    k_draft, k_accept, keys = split_keys(state.keys, 3)
    draft, q, conf = draft_block(drafter, gamma, tparams, dparams, state, k_draft)
    tokens = jnp.concatenate([state.anchor[:, None], draft], axis=1)
    q_lens = jnp.where(active, 1 + depth, 0)
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    logits, cache, taps = target.step(tcfg, tparams, tokens, q_lens, state.cache, taps_wanted)
    state, n, committed, appended = accept_and_commit(
        drafter, gamma, tparams, dparams, state, draft, q, logits, cache, taps, depth, active, k_accept, keys)
    info = RoundInfo(draft=draft, confidence=conf, depth=depth, accepted=n, committed=appended,
                     active=active)
    return state, info
