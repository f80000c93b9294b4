"""What the scheduled engine's plain round costs over plain decoding's, part by part.

    python docs/load_bench_cpu/plain_round_cost.py --slots 1 --rounds 1000

Times plain rounds over full slots (every request long enough not to finish within a
block of 50 rounds), interleaved round by round, on the demo pair. Each variant is one
compiled `slot_round.engine_round` program over the same state, with one part of the
scheduled engine's plain round added at a time:
  none            the plain-decoding engine's round (policy none);
  bare            the scheduled engine's state, its drafter's cache and feature log left
                  out, nothing drafted (gamma 0): the plain-decoding program again;
  bare+stale      the same with the schedule's stale survival [2, S, gamma] passed through;
  bare+gamma      the same at the drafter's gamma (its round info is gamma wide);
  log, no drafter the feature log passed through, no drafter (nothing tapped);
  log, no write   the same with the drafter (its taps are not written);
  log             the scheduled engine's plain round as it runs (`Engine._round`: the
                  drafter's cache left out, the taps written to the log).
Printed: each variant's median round time and its ratio to `none`'s."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time

import jax
import jax.numpy as jnp

from dspark_jax import drafters, load_bench, slot_round, speculate, target
from dspark_jax.serving import GenerateRequest, resolve_folders

BLOCK = 50  # rounds between refills (the requests ask for 70 tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1000, help="timed rounds per variant")
    a = p.parse_args()
    if a.slots < 1 or a.rounds < BLOCK:
        p.error(f"need --slots >= 1 and --rounds >= {BLOCK}")
    tf, df, kind = resolve_folders(GenerateRequest())
    tcfg, tparams = target.load(tf)
    drafter, dparams = drafters.load(df, tcfg, kind=kind)
    # a drafter equal to no other object: its rounds compile apart, with the log write cut out
    unwritten = type("Unwritten", (type(drafter),), {"__hash__": type(drafter).__hash__, "__eq__": lambda x, y: x is y})
    unwritten = unwritten(**{f.name: getattr(drafter, f.name) for f in dataclasses.fields(drafter) if f.init})
    settings = load_bench.LoadSettings(concurrency=(a.slots,), prompt_len=64, max_new_tokens=32, buckets="pow2")
    flat = {b: 1000.0 for b in range(1, 8 * a.slots + 9)}  # any rate: the gate is not asked here
    variants = {"none": None, "bare": (None, 0, False, False), "bare+stale": (None, 0, False, True),
                "bare+gamma": (None, drafter.gamma, False, True), "log, no drafter": (None, drafter.gamma, True, True),
                "log, no write": (unwritten, drafter.gamma, True, True), "log": ()}
    engines = {}
    for name in variants:
        policy = "none" if name == "none" else "production"
        e = load_bench.make_engine(tcfg, tparams, drafter if policy != "none" else None, dparams, policy, a.slots,
                                   settings, sps=flat)
        e.warmup((16,))
        e.spare_stale = jnp.zeros((2, a.slots, 0))
        engines[name] = e
    budget = engines["none"]._bucket(a.slots)

    def run(name: str, e):
        v = variants[name]
        if not v:
            return e._round(budget, False)
        d, gamma, keep_log, stale = v
        st = e._state
        write = speculate.FeatureLog.write
        if d is unwritten:
            speculate.FeatureLog.write = lambda log, *args, **kw: log
        try:
            out, new_stale, info = slot_round.engine_round(
                e.tcfg, d, gamma, budget, "production" if d is not None else "none", e.tparams, None,
                st.replace(draft_cache=None, log=st.log if keep_log else None), e._stale if stale else e.spare_stale,
                e._schedule(), draft=False)
        finally:
            speculate.FeatureLog.write = write
        if stale:
            e._stale = new_stale
        else:
            e.spare_stale = new_stale
        e._state = out.replace(draft_cache=st.draft_cache, log=out.log if keep_log else st.log)
        return info

    def refill(e) -> None:
        e.run_until_done()
        for _ in range(a.slots):
            e.submit(list(range(5, 21)), max_new_tokens=70)
        e.step()

    for name, e in engines.items():
        refill(e)
        jax.device_get(run(name, e))  # compiles the variants run outside `Engine._round`
    times = {name: [] for name in engines}
    names = list(engines)
    gc.disable()
    for _ in range(a.rounds // BLOCK):
        for e in engines.values():
            refill(e)
        for k in range(BLOCK):
            for name in names if k % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                jax.device_get(run(name, engines[name]))
                times[name].append(time.perf_counter() - t0)
    gc.enable()
    base = statistics.median(times["none"])
    print(f"{a.slots} slot(s), {len(times['none'])} rounds each")
    for name, t in times.items():
        print(f"{name:16s} {1e3 * statistics.median(t):.3f} ms   / none: {statistics.median(t) / base:.3f}")


if __name__ == "__main__":
    main()
