"""The bundled demo pair, rebuilt from scratch with the project's own code.

    python -m train.demo.recipe                     # every stage (about 1-2 h on 2 CPU cores)
    python -m train.demo.recipe --stage target      # one stage (each skips when done)

Stages and the artifact each one rebuilds:
  corpus     work/corpus        offline corpus (code / prose / math) + BPE tokenizer
  target     artifacts/demo/target   Qwen3-architecture target, trained on the corpus
  regen      work/regen         the target's own answers to the training prompts
  drafters   artifacts/demo/{dspark,dflash,eagle3}   identical data, steps and budget, gamma 7
  calibrate  artifacts/demo/dspark/sts_calibration.json   STS on the validation split
  report     docs/demo_report.md + docs/figures/demo_*.png   (python -m train.demo.report)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import types

from dspark_jax.errors import DefaultsFormatter, cli_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO, "artifacts", "demo")
STAGES = ("corpus", "target", "regen", "drafters", "calibrate")
GAMMA = 7
VOCAB = 2048
TAPS = (0, 1, 2)


def target_config(work: str, tokenizer_dir: str, steps: int):
    from dspark_jax.config import Qwen3Config
    from train.pretrain import PretrainConfig

    model = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                        tie_word_embeddings=True, max_position_embeddings=512)
    return PretrainConfig(tokenizer_dir=tokenizer_dir, data_dir=os.path.join(work, "data"), dataset="demo_corpus",
                          model=model, seq_len=160, batch_size=16, steps=steps, lr=3e-3, warmup_frac=0.03,
                          weight_decay=0.01, out_dir=os.path.join(work, "runs", "target"), ckpt_every=100,
                          log_every=20, export_dtype="bfloat16")


def drafter_config(work: str, kind: str, steps: int):
    """Identical data, steps and budget for the three drafters."""
    from train.config import TrainConfig

    return TrainConfig(target=os.path.join(ARTIFACTS, "target"), data_dir=os.path.join(work, "data"),
                       dataset="demo_regen", drafter=kind, draft_layers=1, block_size=GAMMA,
                       target_layer_ids=TAPS, markov_rank=64, markov_head_type="vanilla",
                       confidence_head=True, mask_token="<|mask|>", num_anchors=16, seq_len=160,
                       batch_size=16, steps=steps, lr=3e-3, warmup_frac=0.04, ttt_length=GAMMA,
                       out_dir=os.path.join(work, "runs", kind), ckpt_every=100, log_every=20)


def stage_corpus(work: str, args) -> None:
    from train import data
    from train.demo import build_corpus

    corpus = os.path.join(work, "corpus")
    if not os.path.exists(os.path.join(corpus, "manifest.json")):
        build_corpus.main(["--data-dir", os.path.join(corpus, "tfds"), "--out", corpus,
                           "--vocab-size", str(VOCAB), "--quiet"])
    copy_test_prompts(corpus)
    tok = os.path.join(corpus, "tokenizer")
    data.build(name="demo_corpus", sources={"train": [os.path.join(corpus, "train.jsonl")],
                                            "validation": [os.path.join(corpus, "validation.jsonl")]},
               tokenizer_dir=tok, data_dir=os.path.join(work, "data"), max_len=512)


def copy_test_prompts(corpus: str, per_domain: int = 64) -> None:
    """Held-out test prompts travel with the artifacts, so the report needs nothing else."""
    dst = os.path.join(ARTIFACTS, "prompts")
    os.makedirs(dst, exist_ok=True)
    for domain in ("code", "prose", "math"):
        with open(os.path.join(corpus, "prompts", f"test.{domain}.jsonl")) as f:
            lines = f.readlines()[:per_domain]
        with open(os.path.join(dst, f"test.{domain}.jsonl"), "w") as f:
            f.writelines(lines)


def stage_target(work: str, args) -> None:
    from train import pretrain

    out = os.path.join(ARTIFACTS, "target")
    if os.path.exists(os.path.join(out, "model.safetensors")) and not args.force:
        return
    folder = pretrain.run(target_config(work, os.path.join(work, "corpus", "tokenizer"), args.target_steps))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)


def stage_regen(work: str, args) -> None:
    from train import regen

    out = os.path.join(work, "regen", "answers.jsonl")
    if os.path.exists(out) and not args.force:
        return
    ns = types.SimpleNamespace(
        target=os.path.join(ARTIFACTS, "target"), draft=None,
        prompts=os.path.join(work, "corpus", "prompts", "train.jsonl"), out=out,
        max_new_tokens=96, temperature=1.0, top_k=0, top_p=1.0, seed=0, batch_size=64,
        limit=args.regen_prompts, name="demo_regen", data_dir=os.path.join(work, "data"), val_fraction=0.06)
    regen.regenerate(ns)


def stage_drafters(work: str, args) -> None:
    from train import trainer

    for kind in ("dspark", "dflash", "eagle3"):
        out = os.path.join(ARTIFACTS, kind)
        if os.path.exists(os.path.join(out, "model.safetensors")) and not args.force:
            continue
        cfg = drafter_config(work, kind, args.drafter_steps)
        trainer.run(cfg)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(cfg.out_dir, "drafter"), out)
        for extra in ("tokenizer.json", "tokenizer_config.json"):
            path = os.path.join(out, extra)
            if os.path.exists(path):
                os.remove(path)  # the target folder carries the tokenizer


def stage_calibrate(work: str, args) -> None:
    """STS at temperature 1: the confidence head is trained on c* = 1 - TV/2, the
    acceptance rate of sampled verification, so it is calibrated for sampling."""
    from train import calibrate

    calibrate.main(["--target", os.path.join(ARTIFACTS, "target"), "--draft", os.path.join(ARTIFACTS, "dspark"),
                    "--data-dir", os.path.join(work, "data"), "--dataset", "demo_regen", "--split", "validation",
                    "--temperature", "1", "--out", os.path.join(work, "calibration")])


def repo_relative(value):
    """A path inside the repository as a path relative to its root (so a recorded recipe
    reads the same on every machine); anything else unchanged."""
    if isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(value, REPO)
        if rel != ".." and not rel.startswith(".." + os.sep):
            return rel
    return value


def recipe_record(args) -> dict:
    """What RECIPE.json records: the command, the settings and both configs, with paths
    inside the repository written relative to its root."""
    drafter = json.loads(drafter_config(args.work, "dspark", args.drafter_steps).to_json())
    return {"command": "python -m train.demo.recipe", "gamma": GAMMA, "vocab": VOCAB, "taps": TAPS,
            "target_steps": args.target_steps, "drafter_steps": args.drafter_steps,
            "regen_prompts": args.regen_prompts,
            "target": dataclasses.asdict(target_config(args.work, "", args.target_steps).model),
            "drafter": {k: repo_relative(v) for k, v in drafter.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --work defaulting to work/demo in the repository."""
    p = argparse.ArgumentParser(prog="python -m train.demo.recipe", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--work", default=None,
                   help="scratch folder, not committed (default: work/demo in the repository)")
    p.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable; default: every stage)")
    p.add_argument("--target-steps", type=int, default=800)
    p.add_argument("--drafter-steps", type=int, default=300)
    p.add_argument("--regen-prompts", type=int, default=1500)
    p.add_argument("--force", action="store_true", help="rebuild artifacts that exist")
    args = p.parse_args(argv)
    args.work = os.path.abspath(args.work) if args.work else os.path.join(REPO, "work", "demo")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors("train.demo.recipe"):
        os.makedirs(args.work, exist_ok=True)
        for stage in args.stage or STAGES:
            print(f"== stage {stage}", flush=True)
            globals()[f"stage_{stage}"](args.work, args)
        with open(os.path.join(ARTIFACTS, "RECIPE.json"), "w") as f:
            json.dump(recipe_record(args), f, indent=2)


if __name__ == "__main__":
    main()
