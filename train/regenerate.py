"""Regenerate answers with the target itself (its own distribution), as a new dataset.

    python -m train.regenerate --target T --prompts prompts.jsonl --out answers.jsonl \
        --temperature 1 --max-new-tokens 512 [--name regen --data-dir data/]

Prompts: JSONL chats ({"messages": [...]} or {"turns": [...]}) or plain text lines. Every
user turn is answered in order (later turns see the regenerated earlier answers).
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.regenerate", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", required=True, help="target model folder (also the tokenizer)")
    p.add_argument("--draft", help="drafter folder to speed regeneration up; the output is unchanged in "
                                   "distribution (default: plain decoding)")
    p.add_argument("--prompts", required=True, help="prompt file: one text or JSON chat per line")
    p.add_argument("--out", required=True, help="output JSONL of regenerated conversations")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16,
                   help="requests decoded together (engine slots; a slot takes the next prompt when its answer ends)")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    p.add_argument("--name", help="also build a TFDS dataset with this name (default: JSONL only)")
    p.add_argument("--data-dir", help="where to build the dataset (with --name)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the conversations in the validation split")
    args = p.parse_args(argv)
    with cli_errors("train.regenerate"):
        from train import regen

        n = regen.regenerate(args)
        print(f"wrote {n} conversations to {args.out}")


if __name__ == "__main__":
    main()
