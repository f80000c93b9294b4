"""Tokenise chat JSONL files into a TFDS (array_record) training dataset.

    python -m train.build_data --tokenizer TARGET_DIR --name mychat --data-dir data/ \
        --split train=train.jsonl --split validation=val.jsonl
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def parse_splits(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise DSparkError(f"--split takes NAME=FILE.jsonl; got '{item}'")
        name, path = item.split("=", 1)
        out.setdefault(name, []).append(path)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.build_data", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and the chat template")
    p.add_argument("--name", required=True, help="dataset name (the builder config)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", action="append", default=[], help="NAME=FILE.jsonl (repeatable)")
    p.add_argument("--max-len", type=int, default=4096)
    args = p.parse_args(argv)
    with cli_errors("train.build_data"):
        from train import data

        path = data.build(name=args.name, sources=parse_splits(args.split), tokenizer_dir=args.tokenizer,
                          data_dir=args.data_dir, max_len=args.max_len)
        print(f"dataset written to {path}")


if __name__ == "__main__":
    main()
