"""Profile SPS(B), the packed verification pass's steps/s at every engine budget bucket.

    python -m serve.profile_sps --target T --draft D --slots 8 [--out FILE] [--plot sps.png]
                                [--rounds production algorithm1]

With a drafter, one drafting pass over all slots is timed too (the fixed cost the
scheduler charges a speculative round). --rounds also times the engine's own rounds
(speculative and plain, at every bucket) for those scheduled policies; an engine that
finds them schedules with them instead of the pass-plus-drafting model. The curve is stored in FILE (default
$DSPARK_SPS_FILE or ~/.cache/dspark_jax/sps.json) under a key of backend, device kind,
model shape, mesh, slots, gamma, cache length and drafter; the engine reuses a matching
entry at start-up. A matching entry is reused here too unless --force.
"""

from __future__ import annotations

import argparse
import json

from dspark_jax.errors import DSparkError, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.profile_sps", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="target folder (default: bundled demo target)")
    p.add_argument("--draft", help="drafter folder: gamma and tapped layers (default: bundled drafter)")
    p.add_argument("--drafter", default=None, choices=("dspark", "dflash", "eagle3", "mtp1"))
    p.add_argument("--slots", type=int, required=True, help="engine slots (concurrent requests)")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the drafter's)")
    p.add_argument("--max-len", type=int, default=1024, help="engine cache length per slot")
    p.add_argument("--out", default=None, help="profile file (JSON, several profiles by key)")
    p.add_argument("--plot", default=None, help="write a PNG of the curve here")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--force", action="store_true", help="measure even when a matching profile exists")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")
    p.add_argument("--rounds", nargs="+", default=(), choices=("algorithm1", "production"),
                   help="also time the engine's rounds for these scheduled policies (needs a drafter)")
    args = p.parse_args(argv)
    with cli_errors("serve.profile_sps"):
        from tqdm import tqdm

        from dspark_jax import drafters, profile_sps, target
        from dspark_jax.serving import GenerateRequest, resolve_folders

        if args.slots < 1 or args.max_len < 2 or args.repeats < 1:
            raise DSparkError("--slots and --repeats must be >= 1 and --max-len >= 2")
        tfolder, dfolder, kind = resolve_folders(GenerateRequest(target=args.target, draft=args.draft,
                                                                 drafter=args.drafter))
        tcfg, tparams = target.load(tfolder, args.dtype)
        gamma, taps, drafter, dparams = args.gamma or 0, (), None, None
        if dfolder is not None:
            drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, gamma=args.gamma, dtype=args.dtype)
            gamma, taps = drafter.gamma, drafter.tap_layers
        if args.max_len > tcfg.max_position_embeddings:
            raise DSparkError(f"--max-len {args.max_len} exceeds the model's {tcfg.max_position_embeddings}")
        buckets = profile_sps.budget_buckets(args.slots, gamma)
        with tqdm(total=len(buckets), desc="SPS(B)", unit="bucket") as bar:
            _, rec = profile_sps.load_or_profile(
                tcfg, tparams, slots=args.slots, gamma=gamma, max_len=args.max_len, buckets=buckets,
                tap_layers=taps, path=args.out, force=args.force, warmup=args.warmup, repeats=args.repeats,
                progress=bar.update, drafter=drafter, dparams=dparams)
        if args.rounds:
            from dspark_jax.engine import Engine

            if drafter is None:
                raise DSparkError("--rounds needs a drafter (--draft)")
            for policy in tqdm(args.rounds, desc="engine rounds", unit="policy"):
                Engine(tcfg, tparams, drafter, dparams, slots=args.slots, max_len=args.max_len, policy=policy,
                       sps_file=args.out, buckets=buckets).profile_rounds(repeats=args.repeats, warmup=args.warmup)
            rec = profile_sps.lookup(args.out or profile_sps.default_path(), rec["key"], buckets)
        if args.plot:
            profile_sps.plot(rec, args.plot)
        if args.json:
            print(json.dumps(rec))
        else:
            k = rec["key"]
            print(f"SPS(B) on {k['backend']} / {k['device_kind']}, slots {k['slots']}, gamma {k['gamma']}, "
                  f"max_len {k['max_len']}  (file: {args.out or profile_sps.default_path()})")
            print(profile_sps.markdown(rec))


if __name__ == "__main__":
    main()
