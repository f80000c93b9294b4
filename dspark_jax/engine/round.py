"""The engine's two compiled programs: `prefill` (admission by a prefill pass) and `rounds`
(one or several speculation rounds over every slot).

A round, for every active row r with verification depth l_r in [0, gamma]:
  draft    the drafter proposes x_1..x_gamma after the anchor x_0 (the last committed
           token, whose K/V is not in the target cache yet), with draft distributions q;
  schedule the policy picks l_r on the device (policies.py);
  verify   ONE packed target pass over [x_0, x_1..x_l] of every row, in a static token
           budget, plus the prompt chunk of a row being admitted (chunked prefill);
  accept   lossless rejection sampling; commit x_1..x_n plus a residual or bonus token;
  update   cache lengths, the drafter's ingest of the committed positions, stop ids and
           max_new_tokens end rows (`done`, on the device: a finished row idles through
           later rounds however late the host learns of it).
A round in which no row decodes (every row done, no prompt chunk riding) is skipped on the
device: the round the host sends before it learns a request ended, and the rest of a
several-round call whose rows all ended, cost next to nothing.
Nothing here syncs with the host; everything a round needs from the one before is in the
donated `DecodeState`. Each round returns a small packed summary (`pack_summary`) for the
host to read later.
A plain round (`draft=False`) drafts nothing and verifies one token per row.

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
import numpy as np
from flax import struct

from dspark_jax.engine import passes
from dspark_jax.engine.policies import Schedule, schedule_depths
from dspark_jax.sampling import SamplingParams, accept_drafts, draw, greedy_accept, warp


@struct.dataclass
class DecodeState:
    cache: Any            # the target's KVCache (or PagedKVCache, or a model's own cache)
    draft_cache: Any
    anchor: jax.Array     # [S] int32: last committed token (not yet in the target cache)
    keys: jax.Array       # [S] per-request PRNG keys
    done: jax.Array       # [S] bool: the row takes no part (empty, finished, cancelled, being admitted)
    n_out: jax.Array      # [S] int32 tokens the request holds (the prefill's first token included)
    max_new: jax.Array    # [S] int32
    max_depth: jax.Array  # [S] int32 the request's own depth limit
    stop_ids: jax.Array   # [S, K] int32, -1 = unused
    sampling: SamplingParams


@struct.dataclass
class Admission:
    """Prompt chunks that ride along in a round's verification pass (chunked prefill).

    A row takes chunks while it is being admitted: it is not active (done), its prompt
    enters the cache a chunk per round at positions cache length + 0.. (each chunk a
    dense line of C tokens with its own attention grid), and the round whose chunk ends
    the prompt samples its first token; the row drafts from the next round. The per-slot
    arrays are the full tables after admission.
    """

    tokens: jax.Array    # [R, C] int32 line l: prompt[p : p + length[l]] of slot rows[l]
    next: jax.Array      # [R, C] int32 the token after each (read as 0 past a final chunk's end)
    rows: jax.Array      # [R] int32 slot of each line
    length: jax.Array    # [R] int32 chunk length (0: an empty line)
    first: jax.Array     # [R] bool: the chunk starts the prompt (the row's cache restarts at 0)
    final: jax.Array     # [R] bool: the chunk ends the prompt (sample the first token)
    seeds: jax.Array     # [R] uint32 per-request seeds (read for final lines)
    sampling: SamplingParams
    max_new: jax.Array
    max_depth: jax.Array
    stop_ids: jax.Array


def pack_summary(ints: jax.Array, floats: jax.Array, totals: jax.Array) -> jax.Array:
    """What the host reads of a round, in one int32 array [S + 1, 4G + 7] (each array read
    back costs the host a fixed overhead, so there is one). Rows 0..S-1: the committed
    tokens (G + 1; the first `appended` count), the drafts (G), then appended, active,
    done, depth, accepted, first (the first token of a row whose final prompt chunk ran,
    else -1), then the bits of the float32 survival (G) and confidence (G). Row S: verified
    B, the capacity (production's K; other policies: drafts verified) and whether the round
    ran (0: skipped, no row decoding), then zeros."""
    body = jnp.concatenate([ints, jax.lax.bitcast_convert_type(floats.astype(jnp.float32), jnp.int32)], axis=1)
    last = jnp.zeros((1, body.shape[1]), jnp.int32).at[0, :3].set(totals)
    return jnp.concatenate([body, last])


def unpack_summary(packed: np.ndarray, gamma: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host's view of one packed summary [S + 1, 4G + 7]: (ints [S, 2G + 7], floats
    [S, 2G] float32, totals [3]: verified B, capacity, ran)."""
    w = 2 * gamma + 7
    return packed[:-1, :w], packed[:-1, w:].view(np.float32), packed[-1, :3]


def split_keys(keys: jax.Array, n: int) -> tuple[jax.Array, ...]:
    parts = jax.vmap(lambda k: jax.random.split(k, n))(keys)  # [S, n]
    return tuple(parts[:, i] for i in range(n))


def commit(state: DecodeState, new_tokens: jax.Array, count: jax.Array, active: jax.Array):
    """Count new_tokens[:, :count] into each active row, honouring stop ids and max_new
    -> (state, tokens appended [S])."""
    width = new_tokens.shape[1]
    slot = jnp.arange(width)[None, :]
    limit = jnp.where(active, jnp.minimum(count, state.max_new - state.n_out), 0)
    is_stop = (new_tokens[:, :, None] == state.stop_ids[:, None, :]).any(-1) & (slot < limit[:, None])
    hit = is_stop.any(axis=1)
    limit = jnp.where(hit, jnp.argmax(is_stop, axis=1) + 1, limit).astype(jnp.int32)
    n_out = state.n_out + limit
    done = state.done | (active & (hit | (n_out >= state.max_new)))
    return state.replace(n_out=n_out, done=done), limit


def _ingest(drafter, tparams, dparams, draft_cache, taps, follow, start, count):
    if drafter is None:
        return draft_cache
    return drafter.ingest(dparams, tparams, draft_cache, jnp.concatenate(taps, axis=-1), follow, start, count)


def _start_rows(state: DecodeState, stale, rows, first, k_next):
    """Rows whose whole prompt is in the cache start decoding: `first` [S] is their anchor
    and first output token; their keys, output count and stale survival restart."""
    state = state.replace(anchor=jnp.where(rows, first, state.anchor), keys=jnp.where(rows, k_next, state.keys),
                          done=state.done & ~rows, n_out=jnp.where(rows, 0, state.n_out))
    state, _ = commit(state, first[:, None], jnp.ones(rows.shape, jnp.int32), rows)
    return state, jnp.where(rows[None, :, None], 0.0, stale)


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "budget"), donate_argnames=("state", "stale"))
def prefill(tcfg, drafter, tparams, dparams, state: DecodeState, stale, rows, prompts, lengths, seeds,
            sampling: SamplingParams, max_new, max_depth, stop_ids, budget: int | None = None):
    """Prefill prompts [S, T] into the slots selected by `rows` [S] bool and sample their
    first tokens; other rows stay exactly as they were. seeds [S]: per-request seeds (read
    for admitted rows); sampling, max_new, max_depth, stop_ids: the full per-slot tables
    after admission; budget (static): the packed pass's token bucket (None: a dense pass).
    Returns (state, stale, first tokens [S])."""
    old = state.cache.lengths
    q_lens = jnp.where(rows, lengths, 0).astype(jnp.int32)
    cache = state.cache.replace(lengths=jnp.where(rows, 0, old))
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    last, cache, taps = passes.prefill(tcfg, tparams, prompts, q_lens, cache, taps_wanted, budget)
    cache = cache.replace(lengths=jnp.where(rows, lengths, old))
    k_first, k_next = split_keys(jax.vmap(jax.random.key)(seeds), 2)
    first = draw(k_first, last, sampling)
    nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros_like(prompts[:, :1])], axis=1)
    nxt = jnp.where(jnp.arange(prompts.shape[1])[None] == (lengths - 1)[:, None], first[:, None], nxt)
    draft_cache = _ingest(drafter, tparams, dparams, state.draft_cache, taps, nxt, jnp.where(rows, 0, old), q_lens)
    state = state.replace(cache=cache, draft_cache=draft_cache, max_new=max_new, max_depth=max_depth,
                          stop_ids=stop_ids, sampling=sampling)
    state, stale = _start_rows(state, stale, rows, first, k_next)
    return state, stale, first


def _take_admission(state: DecodeState, a: Admission):
    s = state.anchor.shape[0]
    line = jnp.where(a.length > 0, a.rows, s)  # slot of each line; empty lines scatter nowhere
    restart = jnp.zeros((s,), bool).at[line].set(a.first, mode="drop")
    # a row whose prompt starts takes no part until its prompt is in (a cancelled request's
    # row may still be active on the device when the host seats the next one there)
    return state.replace(sampling=a.sampling, max_new=a.max_new, max_depth=a.max_depth, stop_ids=a.stop_ids,
                         done=state.done | restart,
                         cache=state.cache.replace(lengths=jnp.where(restart, 0, state.cache.lengths))), line


def _round(tcfg, drafter, gamma: int, budget: int, policy: str, draft: bool, tparams, dparams,
           state: DecodeState, stale, sched: Schedule, admission: Admission | None):
    """One round (see the module docstring) -> (state, stale, packed summary)."""
    s = state.anchor.shape[0]
    if admission is not None:
        state, line = _take_admission(state, admission)
    state = state.replace(done=state.done | ~sched.live)
    active = ~state.done
    if state.sampling.greedy:  # no draw reads a key: they stay as they are
        k_draft = k_accept = keys = state.keys
    else:
        k_draft, k_accept, keys = split_keys(state.keys, 3)
    g = gamma if draft and drafter is not None else 0
    if g:
        draft_tokens, q, conf = drafter.propose(dparams, tparams, state.draft_cache, state.anchor,
                                                state.cache.lengths, state.sampling, k_draft)
    else:
        draft_tokens, q, conf = (jnp.zeros((s, 0), jnp.int32), jnp.zeros((s, 0, 1), jnp.float32),
                                 jnp.zeros((s, 0), jnp.float32))
    # drafts past the room left (max_new - n_out - 1) could never be committed
    max_depth = jnp.clip(jnp.minimum(state.max_depth, state.max_new - state.n_out - 1), 0, g)
    depth, survival, capacity = schedule_depths(policy if g else "none", budget, conf, stale, sched, active,
                                                max_depth)
    tokens = jnp.concatenate([state.anchor[:, None], draft_tokens], axis=1)
    valid = active[:, None] & (jnp.arange(g + 1)[None, :] <= depth[:, None])
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    pos0 = state.cache.lengths
    first = jnp.full((s,), -1, jnp.int32)
    if admission is None:
        logits, cache, taps = passes.verify(tcfg, tparams, tokens, valid, state.cache, taps_wanted, budget)
    else:
        a = admission
        c = a.tokens.shape[1]
        last_col = jnp.maximum(a.length - 1, 0)
        t_ok = jnp.arange(c)[None, :] < a.length[:, None]
        (logits, last), cache, (taps, t_taps) = passes.verify(tcfg, tparams, tokens, valid, state.cache,
                                                              taps_wanted, budget, tail=(a.tokens, a.rows, t_ok,
                                                                                         last_col))
    # acceptance
    if state.sampling.greedy:  # argmax matching: the same outcome without distributions
        n, nxt = greedy_accept(draft_tokens, logits, depth)
    else:
        p = warp(logits, state.sampling)
        if not g:
            q = jnp.zeros(q.shape[:2] + p.shape[-1:], jnp.float32)
        elif q.shape[-1] != p.shape[-1]:
            raise ValueError(f"drafter vocabulary {q.shape[-1]} != target vocabulary {p.shape[-1]}")
        n, nxt = accept_drafts(k_accept, draft_tokens, q, p, depth)
    n = jnp.where(active, n, 0)
    count = jnp.where(active, n + 1, 0)
    committed = jnp.where(jnp.arange(g + 1)[None, :] < n[:, None], jnp.pad(draft_tokens, ((0, 0), (0, 1))),
                          nxt[:, None])
    cache = cache.replace(lengths=pos0 + count)
    draft_cache = _ingest(drafter, tparams, dparams, state.draft_cache, taps, committed, pos0, count)
    state = state.replace(cache=cache, draft_cache=draft_cache, anchor=jnp.where(active, nxt, state.anchor),
                          keys=keys)
    state, appended = commit(state, committed, count, active)
    if admission is not None:  # the chunks enter the cache (and the drafter) after the verified blocks
        k_first, k_next = split_keys(jax.vmap(jax.random.key)(a.seeds), 2)
        sampled = draw(k_first, last, jax.tree.map(lambda x: x[a.rows], state.sampling))
        at_end = a.final[:, None] & (jnp.arange(c)[None, :] == last_col[:, None])
        follow = jnp.where(at_end, sampled[:, None], a.next)
        start = state.cache.lengths[a.rows]
        length = jnp.zeros((s,), jnp.int32).at[line].set(a.length, mode="drop")
        state = state.replace(cache=state.cache.replace(lengths=state.cache.lengths + length))
        if drafter is not None:
            feats = jnp.concatenate(t_taps, axis=-1)
            if hasattr(drafter, "ingest_lines"):
                dcache = drafter.ingest_lines(dparams, tparams, state.draft_cache, feats, follow, a.rows, start,
                                              a.length)
            else:  # a drafter without line ingest takes the lines on their slots' rows of an [S, C] grid
                grid = jnp.zeros((s, c, feats.shape[-1]), feats.dtype).at[line].set(feats, mode="drop")
                nxt_grid = jnp.zeros((s, c), jnp.int32).at[line].set(follow, mode="drop")
                dcache = drafter.ingest(dparams, tparams, state.draft_cache, grid, nxt_grid,
                                        jnp.zeros((s,), jnp.int32).at[line].set(start, mode="drop"), length)
            state = state.replace(draft_cache=dcache)
        started = jnp.zeros((s,), bool).at[line].set(a.final, mode="drop")
        first = jnp.zeros((s,), jnp.int32).at[line].set(sampled, mode="drop")
        k_next = jnp.zeros_like(state.keys).at[line].set(k_next, mode="drop")
        state, stale = _start_rows(state, stale, started, first, k_next)
        first = jnp.where(started, first, -1)
    if g:
        stale = jnp.stack([stale[1], survival])
    pad = ((0, 0), (0, gamma - g))
    ints = jnp.concatenate([jnp.pad(committed, pad), jnp.pad(draft_tokens, pad),
                            jnp.stack([appended, active, state.done, depth, n, first], axis=1).astype(jnp.int32)],
                           axis=1)
    floats = jnp.pad(jnp.concatenate([survival, conf], axis=1), ((0, 0), (0, 2 * (gamma - g))))
    totals = jnp.stack([jnp.sum(jnp.where(active, 1 + depth, 0)), capacity, 1]).astype(jnp.int32)
    return state, stale, pack_summary(ints, floats, totals)


def _skipped(state: DecodeState, gamma: int) -> jax.Array:
    """The packed summary of a skipped round (no row decoded): every row's `done`, no token."""
    s = state.done.shape[0]
    ints = jnp.concatenate([jnp.zeros((s, 2 * gamma + 3), jnp.int32), state.done[:, None].astype(jnp.int32),
                            jnp.zeros((s, 2), jnp.int32), jnp.full((s, 1), -1, jnp.int32)], axis=1)
    return pack_summary(ints, jnp.zeros((s, 2 * gamma), jnp.float32), jnp.zeros((3,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "gamma", "budget", "policy", "draft", "count"),
                   donate_argnames=("state", "stale"))
def rounds(tcfg, drafter, gamma: int, budget: int, policy: str, draft: bool, count: int, tparams, dparams,
           state: DecodeState, stale: jax.Array, sched: Schedule, admission: Admission | None = None):
    """`count` (static) rounds in one call; the admission rides in the first. budget
    (static): the verification pass's token bucket, >= the active rows; policy (static):
    one of policies.POLICIES; stale [2, S, G]: the survival of the last two drafted
    rounds. Returns (state, stale, packed summaries [count, S + 1, 4G + 7]). The rounds
    without admission are one loop that stops at the first round with no row decoding
    (the program holds one round's code; the rounds it skips report `ran` 0)."""
    first = None
    if admission is not None:
        state, stale, first = _round(tcfg, drafter, gamma, budget, policy, draft, tparams, dparams, state, stale,
                                     sched, admission)
    state = state.replace(done=state.done | ~sched.live)
    todo = count - (first is not None)

    def more(carry):
        i, st, _, _ = carry
        return (i < todo) & jnp.any(~st.done)

    def body(carry):
        i, st, sl, out = carry
        st, sl, summary = _round(tcfg, drafter, gamma, budget, policy, draft, tparams, dparams, st, sl, sched, None)
        return i + 1, st, sl, out.at[i].set(summary)

    out = jnp.zeros((todo, state.done.shape[0] + 1, 4 * gamma + 7), jnp.int32)
    if todo:
        ran, state, stale, out = jax.lax.while_loop(more, body, (jnp.int32(0), state, stale, out))
        out = jnp.where((jnp.arange(todo) < ran)[:, None, None], out, _skipped(state, gamma)[None])
    return state, stale, out if first is None else jnp.concatenate([first[None], out])


def compiled_programs() -> int:
    """How many programs of `rounds` and `prefill` are compiled in this process (a count
    that grows while serving means a call compiled)."""
    return rounds._cache_size() + prefill._cache_size()
