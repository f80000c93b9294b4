"""Interleaved A/B of the drafting gate's variants in the closed-loop load bench, one concurrency.

    python docs/load_bench_cpu/gate_ab.py --concurrency 2 --repeats 8 \
        none algorithm1 algorithm1+never algorithm1+nolook

A variant is a policy with optional changes to the gate, switched on for its runs only:
  +never      the gate never drafts once it knows the traffic (its warm-up memory), and
              reaches no verdicts ahead (`foresee`): the scheduled engine's plain path
              alone, lazy ingest and gate key included (it used to leave the foresight
              on, which then reached a verdict after every plain round, as a gate
              standing on a verdict not to draft does not: `+never` read low);
  +nolook     no looks at new requests;
  +fixedcap   the probe wait capped at 8 x probe_every (as before `Engine.probe_cap`);
  +noforesee  no verdict foreseen during plain rounds (only after paid rounds, as before
              engine_foresight.py took plain rounds);
  +learncost  the engine's opt-in `learn_step_costs` (the warm-up's step costs carry
              into the timed runs with its gate memory);
  +nocalib    the gate's step-cost factor left at 1 (no calibration on the warm-up's
              steps, engine_step_costs.py);
  +awake      never dormant (`Engine(dormancy=False)`, engine_dormancy.py);
  +asleep     dormant from the start to the end: the dormant path alone.
Every variant's runs go on from the gate memory of its own warm-up runs and then of its
run before, as the load bench's do, and run with garbage collection off; the runs
interleave (alternate repeats reversed).
Printed: each variant's median tok/s and its per-repeat ratio to the first variant
(median and range; repeat i of both ran back to back). The scheduled policies' round
profile is read from `--sps-file` when it holds one for these buckets, else measured
once and stored there: every process that reads the same file decides on the same
costs (measured afresh, the profile moves 10-20% between processes on the 2-core CPU,
and the gate's drafting moves with it). `--fresh-rounds` measures it anew."""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from dspark_jax import drafters, load_bench, profile_sps, target
from dspark_jax import prompts as prompt_files
from dspark_jax.engine import Engine
from dspark_jax.serving import GenerateRequest, resolve_folders
from dspark_jax.tokenizer import Tokenizer

ORIGINAL = {name: getattr(Engine, name) for name in ("__init__", "should_draft", "_look_pays", "probe_cap", "foresee",
                                                     "calibrate_step_costs", "recall_gate")}


def _never(self, occupied):
    self._chosen, self._paid_round = None, False
    return self._prior is None  # a first round drafts only when nothing is known


def _no_look(self, idx, est, fresh, live):
    return False, np.zeros(len(idx), bool)


def _paid_only_foresee(self, occupied, drafted, plan=()):
    if drafted:
        ORIGINAL["foresee"](self, occupied, drafted, plan)
    else:
        self._foreseen = None


def _uncalibrated(self, drafted_ratio=None):
    self._cost_factor = 1.0
    return 1.0


def _learning_init(self, *args, **kwargs):
    ORIGINAL["__init__"](self, *args, **{**kwargs, "learn_step_costs": True})


def _awake_init(self, *args, **kwargs):
    ORIGINAL["__init__"](self, *args, **{**kwargs, "dormancy": False})


def _asleep_recall(self, memory):
    ORIGINAL["recall_gate"](self, memory)
    self._set_dormant(True)
    self._dormant_left = 1 << 62


def _no_foresight(self, occupied, drafted, plan=()):
    self._foreseen = None


CHANGES = {"never": (("should_draft", _never), ("foresee", _no_foresight)), "nolook": (("_look_pays", _no_look),),
           "fixedcap": (("probe_cap", property(lambda self: 8 * self.probe_every)),),
           "noforesee": (("foresee", _paid_only_foresee),), "learncost": (("__init__", _learning_init),),
           "nocalib": (("calibrate_step_costs", _uncalibrated),), "awake": (("__init__", _awake_init),),
           "asleep": (("recall_gate", _asleep_recall),)}


def switch(variant: str) -> str:
    """Put the engine's methods as `variant` wants them; returns its policy."""
    policy, *changes = variant.split("+")
    for name, method in ORIGINAL.items():
        setattr(Engine, name, method)
    for change in changes:
        for name, method in CHANGES[change]:
            setattr(Engine, name, method)
    return policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=12)
    p.add_argument("--prompt-file", default="docs/load_bench_cpu/prompts.jsonl")
    p.add_argument("--sps-file", default="work/gate_ab/sps_profile.json")
    p.add_argument("--fresh-rounds", action="store_true", help="measure the round profile anew (and store it)")
    a = p.parse_args()
    if min(a.concurrency, a.repeats, a.requests_per_client) < 1:
        p.error("--concurrency, --repeats and --requests-per-client must be >= 1")
    for v in a.variants:
        policy, *changes = v.split("+")
        if policy not in load_bench.POLICIES:
            p.error(f"unknown policy '{policy}' in '{v}' (choose from {', '.join(load_bench.POLICIES)})")
        if any(change not in CHANGES for change in changes):
            p.error(f"unknown change in '{v}' (choose from +{', +'.join(CHANGES)})")
    c = a.concurrency
    tf, df, kind = resolve_folders(GenerateRequest())
    tcfg, tparams = target.load(tf)
    drafter, dparams = drafters.load(df, tcfg, kind=kind)
    prompts = prompt_files.encode_prompts(prompt_files.read_prompt_file(a.prompt_file), Tokenizer(tf), False)
    s = load_bench.LoadSettings(concurrency=(c,), requests_per_client=a.requests_per_client,
                                prompt_len=max(map(len, prompts)), max_new_tokens=32, length_spread=0.5,
                                buckets="pow2", sps_file=a.sps_file)
    sps, rec = profile_sps.load_or_profile(tcfg, tparams, slots=c, gamma=drafter.gamma, max_len=s.cache_len,
                                           buckets=s.bucket_set(c, drafter.gamma), tap_layers=drafter.tap_layers,
                                           path=s.sps_file, drafter=drafter, dparams=dparams)
    draft_time = float(rec.get("draft_seconds", 0.0))
    rounds, gates = {}, {}
    for v in a.variants:
        policy = switch(v)
        d = drafter if policy != "none" else None
        if policy in load_bench.SCHEDULED_POLICIES and policy not in rounds:
            engine = load_bench.make_engine(tcfg, tparams, d, dparams, policy, c, s, sps, draft_time)
            stored = None if a.fresh_rounds else profile_sps.stored_rounds(rec, policy, engine.buckets,
                                                                          engine.plain_buckets)
            if stored is None:
                stored = engine.profile_rounds(save=False)
                profile_sps.save_rounds(s.sps_file, rec["key"], policy, stored)
            rounds[policy] = stored
        gates[v] = {}
        load_bench.run_point(tcfg, tparams, d, dparams, policy, "closed", c, s, prompts, sps=sps,
                             draft_time=draft_time, rounds=rounds.get(policy), gate=gates[v])
    speeds: dict[str, list[float]] = {v: [] for v in a.variants}
    dormant: dict[str, list[float]] = {v: [] for v in a.variants}  # the share of rounds run dormant
    for rep in range(a.repeats):
        for v in a.variants if rep % 2 == 0 else a.variants[::-1]:
            policy = switch(v)
            d = drafter if policy != "none" else None
            engine = load_bench.make_engine(tcfg, tparams, d, dparams, policy, c, s, sps, draft_time, rounds.get(policy))
            if "memory" in gates[v]:
                engine.recall_gate(gates[v]["memory"])
            if engine.dormancy:  # it may wake or sleep at steps the warm-up runs did not
                load_bench.warm_closed_loop(engine, prompts, c, s)
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                results = load_bench._drive(engine, prompts, s, "closed", c, time.perf_counter, time.sleep)
                speeds[v].append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0))
                dormant[v].append(engine.metrics.dormant_rounds / max(1, engine.metrics.rounds))
                if "memory" in gates[v]:  # the next run goes on from this one (as the load bench's do)
                    gates[v]["memory"] = engine.gate_memory()
            finally:
                gc.enable()
    switch(a.variants[0])
    base = speeds[a.variants[0]]
    print(f"c={c}, {a.repeats} interleaved runs each")
    for v in a.variants:
        ratios = [x / b for x, b in zip(speeds[v], base)]
        print(f"{v:24s} {statistics.median(speeds[v]):7.1f} tok/s   / {a.variants[0]}: "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
              f"dormant {statistics.mean(dormant[v]):.0%} of rounds", flush=True)


if __name__ == "__main__":
    main()
