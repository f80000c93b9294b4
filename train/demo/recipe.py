"""The bundled demo pair, rebuilt from scratch with the project's own code.

    python -m train.demo.recipe                     # every stage (about 9 h on 2 CPU cores)
    python -m train.demo.recipe --stage target      # one stage

Each stage skips when its artifact exists and RECIPE.json records that the same settings
(and the same input artifacts, by hash) made it; a killed run resumes where it stopped
(the target and drafter runs from their last checkpoint, regeneration from its last batch).

Stages and the artifact each one rebuilds:
  corpus     work/corpus        offline corpus (code / prose / math) + BPE tokenizer
  target     artifacts/demo/target   Qwen3-architecture target, trained on the corpus
  regen      work/regen         the target's own answers to training prompts (T = 1 and T = 0)
  drafters   artifacts/demo/{dspark,dflash,eagle3}   identical data and shape, gamma 7, bfloat16;
             DSpark and DFlash equal steps, Eagle3 DSpark's training FLOPs
  calibrate  artifacts/demo/dspark/sts_calibration.json   STS on the validation split
  report     docs/demo_report.md + docs/figures/demo_*.png   (python -m train.demo.report)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import types

from dspark_jax.errors import DefaultsFormatter, cli_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO, "artifacts", "demo")
STAGES = ("corpus", "target", "regen", "drafters", "calibrate")
KINDS = ("dspark", "dflash", "eagle3")
COMPUTE_RULE = ("DSpark and DFlash train the same steps; Eagle3 trains as many steps as give it DSpark's "
                "training FLOPs (XLA's cost analysis of one compiled step, the frozen target's forward included).")
GAMMA = 7
VOCAB = 2048
# the streams entering the target's last three layers (DeepSeek's DSpark convention), for all three drafters
TAPS = (4, 5, 6)
# training conversations per domain (validation and test keep the builder's 300 each, so the
# held-out prompts do not depend on these): all of the stdlib's code and prose, more math
CORPUS_CAPS = ("code=16000,300,300", "prose=8000,300,300", "math=12000,300,300")


def target_config(work: str, tokenizer_dir: str, steps: int):
    from dspark_jax.config import Qwen3Config
    from train.pretrain import PretrainConfig

    model = Qwen3Config(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                        tie_word_embeddings=True, max_position_embeddings=512)
    return PretrainConfig(tokenizer_dir=tokenizer_dir, data_dir=os.path.join(work, "data"), dataset="demo_corpus",
                          model=model, seq_len=256, batch_size=16, pack=True, steps=steps, lr=2e-3,
                          warmup_frac=0.03, weight_decay=0.01, out_dir=os.path.join(work, "runs", "target"),
                          ckpt_every=50, log_every=10, export_dtype="bfloat16")


def drafter_config(work: str, kind: str, steps: int):
    """Identical data, shape and batch for the three drafters: one draft layer with an MLP
    of 768 (each drafter's own parameters at most 1/6 of the target's)."""
    from train.config import TrainConfig

    return TrainConfig(target=os.path.join(ARTIFACTS, "target"), data_dir=os.path.join(work, "data"),
                       dataset="demo_regen", drafter=kind, draft_layers=1, draft_intermediate_size=768,
                       block_size=GAMMA, target_layer_ids=TAPS, markov_rank=64, markov_head_type="vanilla",
                       confidence_head=True, mask_token="<|mask|>", num_anchors=16, seq_len=160,
                       batch_size=16, steps=steps, lr=3e-3, warmup_frac=0.04, ttt_length=GAMMA,
                       out_dir=os.path.join(work, "runs", kind), ckpt_every=50, log_every=10)


def stage_corpus(work: str, args) -> None:
    from train import data
    from train.demo import build_corpus

    corpus = os.path.join(work, "corpus")
    if not os.path.exists(os.path.join(corpus, "manifest.json")):
        shutil.rmtree(data.dataset_path(os.path.join(work, "data"), "demo_corpus"), ignore_errors=True)  # stale
        caps = [a for c in CORPUS_CAPS for a in ("--caps", c)]
        build_corpus.main(["--data-dir", os.path.join(corpus, "tfds"), "--out", corpus,
                           "--vocab-size", str(VOCAB), "--quiet", *caps])
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
    """Two phases: --target-steps from scratch at lr 2e-3, then --target-more-steps
    continuing from that export at lr 1e-3 with a fresh warm-up and cosine and another
    order of the rows (0 skips it). Each phase resumes from its own run folder."""
    from train import pretrain

    pc = target_config(work, os.path.join(work, "corpus", "tokenizer"), args.target_steps)
    first = {"model": dataclasses.asdict(pc.model), "steps": pc.steps, "corpus_caps": list(CORPUS_CAPS)}
    settings = dict(first, more_steps=args.target_more_steps)
    out = os.path.join(ARTIFACTS, "target")
    if current(args, "target", settings, os.path.join(out, "model.safetensors")):
        return
    run_for(pc.out_dir, first)
    folder = pretrain.run(pc)
    if args.target_more_steps:
        more = pc.replace(init_from=folder, steps=args.target_more_steps, lr=1e-3, warmup_frac=0.05, seed=1,
                          out_dir=os.path.join(work, "runs", "target_more"))
        run_for(more.out_dir, dict(first, more_steps=more.steps, init_from=fingerprint(folder)))
        folder = pretrain.run(more)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    record(args, "target", settings)


def stage_regen(work: str, args) -> None:
    """The target's answers to --regen-prompts training prompts sampled at T = 1, and to
    the next --greedy-prompts at T = 0 (the contexts greedy serving meets), as one dataset
    whose validation split takes the same share of each."""
    from train import data, regen

    folder = os.path.join(work, "regen")
    out = os.path.join(folder, "answers.jsonl")
    settings = {"prompts": args.regen_prompts, "greedy_prompts": args.greedy_prompts,
                "target": fingerprint(os.path.join(ARTIFACTS, "target"))}
    if current(args, "regen", settings, out):
        return
    shutil.rmtree(data.dataset_path(os.path.join(work, "data"), "demo_regen"), ignore_errors=True)  # older answers'
    train_prompts = os.path.join(work, "corpus", "prompts", "train.jsonl")
    with open(train_prompts) as f:
        lines = f.readlines()
    shares = [("sampled", 1.0, lines[:args.regen_prompts]),
              ("greedy", 0.0, lines[args.regen_prompts:args.regen_prompts + args.greedy_prompts])]
    splits = {"train": [], "validation": []}
    os.makedirs(folder, exist_ok=True)
    for name, temperature, prompts in shares:
        if not prompts:
            continue
        with open(os.path.join(folder, f"{name}.prompts.jsonl"), "w") as f:
            f.writelines(prompts)
        answers = os.path.join(folder, f"{name}.jsonl")
        regen.regenerate(types.SimpleNamespace(
            target=os.path.join(ARTIFACTS, "target"), draft=None, prompts=os.path.join(folder, f"{name}.prompts.jsonl"),
            out=answers, max_new_tokens=96, temperature=temperature, top_k=0, top_p=1.0, seed=0, batch_size=64,
            limit=0, name=None))
        with open(answers) as f:
            validation, train = regen.holdout(f.readlines(), 0.06)
        splits["validation"] += validation
        splits["train"] += train
    sources = {}
    for split, rows in splits.items():
        sources[split] = [os.path.join(folder, f"{split}.jsonl")]
        with open(sources[split][0], "w") as f:
            f.writelines(rows)
    data.build(name="demo_regen", sources=sources, tokenizer_dir=os.path.join(ARTIFACTS, "target"),
               data_dir=os.path.join(work, "data"))
    with open(out, "w") as f:
        f.writelines(splits["validation"] + splits["train"])
    record(args, "regen", settings)


def step_flops(cfg) -> float:
    """XLA's count of one compiled training step (the frozen target's forward included)."""
    from train import trainer
    from train.config import resolved

    mesh, _, tparams, _, state, train_step, loader = trainer.setup(resolved(cfg))
    cost = train_step.lower(state, tparams, trainer.global_batch(loader.batch(0), mesh)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def drafter_steps(work: str, args) -> dict:
    """Steps per drafter: DSpark and DFlash train --drafter-steps steps; Eagle3 as many as
    give it DSpark's training FLOPs (per-step counts from XLA's cost analysis)."""
    rec = load_record()
    basis = {"dspark_steps": args.drafter_steps, "target": fingerprint(os.path.join(ARTIFACTS, "target"))}
    if rec.get("stages", {}).get("plan") == basis and set(rec.get("drafters", {})) == set(KINDS):
        return rec["drafters"]
    flops = {kind: step_flops(drafter_config(work, kind, args.drafter_steps)) for kind in KINDS}
    budget = args.drafter_steps * flops["dspark"]
    plan = {kind: {"steps": max(1, round(budget / flops[kind])) if kind == "eagle3" else args.drafter_steps,
                   "flops_per_step": flops[kind]} for kind in KINDS}
    update_record({"drafters": plan, "compute_rule": COMPUTE_RULE,
                   "stages": dict(rec.get("stages", {}), plan=basis)})
    return plan


def stage_drafters(work: str, args) -> None:
    from train import trainer

    plan = drafter_steps(work, args)
    tfp = fingerprint(os.path.join(ARTIFACTS, "target"))
    regen_fp = fingerprint(os.path.join(work, "regen", "answers.jsonl"))
    for kind in KINDS:
        cfg = drafter_config(work, kind, plan[kind]["steps"])
        settings = {"config": json.loads(cfg.to_json()) | {"out_dir": None, "data_dir": None, "target": None},
                    "target": tfp, "regen": regen_fp}
        out = os.path.join(ARTIFACTS, kind)
        if current(args, kind, settings, os.path.join(out, "model.safetensors")):
            continue
        run_for(cfg.out_dir, settings)
        trainer.run(cfg)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(cfg.out_dir, "drafter"), out)
        for extra in ("tokenizer.json", "tokenizer_config.json"):
            path = os.path.join(out, extra)
            if os.path.exists(path):
                os.remove(path)  # the target folder carries the tokenizer
        store_bfloat16(out)
        record(args, kind, settings)


def store_bfloat16(folder: str) -> None:
    """Rewrite a folder's float32 tensors in bfloat16 (the drafters are served like the
    target: loaded into the compute dtype, stored at half the size)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "bfloat16"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def stage_calibrate(work: str, args) -> None:
    """STS at temperature 1: the confidence head is trained on c* = 1 - TV/2, the
    acceptance rate of sampled verification, so it is calibrated for sampling."""
    from train import calibrate

    settings = {"dspark": fingerprint(os.path.join(ARTIFACTS, "dspark", "model.safetensors"))}
    if current(args, "calibrate", settings, os.path.join(ARTIFACTS, "dspark", "sts_calibration.json")):
        return
    calibrate.main(["--target", os.path.join(ARTIFACTS, "target"), "--draft", os.path.join(ARTIFACTS, "dspark"),
                    "--data-dir", os.path.join(work, "data"), "--dataset", "demo_regen", "--split", "validation",
                    "--temperature", "1", "--out", os.path.join(work, "calibration")])
    record(args, "calibrate", settings)


# ----------------------------------------------------------------------------- bookkeeping

def fingerprint(path: str) -> str:
    """sha256 (16 hex digits) of a file, or of a folder's files in name order."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    for name in files:
        h.update(os.path.basename(name).encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_record() -> dict:
    path = os.path.join(ARTIFACTS, "RECIPE.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def update_record(entries: dict) -> None:
    rec = load_record()
    rec.update(entries)
    with open(os.path.join(ARTIFACTS, "RECIPE.json"), "w") as f:
        json.dump(rec, f, indent=2)


def current(args, stage: str, settings: dict, artifact: str) -> bool:
    """Whether a stage's artifact exists and was made by these settings (and --force is off);
    says why when it is rebuilt."""
    if args.force or not os.path.exists(artifact):
        return False
    made = load_record().get("stages", {}).get(stage)
    if made == settings:
        print(f"   {stage}: current ({repo_relative(artifact)}), skipped", flush=True)
        return True
    print(f"   {stage}: {repo_relative(artifact)} was made by other settings; rebuilding", flush=True)
    return False


def run_for(out_dir: str, settings: dict) -> None:
    """Keep a training run folder's checkpoints only for the settings that made them (a
    stage rerun for a new target or new data starts over); mark the folder with them."""
    mark = os.path.join(out_dir, "recipe_settings.json")
    if os.path.exists(mark):
        with open(mark) as f:
            if json.load(f) != settings:
                print(f"   {repo_relative(out_dir)}: checkpoints of other settings; starting over", flush=True)
                shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(mark, "w") as f:
        json.dump(settings, f, indent=2)


def record(args, stage: str, settings: dict) -> None:
    stages = load_record().get("stages", {})
    stages[stage] = settings
    update_record({"stages": stages, **recipe_record(args)})


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
            "target_steps": args.target_steps,
            "target_more_steps": args.target_more_steps, "drafter_steps": args.drafter_steps,
            "regen_prompts": args.regen_prompts, "greedy_prompts": args.greedy_prompts,
            "target": dataclasses.asdict(target_config(args.work, "", args.target_steps).model),
            "drafter": {k: repo_relative(v) for k, v in drafter.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --work defaulting to work/demo in the repository."""
    p = argparse.ArgumentParser(prog="python -m train.demo.recipe", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--work", default=None,
                   help="scratch folder, not committed (default: work/demo in the repository)")
    p.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable; default: every stage)")
    p.add_argument("--target-steps", type=int, default=1200, help="the target's first phase, from scratch")
    p.add_argument("--target-more-steps", type=int, default=1600,
                   help="the target's second phase, continuing the first at half its learning rate (0: none)")
    p.add_argument("--drafter-steps", type=int, default=1600)
    p.add_argument("--regen-prompts", type=int, default=4000, help="training prompts answered by the target at T = 1")
    p.add_argument("--greedy-prompts", type=int, default=3000, help="the next training prompts, answered at T = 0")
    p.add_argument("--force", action="store_true",
                   help="redo stages whose artifacts are current (training runs still resume from their checkpoints "
                        "under --work: delete it to start over)")
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
        update_record(recipe_record(args))


if __name__ == "__main__":
    main()
