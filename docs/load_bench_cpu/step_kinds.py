"""Where a scheduled policy's time goes against plain decoding's, by kind of step.

    python docs/load_bench_cpu/step_kinds.py --concurrency 1 --repeats 4 production

The closed-loop workload of the load bench at one concurrency (the bundled pair, its
prompts, 12 requests per client). A warm-up run of the policy leaves its gate memory,
which every timed run takes up (as the load bench's do); timed runs of the policy and of
plain decoding interleave. Printed:
  - what the warm-up's gate expects drafting to save: over 256 batches drawn from the
    finished requests' gate estimates (a fixed seed), the share the gate would draft for
    (a speculative round predicted `gate_margin` faster than a plain one) and the
    predicted share of time saved (1 - plain round's seconds per token / the speculative
    round's, 0 where it would not draft; no flush counted);
  - the time ratio of plain decoding's runs to the policy's (above 1: the policy is faster);
  - per kind of step (plain; paid: drafted because it paid; probe; look at new requests):
    steps, seconds, tokens, and milliseconds a step, with plain decoding's steps first."""

from __future__ import annotations

import argparse
import collections
import gc
import time

import numpy as np

from demo_setup import demo_point, demo_rounds
from dspark_jax import load_bench, scheduler
from dspark_jax.engine import Engine


def predicted_saving(engine: Engine, batches: int = 256) -> tuple[float, float]:
    """(share of drawn batches the gate drafts for, predicted share of time saved)."""
    est = np.minimum(1.0, np.asarray(engine._past_estimates) * engine.gate_accuracy)
    pick = np.random.default_rng(0).integers(0, len(est), (batches, engine.slots))
    sps, extra = engine._spec_costs()
    theta, _ = scheduler.best_rounds(est[pick], sps, draft_time=extra)
    ratio = theta / (engine.slots * engine.plain_sps[engine.slots])
    drafts = ratio > 1.0 + engine.gate_margin
    return float(drafts.mean()), float(np.mean(np.where(drafts, 1.0 - 1.0 / ratio, 0.0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policy", choices=("algorithm1", "production"))
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--prompt-file", default="docs/load_bench_cpu/prompts.jsonl")
    p.add_argument("--sps-file", default="docs/load_bench_cpu/run_a286ce4/sps_profile.json",
                   help="the stored profile (round times) the gate decides on")
    a = p.parse_args()
    if min(a.concurrency, a.repeats) < 1:
        p.error("--concurrency and --repeats must be >= 1")
    c = a.concurrency
    tcfg, tparams, drafter, dparams, prompts, s, sps, draft_time, rec = demo_point(c, a.prompt_file, a.sps_file)
    rounds = demo_rounds(load_bench.make_engine(tcfg, tparams, drafter, dparams, a.policy, c, s, sps, draft_time),
                         rec)
    gate: dict = {}
    load_bench.run_point(tcfg, tparams, drafter, dparams, a.policy, "closed", c, s, prompts, sps=sps,
                         draft_time=draft_time, rounds=rounds, gate=gate)
    load_bench.run_point(tcfg, tparams, None, None, "none", "closed", c, s, prompts, sps=sps)  # compiles
    memory = load_bench.make_engine(tcfg, tparams, drafter, dparams, a.policy, c, s, sps, draft_time, rounds)
    memory.recall_gate(gate["memory"])
    share, saving = predicted_saving(memory)
    print(f"c={c} {a.policy}: step-cost factor {memory.spec_cost_factor:.2f}, gate accuracy "
          f"{memory.gate_accuracy:.2f}; over batches of past requests the gate drafts for {share:.2f} and "
          f"predicts {saving:.3f} of the time saved")

    stats = {p: collections.defaultdict(lambda: [0, 0.0, 0]) for p in ("none", a.policy)}
    seconds = dict.fromkeys(stats, 0.0)
    for rep in range(a.repeats):
        for policy in ("none", a.policy) if rep % 2 == 0 else (a.policy, "none"):
            scheduled = policy != "none"
            e = load_bench.make_engine(tcfg, tparams, drafter if scheduled else None, dparams, policy, c, s, sps,
                                       draft_time, rounds if scheduled else None)
            if scheduled:
                e.recall_gate(gate["memory"])
            kinds, step, should_draft = stats[policy], e.step, e.should_draft
            kind = ["plain"]

            def gate_verdict(occupied, e=e, should_draft=should_draft, kind=kind):
                probing = e.gated and e._prior is not None and e._plain_streak >= e._probe_gap
                draft = should_draft(occupied)
                kind[0] = ("plain" if not (draft and e.gated) else "probe" if probing
                           else "paid" if e._paid_round else "look")
                return draft

            def timed_step(e=e, step=step, kinds=kinds, kind=kind):
                t0, tokens = time.perf_counter(), e.metrics.tokens
                kind[0] = "plain"
                ran = step()
                k = kinds[kind[0]]
                k[0], k[1], k[2] = k[0] + 1, k[1] + time.perf_counter() - t0, k[2] + e.metrics.tokens - tokens
                return ran

            e.should_draft, e.step = gate_verdict, timed_step
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                load_bench._drive(e, prompts, s, "closed", c, time.perf_counter, time.sleep)
                seconds[policy] += time.perf_counter() - t0
            finally:
                gc.enable()
    print(f"plain decoding's time / {a.policy}'s: {seconds['none'] / seconds[a.policy]:.3f} ({a.repeats} runs each)")
    for policy, kinds in stats.items():
        for k, (n, t, tokens) in kinds.items():
            print(f"  {policy:10s} {k:6s} steps {n:5d}  seconds {t:7.3f}  tokens {tokens:5d}  "
                  f"ms/step {1e3 * t / n:.3f}")


if __name__ == "__main__":
    main()
