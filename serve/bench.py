"""Benchmark plain vs speculative decoding (tokens/s, tau) for one target + drafter pair.

    python -m serve.bench --target T --draft D --batch 1 --batch 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", help="target folder (default: the bundled demo target)")
    p.add_argument("--draft", help="drafter folder (default: the bundled drafter for --drafter)")
    p.add_argument("--drafter", default=None, choices=("dspark", "dflash", "eagle3", "mtp1"),
                   help="drafter kind (default: what --draft holds; dspark for the bundled pair)")
    p.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default: 1 and 8)")
    p.add_argument("--prompt-file", help="prompts, one per line (default: random token prompts)")
    p.add_argument("--prompt-len", type=int, default=32, help="length of random prompts")
    p.add_argument("--chat", action="store_true", help="apply the chat template to text prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the drafter's)")
    p.add_argument("--verify-depth", type=int, default=None,
                   help="the fixed policy's verification depth (default: gamma)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of Markdown")
    args = p.parse_args(argv)
    with cli_errors("serve.bench"):
        from tqdm import tqdm

        from dspark_jax import drafters, prompts as prompts_lib, target
        from dspark_jax.serving import GenerateRequest, resolve_folders
        from dspark_jax.tokenizer import Tokenizer
        from serve import speedup

        batches = args.batch or [1, 8]
        if any(b < 1 for b in batches) or args.repeats < 1 or args.max_new_tokens < 1:
            raise DSparkError("--batch, --repeats and --max-new-tokens must be >= 1")
        req = GenerateRequest(target=args.target, draft=args.draft, drafter=args.drafter)
        tfolder, dfolder, kind = resolve_folders(req)
        if dfolder is None:
            raise DSparkError("serve.bench needs a drafter: pass --draft DIR")
        tcfg, tparams = target.load(tfolder, args.dtype)
        drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, gamma=args.gamma, dtype=args.dtype)
        if args.prompt_file:
            items = prompts_lib.read_prompt_file(args.prompt_file)
            prompts = prompts_lib.encode_prompts(items, Tokenizer(tfolder), args.chat)
        else:
            prompts = speedup.random_prompts(max(batches), args.prompt_len, tcfg.vocab_size)
        rows = []
        with tqdm(total=len(batches) * args.repeats, desc="bench", unit="run") as bar:
            for b in batches:
                rows.append(speedup.compare(tcfg, tparams, drafter, dparams, prompts, batch=b,
                                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                            repeats=args.repeats, verify_depth=args.verify_depth,
                                            progress=bar.update))
        if args.json:
            for r in rows:
                print(json.dumps({"batch": r.batch, "plain_tokens_per_second": r.plain_tps,
                                  "spec_tokens_per_second": r.spec_tps, "speedup": r.speedup,
                                  "tau": r.tau, "drafter": drafter.kind, "gamma": drafter.gamma}))
        else:
            print(speedup.markdown(rows, f"{drafter.kind} (gamma {drafter.gamma}) vs plain, "
                                         f"temperature {args.temperature}"))


if __name__ == "__main__":
    main()
