"""Evaluate a drafter on held-out prompts with the real speculation step.

    python -m train.evaluate --target T --draft D --data-dir DIR --dataset NAME \
        --split validation [--max-examples N] [--temperature 0] [--max-new-tokens 64] [--out DIR]

Writes OUT/eval.json (per-domain tau, per-position conditional acceptance, confidence
ECE / AUC / Brier), OUT/reliability.png and OUT/acceptance.png.
"""

from __future__ import annotations

import argparse
import os

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    from train import evaluation

    evaluation.add_rollout_args(p)
    p.add_argument("--gamma", type=int, help="draft tokens per round (default: the drafter's block size)")
    p.add_argument("--out", default="eval", help="output folder")
    args = p.parse_args(argv)
    with cli_errors("train.evaluate"):
        import numpy as np

        from dspark_jax import calibration as cal

        ro, run = evaluation.rollouts_from_args(args, "evaluate", gamma=args.gamma)
        rep = {"run": run, **evaluation.report(ro, args.bins)}
        os.makedirs(args.out, exist_ok=True)
        evaluation.write_json(os.path.join(args.out, "eval.json"), rep)
        title = f"{os.path.basename(os.path.normpath(args.draft))} on {args.dataset}/{args.split}"
        evaluation.plot_acceptance(os.path.join(args.out, "acceptance.png"), rep, title)
        if ro.with_confidence and ro.accepted.size:
            z = ro.logits()
            sets = {"raw (t=1)": cal.sigmoid(z)}
            if ro.temperatures is not None:
                sets["STS"] = cal.apply_sts(z, ro.temperatures)
            evaluation.plot_reliability(os.path.join(args.out, "reliability.png"), sets, ro.accepted, ro.depth,
                                        bins=args.bins, title=title)
        a = rep[evaluation.ALL]
        print(f"{a['prompts']} prompts, {a['rounds']} rounds, tau {a['tau']:.3f}; conditional acceptance "
              + " ".join("-" if np.isnan(r) else f"{r:.2f}" for r in a["conditional_acceptance"]))
        for name, grp in rep["domains"].items():
            print(f"  {name}: tau {grp['tau']:.3f} over {grp['prompts']} prompts")
        print(f"wrote {os.path.join(args.out, 'eval.json')}")


if __name__ == "__main__":
    main()
