"""Measuring an engine configuration's profile (the library's `engine.profiles` stores it).

- SPS(B): the packed verification pass timed at every budget bucket (warm-up first, then
  timed repeats with block_until_ready; the low quartile), interpolated to every B;
- one drafting pass over every slot (`draft_seconds`, greedy rows);
- the drafter's mean prefix survival per position (`acceptance`): the share of drafted
  rounds that accepted at least j drafts, from a fixed-depth engine run over prompts;
- the engine's own compiled rounds, speculative at every bucket and plain at every
  row-count bucket, timed back to back, interleaved, the fastest of several trials
  (`rounds`).
`profile` measures what the stored record lacks and stores it; `python -m
serve.profile_sps` is its command line.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.engine import profiles
from dspark_jax.errors import DSparkError


def _packed_inputs(slots: int, width: int, budget: int, lengths: np.ndarray):
    """`budget` valid tokens spread over the rows like a round verifying them would."""
    i = np.arange(budget)
    rows, cols = i % slots, i // slots
    return (jnp.full((budget,), 5, jnp.int32), jnp.asarray(rows, jnp.int32),
            jnp.asarray(lengths[rows] + cols, jnp.int32), jnp.ones((budget,), bool),
            width if budget > slots else None)


def measure(tcfg, tparams, *, slots: int, gamma: int, max_len: int, buckets: Sequence[int],
            tap_layers: Sequence[int] = (), warmup: int = 2, repeats: int = 10, mesh=None,
            progress: Callable[[], None] | None = None) -> dict[int, float]:
    """{B: steps/s} of `target.step_packed` at every bucket, on a half-full cache."""
    width = 1 + gamma
    if max(buckets) > slots * width:
        raise DSparkError(f"bucket {max(buckets)} exceeds slots x (1 + gamma) = {slots * width}")
    cache = target.init_cache(tcfg, slots, max_len)
    if mesh is not None:
        cache = target.shard_cache(cache, mesh)
    lengths = np.full((slots,), max(0, max_len // 2 - width), np.int32)
    cache = cache.replace(lengths=jnp.asarray(lengths))
    taps = tuple(tap_layers)
    table = {}
    for b in buckets:
        tokens, rows, positions, valid, qb = _packed_inputs(slots, width, int(b), lengths)
        for _ in range(max(1, warmup)):
            out, cache, _ = target.step_packed(tcfg, tparams, tokens, rows, positions, valid, cache, taps,
                                               query_block=qb)
            out.block_until_ready()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            out, cache, _ = target.step_packed(tcfg, tparams, tokens, rows, positions, valid, cache, taps,
                                               query_block=qb)
            out.block_until_ready()
            times.append(time.perf_counter() - t0)
        table[int(b)] = 1.0 / max(low_quartile(times), 1e-9)
        if progress is not None:
            progress()
    return table


def measure_draft(drafter, dparams, tparams, *, slots: int, max_len: int, warmup: int = 2,
                  repeats: int = 10) -> float:
    """Seconds (low quartile) of one `drafter.propose` over `slots` greedy rows on a half-full cache."""
    from dspark_jax.sampling import SamplingParams

    dcache = drafter.init_cache(slots, max_len)
    start = jnp.full((slots,), max(1, max_len // 2 - 1 - drafter.gamma), jnp.int32)
    anchor = jnp.full((slots,), 5, jnp.int32)
    sampling = SamplingParams.make(slots)
    keys = jax.vmap(jax.random.key)(jnp.arange(slots, dtype=jnp.uint32))
    propose = jax.jit(drafter.propose)
    for _ in range(max(1, warmup)):
        jax.block_until_ready(propose(dparams, tparams, dcache, anchor, start, sampling, keys))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(propose(dparams, tparams, dcache, anchor, start, sampling, keys))
        times.append(time.perf_counter() - t0)
    return low_quartile(times)


def low_quartile(times: Sequence[float]) -> float:
    """The 25th percentile of repeated timings: noise on a shared machine only ever adds
    time, so a low quantile tracks the pass's own cost better than the median."""
    return float(np.percentile(np.asarray(times, np.float64), 25))


def plot(rec: dict, png: str) -> str:
    """Measured points and the interpolated curve (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {int(b): float(v) for b, v in rec["table"].items()}
    sps = np.asarray(rec["sps"], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    bs = np.arange(1, len(sps))
    ax.plot(bs, sps[1:], "-", label="interpolated")
    ax.plot(sorted(table), [table[b] for b in sorted(table)], "o", label="measured bucket")
    ax.plot(bs, sps[1:] * bs, ":", label="tokens/s if all accepted (B x SPS)")
    k = rec["key"]
    title = f"SPS(B): {k['device_kind']}, slots {k['slots']}, gamma {k['gamma']}"
    if rec.get("draft_seconds") is not None:
        d = float(rec["draft_seconds"])
        ax.plot(bs, sps[1:] * bs / (1.0 + d * sps[1:]), "--", label="B tokens/s with drafting")
        title += f", drafting {d * 1e3:.2f} ms"
    rounds = rec.get("rounds") or {}
    for kind, marker in (("spec", "s"), ("plain", "^")):
        pts = sorted((int(b), 1.0 / float(t)) for b, t in rounds.get(kind, {}).items())
        ax.plot([b for b, _ in pts], [r for _, r in pts], marker, mfc="none",
                label=f"engine round ({'speculative' if kind == 'spec' else 'plain'}), rounds/s")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("verification budget B (tokens)")
    ax.set_ylabel("steps / s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def markdown(rec: dict) -> str:
    lines = ["| B | steps/s | ms/step | B x steps/s |", "| ---: | ---: | ---: | ---: |"]
    for b, v in sorted((int(b), float(v)) for b, v in rec["table"].items()):
        lines.append(f"| {b} | {v:.1f} | {1000.0 / v:.3f} | {b * v:.0f} |")
    if rec.get("draft_seconds") is not None:
        lines.append(f"\ndrafting pass (all slots): {float(rec['draft_seconds']) * 1e3:.3f} ms")
    rounds = rec.get("rounds") or {}
    if rounds:
        lines += ["\nengine rounds: ms per round", "| B | speculative | plain |", "| ---: | ---: | ---: |"]
        for b in sorted({int(b) for kind in ("spec", "plain") for b in rounds.get(kind, {})}):
            cells = [f"{float(rounds[kind][str(b)]) * 1e3:.3f}" if str(b) in rounds.get(kind, {}) else ""
                     for kind in ("spec", "plain")]
            lines.append(f"| {b} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def measure_acceptance(tcfg, tparams, drafter, dparams, prompts: Sequence[Sequence[int]], *, slots: int,
                       max_len: int, max_new_tokens: int = 48, stop_ids: Sequence[int] = ()) -> list[float]:
    """[G] the share of drafted rounds that accepted at least j drafts (j = 1..G), over
    the prompts decoded greedily by a fixed-depth engine (a full-depth round each time).
    Each completion ends at one of `stop_ids`, as served text does: the rounds a request
    would spend past its end are not counted."""
    from dspark_jax.engine import Engine

    engine = Engine(tcfg, tparams, drafter, dparams, slots=slots, max_len=max_len, policy="fixed",
                    max_stop_ids=max(4, len(stop_ids)))
    ids = [engine.submit(p[-(max_len - max_new_tokens):], max_new_tokens=max_new_tokens, stop_ids=stop_ids)
           for p in prompts]
    engine.run_until_done()
    g = drafter.gamma
    counts, rounds = np.zeros(g), 0
    for rid in ids:
        r = engine.result(rid)
        if r.error is None:
            counts += np.asarray(r.accepted_per_position[:g], np.float64)
            rounds += r.rounds
    return (counts / max(rounds, 1)).round(6).tolist()


def measure_rounds(tcfg, tparams, drafter, dparams, *, slots: int, max_len: int, policy: str,
                   buckets: Sequence[int], repeats: int = 8, trials: int = 5) -> dict:
    """{"spec": {B: s}, "plain": {B: s}}: the engine's compiled rounds (greedy rows, one
    round a call), speculative at every bucket and plain at every row-count bucket.

    Each program is timed `trials` times, the programs interleaved within each trial so a
    slow spell of the machine hits them all, and keeps its fastest trial (noise only ever
    slows a program down). A round over a larger bucket never costs less than one over a
    smaller: a smaller bucket timed slower than a larger one takes the larger's time."""
    from dspark_jax.engine import Engine

    engine = Engine(tcfg, tparams, drafter, dparams, slots=slots, max_len=max_len, policy=policy,
                    sps=np.ones(slots * (1 + drafter.gamma) + 1), buckets=buckets, prefill_chunk=0)
    plain = sorted({engine.costs.bucket(n) for n in range(1, slots + 1)})
    keys = [("spec", int(b), ("round", b, True, False, True, 1)) for b in buckets] + \
           [("plain", int(b), ("round", b, False, False, True, 1)) for b in plain]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(max(trials, 1)):
        for kind, b, key in keys:
            times.setdefault((kind, b), []).append(engine.program_seconds(key, repeats, trials=1))
    out: dict[str, dict[int, float]] = {"spec": {}, "plain": {}}
    for kind in out:
        later = float("inf")
        for b in sorted((b for k, b in times if k == kind), reverse=True):
            later = min(later, min(times[(kind, b)]))
            out[kind][b] = later
        out[kind] = dict(sorted(out[kind].items()))
    return out


def profile(tcfg, tparams, *, slots: int, gamma: int, max_len: int, buckets: Sequence[int] | None = None,
            drafter=None, dparams=None, prompts: Sequence[Sequence[int]] = (), mesh=None, path: str | None = None,
            force: bool = False, warmup: int = 2, repeats: int = 10, stop_ids: Sequence[int] = (),
            progress: Callable[[], None] | None = None) -> dict:
    """The stored record of this configuration, measured (and stored) where it is missing
    or `force`: SPS(B), and with a drafter its drafting time, round times and (with
    prompts, each completion ending at one of `stop_ids`) acceptance."""
    buckets = tuple(buckets or profiles.budget_buckets(slots, gamma))
    path = path or profiles.default_path()
    taps = drafter.tap_layers if drafter is not None else ()
    key = profiles.profile_key(tcfg, slots=slots, gamma=gamma, max_len=max_len, tap_layers=taps, mesh=mesh,
                               drafter=drafter)
    rec = None if force else profiles.lookup(path, key, buckets)
    if rec is not None and (drafter is None or ("rounds" in rec and ("acceptance" in rec or not prompts))):
        return rec
    record = {"table": measure(tcfg, tparams, slots=slots, gamma=gamma, max_len=max_len, buckets=buckets,
                               tap_layers=taps, warmup=warmup, repeats=repeats, mesh=mesh, progress=progress),
              "created": time.time()}
    if drafter is not None:
        record["draft_seconds"] = measure_draft(drafter, dparams, tparams, slots=slots, max_len=max_len,
                                                warmup=warmup, repeats=repeats)
        record["rounds"] = measure_rounds(tcfg, tparams, drafter, dparams, slots=slots, max_len=max_len,
                                          policy="production", buckets=buckets, repeats=repeats)
        if prompts:
            record["acceptance"] = measure_acceptance(tcfg, tparams, drafter, dparams, prompts, slots=slots,
                                                      max_len=max_len, stop_ids=stop_ids)
    return profiles.save(path, key, record)
