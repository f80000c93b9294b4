"""The engine's host loop at one concurrency, per policy: ms per round split into the time
blocked reading the round back (jax.device_get) and the rest (host work), and a cProfile of
the step loop (top functions by own time). PROF=0: three unprofiled runs instead.

    SPS=docs/load_bench_gpu/run_e24f41b/sps_profile.json python docs/load_bench_gpu/host_loop.py 8 fixed algorithm1

SPS: a profile file with the SPS and round profiles at that concurrency (a missing SPS
profile is measured and stored there; missing round profiles are measured, not stored)."""
import cProfile, io, os, pstats, sys, time
import jax
import dspark_jax.engine as E
from dspark_jax import load_bench, target, drafters, profile_sps, prompts as P
from dspark_jax.serving import GenerateRequest, resolve_folders
from dspark_jax.tokenizer import Tokenizer
c = int(sys.argv[1]); pols = sys.argv[2:]
SP = os.environ.get("SPS", "work/host_loop_sps.json")
blocked = [0.0]
_get = jax.device_get
def timed_get(x):
    t = time.perf_counter(); out = _get(x); blocked[0] += time.perf_counter() - t; return out
E.jax.device_get = timed_get
tf, df, kind = resolve_folders(GenerateRequest())
tcfg, tp = target.load(tf); dr, dp = drafters.load(df, tcfg, kind=kind)
pr = P.encode_prompts(P.read_prompt_file("docs/load_bench_cpu/prompts.jsonl"), Tokenizer(tf), False)
s = load_bench.LoadSettings(concurrency=(c,), requests_per_client=12, prompt_len=max(map(len, pr)), max_new_tokens=32,
                            length_spread=0.5, buckets="pow2", sps_file=SP)
sps, rec = profile_sps.load_or_profile(tcfg, tp, slots=c, gamma=dr.gamma, max_len=s.cache_len, buckets=s.bucket_set(c, dr.gamma),
                                       tap_layers=dr.tap_layers, path=SP, drafter=dr, dparams=dp)
dt = float(rec.get("draft_seconds", 0))
for policy in pols:
    t0 = time.perf_counter()
    rounds = None
    if policy in ("algorithm1", "production"):
        engine = load_bench.make_engine(tcfg, tp, dr, dp, policy, c, s, sps, dt)
        rounds = profile_sps.stored_rounds(rec, policy, engine.buckets, engine.plain_buckets)
        rounds = rounds or engine.profile_rounds()
    gate = {}
    d = dr if policy != "none" else None
    load_bench.run_point(tcfg, tp, d, dp, policy, "closed", c, s, pr, sps=sps, draft_time=dt, rounds=rounds, gate=gate)
    res = []
    for mode in (("plain", "prof") if os.environ.get("PROF", "1") == "1" else ("run1", "run2", "run3")):
        e = load_bench.make_engine(tcfg, tp, d, dp, policy, c, s, sps, dt, rounds)
        if "memory" in gate: e.recall_gate(gate["memory"])
        prof = cProfile.Profile() if mode == "prof" else None
        blocked[0] = 0.0
        t = time.perf_counter()
        if prof: prof.enable()
        load_bench._drive(e, pr, s, "closed", c, time.perf_counter, time.sleep)
        if prof: prof.disable()
        wall = time.perf_counter() - t
        m = e.metrics
        toks = sum(len(r.token_ids) for r in e.results.values())
        print(f"## {policy} c={c} {mode}: {wall/m.rounds*1e3:.3f} ms/round, blocked {blocked[0]/m.rounds*1e3:.3f}, "
              f"rest {(wall-blocked[0])/m.rounds*1e3:.3f}; {toks/wall:.0f} tok/s, plain {m.plain_rounds}/{m.rounds} "
              f"(setup {time.perf_counter()-t0:.0f}s)", flush=True)
    if prof is None:
        continue
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out); st.sort_stats("tottime").print_stats(int(os.environ.get("TOP", "22")))
    print("\n".join(l[:170] for l in out.getvalue().splitlines()[6:]), flush=True)
