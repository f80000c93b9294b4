"""Fit Sequential Temperature Scaling (STS) of a drafter's confidences on rollouts.

    python -m train.calibrate --target T --draft D --data-dir DIR --dataset NAME \
        --split validation [--max-examples N] [--holdout-fraction 0.2] [--out DIR]

Writes D/sts_calibration.json ({"temperatures": [...]}, read by the drafter loader),
plus OUT/sts_report.json (ECE / AUC / Brier per position before and after) and
OUT/sts_reliability.png; OUT defaults to the drafter folder.
"""

from __future__ import annotations

import argparse
import os

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    from train import evaluation

    evaluation.add_rollout_args(p)
    p.add_argument("--grid-min", type=float, default=0.05, help="smallest temperature tried")
    p.add_argument("--grid-max", type=float, default=20.0, help="largest temperature tried")
    p.add_argument("--grid-points", type=int, default=241, help="log-spaced temperatures tried")
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help="fraction of prompts kept out of the fit and scored separately")
    p.add_argument("--out", help="folder for the report and plot (default: the drafter folder)")
    p.add_argument("--dry-run", action="store_true", help="report only; do not write the STS file")
    args = p.parse_args(argv)
    with cli_errors("train.calibrate"):
        import numpy as np

        from dspark_jax import calibration as cal

        if not 0 < args.grid_min <= args.grid_max or args.grid_points < 1:
            raise DSparkError("the temperature grid needs 0 < --grid-min <= --grid-max and --grid-points >= 1")
        # calibrate every position of the block, so the file serves any gamma
        ro, run = evaluation.rollouts_from_args(args, "calibrate")
        grid = np.geomspace(args.grid_min, args.grid_max, args.grid_points)
        temps, rep = evaluation.calibrate(ro, grid=grid, bins=args.bins, holdout_fraction=args.holdout_fraction,
                                          seed=args.seed)
        rep = {"run": {**run, "grid": [args.grid_min, args.grid_max, args.grid_points],
                       "holdout_fraction": args.holdout_fraction}, **rep}
        out = args.out or args.draft
        os.makedirs(out, exist_ok=True)
        evaluation.write_json(os.path.join(out, "sts_report.json"), rep)
        z = ro.logits()
        evaluation.plot_reliability(
            os.path.join(out, "sts_reliability.png"),
            {"before": cal.apply_sts(z, rep["before_temperatures"]), "after STS": cal.apply_sts(z, temps)},
            ro.accepted, ro.depth, bins=args.bins,
            title=f"STS on {args.dataset}/{args.split} ({ro.accepted.size} rounds, in-sample)")
        print(evaluation.calibration_table(rep, "fit"))
        if "holdout" in rep:
            print(evaluation.calibration_table(rep, "holdout"))
        print("temperatures: " + " ".join(f"{t:.3f}" for t in temps))
        edge = [k + 1 for k, t in enumerate(temps) if np.isclose(t, grid[0]) or np.isclose(t, grid[-1])]
        if edge:
            print(f"warning: positions {edge} ended on the edge of the temperature grid "
                  f"[{args.grid_min}, {args.grid_max}]; the head may carry no signal there (or widen the grid)")
        if args.dry_run:
            print("dry run: no STS file written")
        else:
            path = evaluation.write_sts(args.draft, temps, {"bins": args.bins, "rounds": int(ro.accepted.size),
                                                           "dataset": args.dataset, "split": args.split})
            print(f"wrote {path}")
        print(f"report in {os.path.join(out, 'sts_report.json')}")


if __name__ == "__main__":
    main()
