"""Profile an engine configuration: SPS(B), the drafting pass, the drafter's acceptance
and the engine's round times, for the scheduled policies (algorithm1, production).

    python -m serve.profile_sps --slots 8                       # the bundled pair
    python -m serve.profile_sps --target T --draft D --slots 1 --prompt-file prompts.jsonl

The record is stored in FILE (default $DSPARK_SPS_FILE or ~/.cache/dspark_jax/sps.json)
under a key of backend, device kind, model shape, mesh, slots, gamma, cache length and
drafter; engines with that configuration read it at start-up (`serve.generate` picks the
production policy when it finds one). A matching record is reused unless --force.
"""

from __future__ import annotations

import argparse
import json
import os

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors

DEMO_PROMPTS = os.path.join("artifacts", "demo", "prompts")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.profile_sps", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", help="target folder (default: the bundled demo target)")
    p.add_argument("--draft", help="drafter folder (default: the bundled drafter for --drafter)")
    p.add_argument("--drafter", default=None, choices=("dspark", "dflash", "eagle3", "mtp1"),
                   help="drafter kind (default: what --draft holds; dspark for the bundled pair)")
    p.add_argument("--slots", type=int, required=True, help="engine slots (concurrent requests)")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the drafter's)")
    p.add_argument("--max-len", type=int, default=256, help="engine cache length per slot")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL device mesh")
    p.add_argument("--prompt-file", default=None,
                   help="prompts for the acceptance measurement (default: the bundled pair's test prompts)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to text prompts")
    p.add_argument("--out", default=None,
                   help="profile file, JSON, several records by key (default: ~/.cache/dspark_jax/sps.json)")
    p.add_argument("--plot", default=None, help="write a PNG of the SPS curve here (default: no plot)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--force", action="store_true", help="measure even when a matching record exists")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")
    args = p.parse_args(argv)
    with cli_errors("serve.profile_sps"):
        from dspark_jax import mesh as mesh_lib

        data, model = mesh_lib.parse_mesh(args.mesh)
        mesh_lib.simulate_cpu_devices(data * model)
        from tqdm import tqdm

        from dspark_jax import drafters, prompts as prompts_lib, target
        from dspark_jax.engine import profiles
        from dspark_jax.serving import GenerateRequest, resolve_folders
        from dspark_jax.tokenizer import Tokenizer
        from serve import sps_profile

        if args.slots < 1 or args.max_len < 2 or args.repeats < 1:
            raise DSparkError("--slots and --repeats must be >= 1 and --max-len >= 2")
        tfolder, dfolder, kind = resolve_folders(GenerateRequest(target=args.target, draft=args.draft,
                                                                 drafter=args.drafter))
        tcfg, tparams = target.load(tfolder, args.dtype)
        if args.max_len > tcfg.max_position_embeddings:
            raise DSparkError(f"--max-len {args.max_len} exceeds the model's {tcfg.max_position_embeddings}")
        mesh = mesh_lib.make_mesh(args.mesh) if data * model > 1 else None
        drafter = dparams = None
        gamma = args.gamma or 0
        if dfolder is not None:
            drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, gamma=args.gamma, dtype=args.dtype)
            gamma = drafter.gamma
        ids, stop_ids = [], ()
        if drafter is not None and os.path.exists(os.path.join(tfolder, "tokenizer.json")):
            files = [args.prompt_file] if args.prompt_file else (
                [os.path.join(DEMO_PROMPTS, f) for f in sorted(os.listdir(DEMO_PROMPTS))]
                if args.target is None and os.path.isdir(DEMO_PROMPTS) else [])
            texts = [t for f in files for t in prompts_lib.read_prompt_file(f)[:8]]
            tok = Tokenizer(tfolder)
            ids, stop_ids = prompts_lib.encode_prompts(texts, tok, args.chat or not args.prompt_file), tok.stop_ids
        buckets = profiles.budget_buckets(args.slots, gamma)
        with tqdm(total=len(buckets), desc="SPS(B)", unit="bucket") as bar:
            rec = sps_profile.profile(tcfg, tparams, slots=args.slots, gamma=gamma, max_len=args.max_len,
                                      buckets=buckets, drafter=drafter, dparams=dparams, prompts=ids, mesh=mesh,
                                      path=args.out, force=args.force, warmup=args.warmup, repeats=args.repeats,
                                      stop_ids=stop_ids, progress=bar.update)
        if args.plot:
            sps_profile.plot(rec, args.plot)
        if args.json:
            print(json.dumps(rec))
            return
        k = rec["key"]
        print(f"SPS(B) on {k['backend']} / {k['device_kind']}, slots {k['slots']}, gamma {k['gamma']}, "
              f"max_len {k['max_len']}  (file: {args.out or profiles.default_path()})")
        print(sps_profile.markdown(rec))
        if rec.get("acceptance"):
            print("acceptance per position: " + " ".join(f"{a:.3f}" for a in rec["acceptance"]))


if __name__ == "__main__":
    main()
