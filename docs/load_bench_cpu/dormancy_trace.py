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

from dspark_jax import drafters, load_bench, profile_sps, target
from dspark_jax import prompts as prompt_files
from dspark_jax.serving import GenerateRequest, resolve_folders
from dspark_jax.tokenizer import Tokenizer


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
    tf, df, kind = resolve_folders(GenerateRequest())
    tcfg, tparams = target.load(tf)
    drafter, dparams = drafters.load(df, tcfg, kind=kind)
    prompts = prompt_files.encode_prompts(prompt_files.read_prompt_file(a.prompt_file), Tokenizer(tf), False)
    s = load_bench.LoadSettings(concurrency=(c,), requests_per_client=12, prompt_len=max(map(len, prompts)),
                                max_new_tokens=32, length_spread=0.5, buckets="pow2", sps_file=a.sps_file)
    sps, rec = profile_sps.load_or_profile(tcfg, tparams, slots=c, gamma=drafter.gamma, max_len=s.cache_len,
                                           buckets=s.bucket_set(c, drafter.gamma), tap_layers=drafter.tap_layers,
                                           path=s.sps_file, drafter=drafter, dparams=dparams)
    draft_time = float(rec.get("draft_seconds", 0.0))
    engine = load_bench.make_engine(tcfg, tparams, drafter, dparams, a.policy, c, s, sps, draft_time)
    rounds = profile_sps.stored_rounds(rec, a.policy, engine.buckets, engine.plain_buckets)
    if rounds is None:
        rounds = engine.profile_rounds(save=False)
        profile_sps.save_rounds(s.sps_file, rec["key"], a.policy, rounds)
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
