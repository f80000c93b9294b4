"""Generate text with DSpark speculative decoding (or a baseline) from the command line.

    python -m serve.generate --prompt "Write a haiku"                  # bundled pair
    python -m serve.generate --target T --draft D --prompt-ids 1,2,3 --temperature 0 --json
    python -m serve.generate --target T --drafter none --prompt-file prompts.txt --chat
"""

from __future__ import annotations

import argparse
import json
import sys

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors

DRAFTERS = ("dspark", "dflash", "eagle3", "mtp1", "none")
POLICIES = ("none", "fixed", "threshold", "algorithm1", "production")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.generate", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", help="Hugging Face target folder (default: the bundled demo target)")
    p.add_argument("--draft", help="DeepSpec drafter folder (default: the bundled drafter for --drafter)")
    p.add_argument("--drafter", default=None, choices=DRAFTERS,
                   help="drafter kind; mtp1 drafts one token, none decodes plainly (default: what --draft holds, "
                        "dspark for the bundled pair, none without a drafter)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line: plain text or a JSON chat")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the folder's chat template to text prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="independent completions per prompt, batched")
    p.add_argument("--gamma", type=int, default=None, help="draft block size (default: the drafter's)")
    p.add_argument("--verify-depth", type=int, default=None,
                   help="the fixed policy's verification depth (default: gamma)")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="verification policy (default: production when a profile of this backend, model pair "
                        "and batch exists (python -m serve.profile_sps makes one), else fixed)")
    p.add_argument("--sps-file", default=None, help="profile file (default: ~/.cache/dspark_jax/sps.json)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL device mesh, e.g. 8x1 or 4x2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's stop tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per completion per line")
    p.add_argument("--trace", action="store_true", help="with --json: per-round draft/verify trace")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with cli_errors("serve.generate"):
        # The device count must be fixed before jax starts (simulated devices on CPU).
        from dspark_jax import mesh as mesh_lib

        data, model = mesh_lib.parse_mesh(args.mesh)
        mesh_lib.simulate_cpu_devices(data * model)
        from dspark_jax.serving import GenerateRequest, run_generate

        if args.trace and not args.json:
            raise DSparkError("--trace needs --json")
        request = GenerateRequest(**{k: v for k, v in vars(args).items() if k not in ("json",)})
        emit = _json_printer if args.json else _text_printer()
        run_generate(request, emit, stream=not args.json)


def _json_printer(event: dict) -> None:
    if event["kind"] == "notice":
        print(event["line"], file=sys.stderr, flush=True)
    elif event["kind"] == "completion":
        print(json.dumps(event["record"]), flush=True)


def _text_printer():
    """Stream text to the terminal; end with one summary line."""
    def emit(event: dict) -> None:
        kind = event["kind"]
        if kind == "header":
            print(f"\n[prompt {event['prompt_index']} sample {event['sample_index']}]", flush=True)
        elif kind == "text":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif kind == "notice":
            print(event["line"], file=sys.stderr, flush=True)
        elif kind == "summary":
            print(f"\n-- {event['line']}", flush=True)
    return emit


if __name__ == "__main__":
    main()
