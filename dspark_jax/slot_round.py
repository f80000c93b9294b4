"""The serving engine's rounds over its slots: admission by prefill and the scheduled round.

The engine keeps one DecodeState row per slot; an empty or finished slot has done=True
and takes no part. `admit` prefills newly admitted rows in place; `engine_round` is
`spec_round` with the verification depth decided ON DEVICE by a scheduling policy and
the verification pass packed into a static token budget (a bucket). It stays lossless
because whether a draft x_j is verified never depends on x_j itself, only on the drafts
before it and on quantities fixed before the round:
  fixed / max depth   fixed before the round (the room left, a per-request limit);
  threshold           x_j is verified iff c_1..c_j pass, and c_j depends on x_<j only;
  algorithm1          the causal early stop (scheduler.py);
  production          capacity K from the survival of two rounds earlier, then top-K by
                      current survival, where (r, j) ranks behind (r, j-1);
  the budget bucket   chosen by the host from previous rounds; algorithm1 sees SPS past
                      it as 0 (a fixed curve), production caps K, and `cap_depths`
                      admits position-major;
  plain rounds        (draft=False) the host's choice, from previous rounds' survival,
                      to skip drafting: every depth is 0 and the stale survival is kept
                      as it was;
  rows not drafted    a depth limit of 0 (Schedule.max_depth), the host's choice too.
With a `FeatureLog` in the state (lazy ingest) the committed positions and the prompts
go to the log, and `flush_log` hands a row's backlog to the drafter before the host
drafts for that row; drafts of a row the drafter lags on are garbage, verified never.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax import target
from dspark_jax.sampling import SamplingParams, draw
from dspark_jax.speculate import DecodeState, accept_and_commit, commit, draft_block, split_keys

POLICIES = ("none", "fixed", "algorithm1", "production", "threshold")


@struct.dataclass
class Schedule:
    """Per-round scheduling inputs (arrays, so changing them never recompiles)."""

    sps: jax.Array        # [Bmax + 1] float32 target steps/s at B verified tokens (index 0 unused)
    max_depth: jax.Array  # [S] int32 per-request depth limit (the fixed policy's depth)
    threshold: jax.Array  # [] float32 per-step confidence threshold
    draft_time: jax.Array  # [] float32 seconds of one drafting pass (0: the paper's objective)
    prior: jax.Array       # [G] float32 survival assumed for rows with no history yet (production)
    conf_scale: Any = None  # [2, G] float32 online correction of c_k for greedy / sampled rows (None: 1)


@struct.dataclass
class Admission:
    """Prompt chunks that ride along in a round's verification pass (chunked prefill).

    A row takes chunks while it is being admitted: it is not active (done), its prompt
    enters the cache a chunk per round at positions cache length + 0.. (each chunk a
    dense line of C tokens with its own attention grid), and the round whose chunk ends
    the prompt samples its first token; the row drafts from the next round.
    """

    tokens: jax.Array    # [R, C] int32 line l: prompt[p : p + length[l]] of slot rows[l]
    next: jax.Array      # [R, C] int32 the token after each (read as 0 past a final chunk's end)
    rows: jax.Array      # [R] int32 slot of each line
    length: jax.Array    # [R] int32 chunk length (0: an empty line)
    first: jax.Array     # [R] bool: the chunk starts the prompt (the row's cache restarts at 0)
    final: jax.Array     # [R] bool: the chunk ends the prompt (sample the first token)
    seeds: jax.Array     # [R] uint32 per-request seeds (read for final lines)
    sampling: SamplingParams  # per-slot arrays after admission (also max_new, stop_ids)
    max_new: jax.Array
    stop_ids: jax.Array


@struct.dataclass
class EngineRoundInfo:
    draft: jax.Array       # [S, G]
    confidence: jax.Array  # [S, G]
    survival: jax.Array    # [S, G] prefix survival (0 for inactive rows and past the depth limit)
    depth: jax.Array       # [S] verified depth
    accepted: jax.Array    # [S]
    tokens: jax.Array      # [S, G + 1] tokens committed this round: the first `appended`
    appended: jax.Array    # [S]
    active: jax.Array      # [S] bool: the row took part
    done: jax.Array        # [S] bool after the round
    capacity: jax.Array    # [] int32: production's K (other policies: drafts verified)
    verified: jax.Array    # [] int32: B = sum over active rows of (1 + depth)
    first: jax.Array       # [S] int32: first token of rows whose final prompt chunk ran (else 0)
    lag: jax.Array         # [S] int32: positions in the cache the drafter has not ingested (lazy ingest)


def cap_depths(depth: jax.Array, active: jax.Array, budget: int, gamma: int) -> jax.Array:
    """The longest position-major cut of `depth` [S] with sum(active * (1 + depth)) <= budget.

    All first drafts (by row), then all second drafts, ...: whether (r, j) survives the
    cut depends on other rows and on depth[r] > j, never on row r's later drafts.
    """
    room = budget - jnp.sum(active).astype(jnp.int32)
    requested = (jnp.arange(gamma)[:, None] < depth[None, :]) & active[None, :]  # [G, S]
    rank = jnp.cumsum(requested.reshape(-1)).reshape(requested.shape) - 1
    return jnp.sum(requested & (rank < room), axis=0).astype(jnp.int32)


def stale_estimate(stale: jax.Array, prior: jax.Array, live: jax.Array):
    """Survival two rounds old [S, G], with `prior` [G] for rows that have none yet (just
    admitted), masked to each row's live positions: what production's capacity reads."""
    known = jnp.any(stale > 0, axis=1, keepdims=True)
    return jnp.where(known, stale, prior[None, :]) * live


def schedule_depths(policy: str, budget: int, confidence: jax.Array, stale: jax.Array,
                    sched: Schedule, active: jax.Array, max_depth: jax.Array, sampled: jax.Array | None = None):
    """Depths [S] for this round -> (depth, survival [S, G], capacity []).

    stale [2, S, G]: survival of the rounds two and one before this one. The scheduled
    policies read c_k x sched.conf_scale[sampled_r, k] (clipped to 1), a correction
    learnt from earlier rounds only, so the depths stay lossless; sampled [S]: rows with
    temperature > 0 (None: every row greedy).
    """
    from dspark_jax import scheduler

    s, g = confidence.shape
    if policy in ("algorithm1", "production") and sched.conf_scale is not None:
        cls = jnp.zeros((s,), jnp.int32) if sampled is None else sampled.astype(jnp.int32)
        confidence = jnp.clip(confidence * sched.conf_scale[cls], 0.0, 1.0)
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


def _verify(tcfg, tparams, tokens: jax.Array, valid: jax.Array, cache, taps_wanted, budget: int, tail=None):
    """Target pass over the valid slots of tokens [S, W] -> (logits [S, W, V], cache, taps).

    Packed: the valid slots (at most `budget`) go through one [budget]-token pass and come
    back to the [S, W] layout; entries of invalid slots are garbage nobody reads. Targets
    without a packed pass use the dense [S, W] step.

    tail (packed targets only): None, or (tokens [R, C], rows [R], valid [R, C], last [R]):
    prompt chunks in the same pass, line l at positions lengths[rows[l]] + 0..C-1, on its
    own attention grid -> ((logits [S, W, V], logits at each line's token last[l] [R, V]),
    cache, (taps [S, W, E] each, tail taps [R, C, E] each)).
    """
    s, w = tokens.shape
    if not target.supports_packed(tcfg):
        return target.step(tcfg, tparams, tokens, jnp.sum(valid, axis=1).astype(jnp.int32), cache,
                           taps_wanted)
    flat = valid.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=budget, fill_value=s * w)
    ok = idx < s * w
    idx = jnp.minimum(idx, s * w - 1)
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
    where = jnp.clip(jnp.cumsum(flat) - 1, 0, budget - 1)  # packed index of every grid slot

    def unpack(x):
        return x[where].reshape((s, w) + x.shape[1:])

    if tail is None:
        return unpack(logits), cache, tuple(unpack(t) for t in taps)
    return ((unpack(logits[:budget]), logits[budget:]), cache,
            (tuple(unpack(t[:budget]) for t in taps), tuple(t[budget:].reshape(lines + t.shape[1:]) for t in taps)))


def _prefill_packed(tcfg, tparams, prompts, q_lens, cache, taps_wanted, budget: int):
    """Prefill of the q_lens [S] leading tokens of prompts [S, W] in one packed pass of
    `budget` (>= sum q_lens) tokens -> (last-token logits [S, V], cache, taps [S, W, E])."""
    s, w = prompts.shape
    valid = jnp.arange(w)[None, :] < q_lens[:, None]
    flat = valid.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=budget, fill_value=s * w)
    ok = idx < s * w
    idx = jnp.minimum(idx, s * w - 1)
    where = jnp.clip(jnp.cumsum(flat) - 1, 0, budget - 1)  # packed index of every grid slot
    last = where[jnp.arange(s) * w + jnp.maximum(q_lens - 1, 0)]
    logits, cache, taps = target.prefill_packed(tcfg, tparams, prompts.reshape(-1)[idx], idx // w, idx % w, ok,
                                                last, cache, taps_wanted, query_block=w)
    return logits, cache, tuple(t[where].reshape((s, w) + t.shape[1:]) for t in taps)


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "budget"), donate_argnames=("state", "stale"))
def admit(tcfg, drafter, tparams, dparams, state: DecodeState, stale, rows, prompts, lengths, keys,
          sampling: SamplingParams, max_new, stop_ids, budget: int | None = None):
    """Prefill prompts [S, T] into the slots selected by `rows` [S] bool and sample their
    first tokens; other rows have q_len 0 and stay exactly as they were.

    keys [S]: fresh per-request keys (read for admitted rows); sampling, max_new, stop_ids:
    the full per-slot arrays after admission; budget (static): when given (>= the admitted
    prompt tokens, on a target with a packed pass) the prefill packs the admitted tokens
    into one pass of that many, instead of a dense [S, T] pass over every slot.
    Returns (state, stale, first tokens [S]).
    """
    old = state.cache.lengths
    q_lens = jnp.where(rows, lengths, 0).astype(jnp.int32)
    cache = state.cache.replace(lengths=jnp.where(rows, 0, old))
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    if budget is not None and target.supports_packed(tcfg):
        last, cache, taps = _prefill_packed(tcfg, tparams, prompts, q_lens, cache, taps_wanted, budget)
        cache = cache.replace(lengths=jnp.where(rows, lengths, old))
    else:
        last, cache, taps = target.prefill(tcfg, tparams, prompts, q_lens, cache, taps_wanted)
    k_first, k_next = split_keys(keys, 2)
    first = draw(k_first, last, sampling)
    draft_cache, log = state.draft_cache, state.log
    if drafter is not None:
        feats = jnp.concatenate(taps, axis=-1)
        nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros_like(prompts[:, :1])], axis=1)
        nxt = jnp.where(jnp.arange(prompts.shape[1])[None] == (lengths - 1)[:, None], first[:, None], nxt)
        if log is None:
            draft_cache = drafter.ingest(dparams, tparams, draft_cache, feats, nxt, jnp.where(rows, 0, old), q_lens)
        else:  # the prompt waits in the log until the row is drafted for
            log = log.write(feats, nxt, jnp.arange(rows.shape[0]), jnp.zeros_like(q_lens), q_lens)
            log = log.replace(synced=jnp.where(rows, 0, log.synced))
    state = state.replace(cache=cache, draft_cache=draft_cache, log=log, max_new=max_new, stop_ids=stop_ids,
                          sampling=sampling)
    state, stale = _start_rows(state, stale, rows, first, k_next)
    return state, stale, first


def _start_rows(state: DecodeState, stale, rows, first, k_next):
    """Rows whose whole prompt is in the cache start decoding: `first` [S] is their anchor
    and first output token, their keys, output and stale survival restart."""
    state = state.replace(anchor=jnp.where(rows, first, state.anchor), keys=jnp.where(rows, k_next, state.keys),
                          done=state.done & ~rows, out=jnp.where(rows[:, None], 0, state.out),
                          n_out=jnp.where(rows, 0, state.n_out))
    state, _ = commit(state, first[:, None], jnp.ones(rows.shape, jnp.int32), rows)
    return state, jnp.where(rows[None, :, None], 0.0, stale)


@functools.partial(jax.jit, static_argnames=("tcfg", "drafter", "gamma", "budget", "policy", "draft"),
                   donate_argnames=("state", "stale"))
def engine_round(tcfg, drafter, gamma: int, budget: int, policy: str, tparams, dparams,
                 state: DecodeState, stale: jax.Array, sched: Schedule, draft: bool = True,
                 admission: Admission | None = None):
    """One round over the engine's slots with on-device depth scheduling.

    budget (static): the verification pass's token bucket N_b, >= the number of active
    rows; policy (static): one of POLICIES; stale [2, S, G]: the survival of the last two
    speculative rounds (shifted here); draft (static): False runs a plain decoding round
    (nothing drafted, every depth 0, stale kept); admission: prompt chunks of rows being
    admitted, in the same target pass (packed targets only; the [R, C] shape of its
    lines is part of the compiled program). Returns (state, stale, EngineRoundInfo).
    """
    s = state.anchor.shape[0]
    if admission is not None:
        a = admission
        line = jnp.where(a.length > 0, a.rows, s)  # slot of each line; empty lines scatter nowhere
        restart = jnp.zeros((s,), bool).at[line].set(a.first, mode="drop")
        state = state.replace(sampling=a.sampling, max_new=a.max_new, stop_ids=a.stop_ids,
                              cache=state.cache.replace(lengths=jnp.where(restart, 0, state.cache.lengths)))
        if state.log is not None:
            state = state.replace(log=state.log.replace(synced=jnp.where(restart, 0, state.log.synced)))
    active = ~state.done
    if state.sampling.greedy:  # no draw reads a key: they stay as they are
        k_draft = k_accept = keys = state.keys
    else:
        k_draft, k_accept, keys = split_keys(state.keys, 3)
    draft_tokens, q, conf = draft_block(drafter if draft else None, gamma, tparams, dparams, state, k_draft)
    # drafts past the room left (max_new - n_out - 1) could never be committed
    max_depth = jnp.clip(jnp.minimum(sched.max_depth, state.max_new - state.n_out - 1), 0, gamma)
    depth, survival, capacity = schedule_depths(policy if draft else "none", budget, conf, stale, sched, active,
                                                max_depth, sampled=state.sampling.temperature > 0)
    if not draft:
        survival = jnp.zeros_like(survival)
    g = gamma if draft else 0  # a plain round verifies and accepts on a one-token grid
    tokens = jnp.concatenate([state.anchor[:, None], draft_tokens[:, :g]], axis=1)
    valid = active[:, None] & (jnp.arange(g + 1)[None, :] <= depth[:, None])
    taps_wanted = drafter.tap_layers if drafter is not None else ()
    first, chunk, lines_apart = jnp.zeros((s,), jnp.int32), None, None
    if admission is None:
        logits, cache, taps = _verify(tcfg, tparams, tokens, valid, state.cache, taps_wanted, budget)
    else:
        c = a.tokens.shape[1]
        last_col = jnp.maximum(a.length - 1, 0)
        t_ok = jnp.arange(c)[None, :] < a.length[:, None]
        (logits, last), cache, (taps, t_taps) = _verify(tcfg, tparams, tokens, valid, state.cache, taps_wanted,
                                                        budget, tail=(a.tokens, a.rows, t_ok, last_col))
        k_first, k_next = split_keys(jax.vmap(jax.random.key)(a.seeds), 2)
        sampled = draw(k_first, last, jax.tree.map(lambda x: x[a.rows], state.sampling))
        at_end = a.final[:, None] & (jnp.arange(c)[None, :] == last_col[:, None])
        length = jnp.zeros((s,), jnp.int32).at[line].set(a.length, mode="drop")
        follow_lines = jnp.where(at_end, sampled[:, None], a.next)
        if state.log is not None or hasattr(drafter, "ingest_lines"):  # the lines go apart, after the slots
            lines_apart = (jnp.concatenate(t_taps, axis=-1), follow_lines, state.cache.lengths[a.rows])
            chunk = (length, None)
        else:  # one ingest over an [S, W] grid: verified blocks, and each line's chunk on its slot
            width = max(g + 1, c)
            taps = tuple(jnp.pad(v, ((0, 0), (0, width - g - 1), (0, 0))).at[line].set(
                jnp.pad(t, ((0, 0), (0, width - c), (0, 0))), mode="drop") for v, t in zip(taps, t_taps))
            follow = jnp.zeros((s, width), jnp.int32).at[line].set(
                jnp.pad(follow_lines, ((0, 0), (0, width - c))), mode="drop")
            chunk = (length, follow)
        started = jnp.zeros((s,), bool).at[line].set(a.final, mode="drop")
        first = jnp.zeros((s,), jnp.int32).at[line].set(sampled, mode="drop")
        k_next = jnp.zeros_like(state.keys).at[line].set(k_next, mode="drop")
    state, n, committed, appended = accept_and_commit(
        drafter, g, tparams, dparams, state, draft_tokens[:, :g], q[:, :g], logits, cache, taps, depth, active,
        k_accept, keys, drafted=draft, chunk=chunk)
    if lines_apart is not None:
        feats, follow_lines, start = lines_apart
        if state.log is not None:  # into the log (lazy ingest)
            state = state.replace(log=state.log.write(feats, follow_lines, a.rows, start, a.length))
        else:
            state = state.replace(draft_cache=drafter.ingest_lines(dparams, tparams, state.draft_cache, feats,
                                                                   follow_lines, a.rows, start, a.length))
    committed = jnp.pad(committed, ((0, 0), (0, gamma - g)))
    stale = jnp.stack([stale[1], survival]) if draft else stale
    if admission is not None:  # rows whose prompt is complete start decoding, as `admit` starts them
        first = jnp.where(started, first, 0)
        state, stale = _start_rows(state, stale, started, first, k_next)
    info = EngineRoundInfo(draft=draft_tokens, confidence=conf, survival=survival, depth=depth, accepted=n,
                           tokens=committed, appended=appended, active=active, done=state.done,
                           capacity=capacity, verified=jnp.sum(jnp.where(active, 1 + depth, 0)).astype(jnp.int32),
                           first=first, lag=lag_of(state))
    return state, stale, info


def lag_of(state: DecodeState) -> jax.Array:
    """[S] positions in each row's cache that the drafter has not ingested (0 without a log)."""
    if state.log is None:
        return jnp.zeros_like(state.cache.lengths)
    return jnp.maximum(state.cache.lengths - state.log.synced, 0)


@functools.partial(jax.jit, static_argnames=("drafter", "width"), donate_argnames=("state",))
def flush_log(drafter, tparams, dparams, state: DecodeState, rows: jax.Array, width: int) -> DecodeState:
    """The drafter ingests the backlog in `state.log` of the slots rows [R] (a slot id;
    S: no line), up to `width` (static) positions each, in one call. Drafters with
    `ingest_lines` take the R lines; the others ingest over every slot (R must be S, line
    r for slot r), the unlisted with nothing to ingest."""
    log = state.log
    s = state.anchor.shape[0]
    listed = rows < s
    slot = jnp.where(listed, rows, jnp.arange(rows.shape[0]) % s)
    start = log.synced[slot]
    count = jnp.where(listed, jnp.clip(state.cache.lengths[slot] - start, 0, width), 0)
    pos = jnp.minimum(start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], log.next.shape[1] - 1)
    feats, nxt = log.read(slot, pos)
    if hasattr(drafter, "ingest_lines"):
        draft_cache = drafter.ingest_lines(dparams, tparams, state.draft_cache, feats, nxt, slot, start, count)
    else:
        draft_cache = drafter.ingest(dparams, tparams, state.draft_cache, feats, nxt, start, count)
    synced = log.synced.at[jnp.where(listed, slot, s)].add(count, mode="drop")
    return state.replace(draft_cache=draft_cache, log=log.replace(synced=synced))
