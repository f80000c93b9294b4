"""Load benchmark: throughput vs per-user tokens/s for each verification policy.

    python -m serve.load_bench --target T --draft D --concurrency 1 2 4 --mode closed poisson

Writes results.json, results.md, throughput_vs_per_user.png (Figure 7 shape) and
budget_vs_concurrency.png (Figure 8 shape) under --out-dir and prints the table.

    python -m serve.load_bench --merge run_c1 run_c2 run_c4 --out-dir all    # levels run apart, one table
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    from serve.load_points import MODES, POLICIES

    p = argparse.ArgumentParser(prog="python -m serve.load_bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", help="target folder (default: the bundled demo target)")
    p.add_argument("--draft", help="drafter folder (default: the bundled drafter for --drafter)")
    p.add_argument("--drafter", default=None, choices=("dspark", "dflash", "eagle3", "mtp1"),
                   help="drafter kind (default: what --draft holds; dspark for the bundled pair)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="concurrency levels (slots)")
    p.add_argument("--policy", nargs="+", default=list(POLICIES), choices=POLICIES, dest="policies",
                   help="verification policies")
    p.add_argument("--mode", nargs="+", default=["closed"], choices=MODES, dest="modes",
                   help="closed loop and/or Poisson arrivals")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt length (tokens)")
    p.add_argument("--prompt-file", help="real prompts, one per line: text or JSON chat (default: random tokens)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to text prompts")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true",
                   help="with --prompt-file, run every request to its length instead of ending it at the target's "
                        "stop tokens")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second per slot")
    p.add_argument("--threshold", type=float, default=0.5, help="confidence threshold of the threshold policy")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the drafter's)")
    p.add_argument("--max-len", type=int, default=None, help="cache length per slot (default: just enough)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buckets", default="auto", choices=("auto", "pow2", "full"),
                   help="budget buckets: powers of two, one full bucket, or auto (full on CPU)")
    p.add_argument("--sps-file", default=None, help="SPS profile file (default: ~/.cache/dspark_jax/sps.json)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per point, interleaved across policies; the median is reported")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="request lengths vary: max_new_tokens x U[1-s, 1+s] per request (same for every policy)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per round that ride along in the verification pass while other "
                        "slots decode (0: a separate prefill pass per admission)")
    p.add_argument("--rounds-per-call", type=int, default=4,
                   help="rounds per dispatch when nothing waits for admission")
    p.add_argument("--lag", type=int, default=1, help="rounds in flight before the host reads one back")
    p.add_argument("--no-device-time", action="store_true",
                   help="skip replaying the run's programs (no host_exposed_frac)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("--out-dir", default="load_bench_out")
    p.add_argument("--merge", nargs="+", metavar="RESULTS",
                   help="run nothing: merge earlier runs' results.json files (or their folders), one level "
                        "per run say, into one table and one pair of plots under --out-dir")
    args = p.parse_args(argv)
    with cli_errors("serve.load_bench"):
        if args.merge:
            from serve import load_report

            rows, settings, meta = load_report.read(args.merge)
            settings["concurrency"] = sorted({r.concurrency for r in rows})
            _report(load_report.write(rows, settings, args.out_dir, meta))
            return
        import jax
        from tqdm import tqdm

        from dspark_jax import drafters, target
        from serve import load_points as load_bench
        from dspark_jax.serving import GenerateRequest, resolve_folders

        tfolder, dfolder, kind = resolve_folders(GenerateRequest(target=args.target, draft=args.draft,
                                                                 drafter=args.drafter))
        prompts, stop_ids = None, ()
        if args.prompt_file:
            from dspark_jax import prompts as prompts_lib
            from dspark_jax.tokenizer import Tokenizer

            tok = Tokenizer(tfolder)
            prompts = prompts_lib.encode_prompts(prompts_lib.read_prompt_file(args.prompt_file), tok, args.chat)
            stop_ids = () if args.ignore_eos else tok.stop_ids
            args.prompt_len = max(len(x) for x in prompts)
        settings = load_bench.LoadSettings(
            concurrency=tuple(args.concurrency), policies=tuple(args.policies), modes=tuple(args.modes),
            requests_per_client=args.requests_per_client, prompt_len=args.prompt_len,
            max_new_tokens=args.max_new_tokens, rate=args.rate, threshold=args.threshold,
            temperature=args.temperature, seed=args.seed, max_len=args.max_len, sps_file=args.sps_file,
            buckets=args.buckets, repeats=args.repeats, length_spread=args.length_spread,
            prefill_chunk=args.prefill_chunk, rounds_per_call=args.rounds_per_call, lag=args.lag,
            stop_ids=tuple(stop_ids), device_time=not args.no_device_time)
        tcfg, tparams = target.load(tfolder, args.dtype)
        drafter = dparams = None
        if dfolder is not None:
            drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, gamma=args.gamma, dtype=args.dtype)
        points = len(settings.modes) * len(settings.policies) * len(settings.concurrency) * settings.repeats
        with tqdm(total=points, desc="load bench", unit="point") as bar:
            def progress(row):
                bar.set_postfix_str(f"{row.mode} {row.policy} c={row.concurrency} {row.throughput:.0f} tok/s")
                bar.update()

            rows = load_bench.run(tcfg, tparams, drafter, dparams, settings, progress=progress, prompts=prompts)
        meta = {"target": tfolder, "draft": dfolder, "drafter": getattr(drafter, "kind", "none"),
                "gamma": getattr(drafter, "gamma", 0), "backend": jax.default_backend(),
                "device_kind": jax.devices()[0].device_kind,
                "title": f"{getattr(drafter, 'kind', 'none')} gamma {getattr(drafter, 'gamma', 0)} on "
                         f"{jax.devices()[0].device_kind}"}
        from serve import load_report

        _report(load_report.write(rows, settings, args.out_dir, meta))


def _report(paths: dict) -> None:
    print(paths["table"])
    print(f"\nwrote {paths['json']}, {paths['markdown']}, {', '.join(paths['plots'])}")


if __name__ == "__main__":
    main()
