"""The passes the profiler times: each builds its inputs, compiles once and returns a record.

Every function takes a `Bench`: the pair, the settings, the mesh and the target's cost
model, plus two callables of the profiler: `check(mem)` refuses a compiled program whose
temporaries do not fit (raising `TooBig`) and returns its peak bytes, and
`roof(seconds, nbytes, flops)` places a time against the roofline. Nothing here writes
the profile; the profiler does.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from serve.profiling import roofline as rl
from serve.profiling.device import compile_fn, time_compiled
from serve.profiling.schema import DrafterRecord, PrefillRecord, SpsRecord, StepRecord


class TooBig(Exception):
    """A measurement that cannot run at this size (recorded as skipped, the sweep goes on)."""


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every pass needs from the profiler."""
    pair: object
    s: object          # serve.profiling.settings.Settings
    mesh: object
    cost: object       # roofline.target_cost of the pair's target
    check: Callable
    roof: Callable


def _timed(b: Bench, fn, args, donate, carry, *, warmup=None, repeats=None, min_total_s=None):
    """Compile `fn` once, refuse it when its temporaries do not fit, time it on `args`
    -> (times in s, compile s, peak bytes, XLA's cost analysis)."""
    s = b.s
    compiled, csecs, mem, xla = compile_fn(fn, args, donate=donate)
    peak = b.check(mem)
    times = time_compiled(compiled, args, warmup=s.warmup if warmup is None else warmup,
                          repeats=s.repeats if repeats is None else repeats, carry=carry,
                          min_total_s=s.min_timed_s if min_total_s is None else min_total_s)
    return times, csecs, peak, xla


def target_step(b: Bench, kind: str, batch: int, context: int, q_len: int) -> StepRecord:
    """One decode (q_len 1, no taps) or verification step of the target over a full cache."""
    pair = b.pair
    tcfg = pair.tcfg
    taps = pair.drafter.tap_layers if kind == "verify" else ()
    if context < q_len + 1:
        raise TooBig(f"context {context} is shorter than q_len {q_len} + 1")
    cache = target.shard_cache(target.init_cache(tcfg, batch, context), b.mesh)
    lengths = jnp.full((batch,), context - q_len, jnp.int32)
    tokens = jnp.full((batch, q_len), 5, jnp.int32)
    q_lens = jnp.full((batch,), q_len, jnp.int32)

    def fn(params, tokens, q_lens, cache, lengths):
        logits, cache, tapped = target.step(tcfg, params, tokens, q_lens, cache.replace(lengths=lengths), taps)
        return (logits, tapped), cache

    times, csecs, peak, xla = _timed(b, fn, [pair.tparams, tokens, q_lens, cache, lengths], (3,), 3)
    t = statistics.median(times)
    nbytes, flops = rl.step_cost(b.cost, batch, context, q_len)
    return StepRecord(kind=kind, batch=batch, context=context, q_len=q_len, time_ms=t * 1e3,
                      times_ms=[x * 1e3 for x in times], compile_s=csecs, roofline=b.roof(t, nbytes, flops),
                      xla_flops=xla["flops"] if xla else None, xla_bytes_accessed=xla["bytes"] if xla else None,
                      peak_bytes=peak)


def drafter_pass(b: Bench, batch: int, context: int) -> DrafterRecord:
    """The drafter's parallel pass, its whole proposal (with the sequential head) and its ingest."""
    from dspark_jax.sampling import SamplingParams

    pair = b.pair
    d, tcfg, gamma = pair.drafter, pair.tcfg, b.s.gamma
    g = d.cfg.block_size
    if context < g + gamma + 2:
        raise TooBig(f"context {context} is shorter than a drafter block")
    dcache = target.shard_cache(d.init_cache(batch, context), b.mesh)
    start = jnp.full((batch,), context - g - gamma - 1, jnp.int32)
    anchor = jnp.full((batch,), 5, jnp.int32)
    sampling = SamplingParams.make(batch, 0.0)
    keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
    width = len(d.tap_layers) * tcfg.hidden_size
    feats = jnp.zeros((batch, 1 + gamma, width), tcfg.jnp_dtype)
    nxt = jnp.full((batch, 1 + gamma), 5, jnp.int32)
    count = jnp.full((batch,), 1 + gamma, jnp.int32)

    def parallel(dparams, tparams, dcache, anchor, start):
        h = d.block_hidden(dparams, tparams, dcache, anchor, start)[:, :gamma]
        return target.logits(tcfg, tparams, h)

    def propose(dparams, tparams, dcache, anchor, start, sampling, keys):
        return d.propose(dparams, tparams, dcache, anchor, start, sampling, keys)

    def ingest(dparams, tparams, dcache, feats, nxt, start, count):
        lengths = dcache.lengths
        out = d.ingest(dparams, tparams, dcache, feats, nxt, start, count)
        return out.lengths, out.replace(lengths=lengths)

    runs, compile_s = {}, {}
    for name, fn, args, donate in (
            ("parallel", parallel, [pair.dparams, pair.tparams, dcache, anchor, start], ()),
            ("propose", propose, [pair.dparams, pair.tparams, dcache, anchor, start, sampling, keys], ()),
            ("ingest", ingest, [pair.dparams, pair.tparams, dcache, feats, nxt, start, count], (2,))):
        times, compile_s[name], _, _ = _timed(b, fn, args, donate, 2 if donate else None)
        runs[name] = statistics.median(times)
    nbytes, flops = rl.drafter_propose_cost(d, batch, context)
    return DrafterRecord(batch=batch, context=context, gamma=gamma, parallel_ms=runs["parallel"] * 1e3,
                         propose_ms=runs["propose"] * 1e3,
                         head_ms=max(runs["propose"] - runs["parallel"], 0.0) * 1e3,
                         ingest_ms=runs["ingest"] * 1e3, compile_s=compile_s,
                         roofline=b.roof(runs["propose"], nbytes, flops))


def packed_step(b: Bench, slots: int, budget: int, context: int) -> SpsRecord:
    """The packed verification pass over `budget` tokens spread over `slots` rows: SPS(B)."""
    pair = b.pair
    tcfg = pair.tcfg
    width = 1 + b.s.gamma
    cache = target.shard_cache(target.init_cache(tcfg, slots, context), b.mesh)
    lengths = np.full((slots,), max(0, context - width), np.int32)
    cache = cache.replace(lengths=jnp.asarray(lengths))
    i = np.arange(budget)
    rows, cols = i % slots, i // slots
    tokens = jnp.full((budget,), 5, jnp.int32)
    rows_a = jnp.asarray(rows, jnp.int32)
    positions = jnp.asarray(lengths[rows] + cols, jnp.int32)
    valid = jnp.ones((budget,), bool)
    qb = width if budget > slots else None
    taps = pair.drafter.tap_layers

    def fn(params, tokens, rows, positions, valid, cache):
        logits, cache, tapped = target.step_packed(tcfg, params, tokens, rows, positions, valid, cache, taps,
                                                   query_block=qb)
        return (logits, tapped), cache

    times, csecs, _, _ = _timed(b, fn, [pair.tparams, tokens, rows_a, positions, valid, cache], (5,), 5)
    t = statistics.median(times)
    nbytes, flops = rl.packed_cost(b.cost, slots, budget, context)
    return SpsRecord(slots=slots, context=context, budget=budget, time_ms=t * 1e3, sps=1.0 / t,
                     compile_s=csecs, roofline=b.roof(t, nbytes, flops))


def prefill(b: Bench, batch: int, length: int) -> PrefillRecord:
    """The target's prefill of `batch` prompts of `length` tokens into empty caches."""
    pair, s = b.pair, b.s
    tcfg = pair.tcfg
    cache = target.shard_cache(target.init_cache(tcfg, batch, length), b.mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, tcfg.vocab_size, (batch, length)), jnp.int32)
    lengths = jnp.full((batch,), length, jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    taps = pair.drafter.tap_layers

    def fn(params, tokens, lengths, cache, zeros):
        last, cache, tapped = target.prefill(tcfg, params, tokens, lengths, cache.replace(lengths=zeros), taps)
        return (last, tapped), cache

    times, csecs, peak, _ = _timed(b, fn, [pair.tparams, tokens, lengths, cache, zeros], (3,), 3,
                                   warmup=min(s.warmup, 1), repeats=max(1, s.repeats // 3), min_total_s=0.0)
    t = statistics.median(times)
    nbytes, flops = rl.prefill_cost(b.cost, batch, length)
    return PrefillRecord(batch=batch, length=length, time_ms=t * 1e3, times_ms=[x * 1e3 for x in times],
                         tokens_per_s=batch * length / t, compile_s=csecs, roofline=b.roof(t, nbytes, flops),
                         peak_bytes=peak)
