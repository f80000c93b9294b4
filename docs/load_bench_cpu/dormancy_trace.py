"""The dormancy verdicts of a scheduled engine over consecutive closed-loop runs.

    python docs/load_bench_cpu/dormancy_trace.py --concurrency 1 --runs 6 production

Each run is the load bench's closed loop on the demo pair (its settings: 12 requests per
client, 32 x U[0.5, 1.5] new tokens, power-of-two buckets), and each goes on from the gate
memory the run before left, as the load bench's timed runs do (the first starts cold).
Printed per run: tok/s, rounds, the share run dormant, and every verdict (engine_dormancy.py)
as (round, balance, drafter share): the balance is the window's worth in dormant plain
steps over its time (above 1: staying awake paid); the drafter share is 1 - the dormant
over the awake plain steps' median at the window's row count, what carrying the drafter
costs a plain step (blank until dormant steps are timed). The round profile is read from
`--sps-file` (measured and stored there when it holds none)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from demo_setup import demo_point, demo_rounds
from dspark_jax import load_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policy", choices=load_bench.SCHEDULED_POLICIES)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--prompt-file", default="docs/load_bench_cpu/prompts.jsonl")
    p.add_argument("--sps-file", default="work/dormancy/sps_profile.json")
    a = p.parse_args()
    if a.concurrency < 1 or a.runs < 1:
        p.error("--concurrency and --runs must be >= 1")
    c = a.concurrency
    tcfg, tparams, drafter, dparams, prompts, s, sps, draft_time, rec = demo_point(c, a.prompt_file, a.sps_file)
    rounds = demo_rounds(load_bench.make_engine(tcfg, tparams, drafter, dparams, a.policy, c, s, sps, draft_time),
                         rec, store=s.sps_file)
    memory = None
    for run in range(a.runs):
        engine = load_bench.make_engine(tcfg, tparams, drafter, dparams, a.policy, c, s, sps, draft_time, rounds)
        if memory is not None:
            engine.recall_gate(memory)
        verdicts = []
        decide = engine._dormancy_verdict

        def traced(engine=engine, decide=decide, verdicts=verdicts):
            window = engine._window
            balance = engine.dormancy_balance()
            rows = max({r for r, _, _ in window}, key=lambda r: sum(x == r for x, _, _ in window))
            share = (1 - np.median(engine._quiet[rows]) / np.median(engine._busy[rows])
                     if engine._quiet[rows] and engine._busy[rows] else None)
            decide()
            if not engine._window:  # reached (not waiting for a baseline)
                verdicts.append((engine.metrics.rounds, balance, share))

        engine._dormancy_verdict = traced
        t0 = time.perf_counter()
        results = load_bench._drive(engine, prompts, s, "closed", c, time.perf_counter, time.sleep)
        secs = time.perf_counter() - t0
        m = engine.metrics
        shown = ", ".join(f"({r}, {'-' if b is None else f'{b:.3f}'}, {'-' if sh is None else f'{sh:.3f}'})"
                          for r, b, sh in verdicts)
        print(f"run {run}: {sum(len(r.token_ids) for r in results) / secs:6.0f} tok/s, {m.rounds} rounds, "
              f"dormant {m.dormant_rounds / max(1, m.rounds):4.0%}; verdicts {shown or 'none'}", flush=True)
        memory = engine.gate_memory()


if __name__ == "__main__":
    main()
