"""Build the demo chat corpus (TFDS), export chat JSONL and prompt files, train the tokenizer.

    python -m train.demo.build_corpus --data-dir data/ --out demo_data/ [--caps 6000,300,300]
        [--caps code=4000,300,300] [--seed 0] [--vocab-size 4096]

Writes under --out:
    {train,validation,test}.jsonl            chat JSONL (user prompt + assistant answer)
    {split}.{code,prose,math}.jsonl          the same, one domain per file
    prompts/{split}[.{domain}].jsonl         user turns only (for train.regenerate)
    tokenizer/                               tokenizer.json, tokenizer_config.json, ...
    manifest.json                            sources, seeds, caps, sizes, token statistics
"""

from __future__ import annotations

import argparse
import json
import os
import time

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def parse_caps(items: list[str] | None):
    """["6000,300,300", "code=100,10,10"] -> {domain: (train, validation, test)} (None: defaults)."""
    from train.demo.corpus import DEFAULT_CAPS, DOMAINS

    if not items:
        return None
    caps = dict(DEFAULT_CAPS)
    for item in items:
        domain, _, counts = item.rpartition("=")
        try:
            c = tuple(int(x) for x in counts.split(","))
        except ValueError:
            c = ()
        if len(c) != 3:
            raise DSparkError(f"--caps takes TRAIN,VALIDATION,TEST or DOMAIN=TRAIN,VALIDATION,TEST; got '{item}'")
        if domain and domain not in DOMAINS:
            raise DSparkError(f"--caps: unknown domain '{domain}' (expected one of {', '.join(DOMAINS)})")
        for d in ([domain] if domain else DOMAINS):
            caps[d] = c
    return caps


def _table(sizes: dict, splits) -> str:
    rows = [f"{'domain':<8}" + "".join(f"{s:>12}" for s in splits)]
    for d, by in sizes.items():
        rows.append(f"{d:<8}" + "".join(f"{by[s]:>12}" for s in splits))
    rows.append(f"{'total':<8}" + "".join(f"{sum(by[s] for by in sizes.values()):>12}" for s in splits))
    return "\n".join(rows)


def run(data_dir: str, out: str, caps=None, seed: int = 0, vocab_size: int = 4096,
        progress: bool = True, log=print) -> dict:
    """The whole recipe; returns the manifest (also written to <out>/manifest.json)."""
    from train.demo import corpus
    from train.demo.tokenizer import chat_text, token_stats, train_tokenizer

    timings = {}
    t0 = time.perf_counter()
    path = corpus.build(data_dir, caps=caps, seed=seed, progress=progress)
    timings["build_s"] = round(time.perf_counter() - t0, 1)
    name = os.path.basename(os.path.dirname(path))
    log(f"corpus: {path} ({timings['build_s']} s)")

    t = time.perf_counter()
    written = corpus.export_jsonl(data_dir, out, name)
    written.update({f"prompts/{k}": v for k, v in corpus.prompts_jsonl(data_dir, os.path.join(out, "prompts"),
                                                                        name).items()})
    timings["export_s"] = round(time.perf_counter() - t, 1)
    log(f"exported {len(written)} JSONL files to {out} ({timings['export_s']} s)")

    t = time.perf_counter()
    train_convs = _read(os.path.join(out, "train.jsonl"))
    tok_dir = train_tokenizer((chat_text(c["messages"]) for c in train_convs), os.path.join(out, "tokenizer"),
                              vocab_size=vocab_size)
    timings["tokenizer_s"] = round(time.perf_counter() - t, 1)
    log(f"tokenizer: {tok_dir} ({timings['tokenizer_s']} s)")

    man = corpus.manifest(data_dir, name)
    man["dataset_dir"] = path
    man["files"] = written
    man["tokenizer"] = {"dir": tok_dir, "vocab_size": vocab_size, "trained_on": "train split"}
    man["tokens"] = {s: token_stats(tok_dir, _read(os.path.join(out, f"{s}.jsonl"))) for s in corpus.SPLITS}
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    man["timings"] = timings
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(man, f, indent=2)
        f.write("\n")
    return man


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo.build_corpus", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--data-dir", required=True, help="where the TFDS corpus is built")
    p.add_argument("--out", required=True, help="where JSONL files, prompt files and the tokenizer go")
    p.add_argument("--caps", action="append", metavar="[DOMAIN=]TRAIN,VAL,TEST",
                   help="examples per domain and split (repeatable, per domain; default: 6000,300,300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE tokenizer vocabulary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    with cli_errors("train.demo.build_corpus"):
        man = run(args.data_dir, args.out, caps=parse_caps(args.caps), seed=args.seed,
                  vocab_size=args.vocab_size, progress=not args.quiet)
        from train.demo.corpus import SPLITS

        py, std = man["python"], man["sources"]["stdlib"]
        print(f"\nPython {py['version']} stdlib {py['stdlib']}: {std['files_used']} files used "
              f"({std['files_found']} found), {man['sources']['pydoc_data_topics']} pydoc topics, seed {man['seed']}")
        print(_table(man["sizes"], SPLITS))
        print("\ntokens per conversation (train):")
        for d, st in man["tokens"]["train"].items():
            c, a = st["conversation"], st["answer"]
            print(f"  {d:<6} mean {c['mean']:>6} p95 {c['p95']:>6} max {c['max']:>6}   "
                  f"answer mean {a['mean']:>6} p95 {a['p95']:>6}")
        print(f"\nmanifest: {os.path.join(args.out, 'manifest.json')} ({man['timings']['total_s']} s)")


if __name__ == "__main__":
    main()
