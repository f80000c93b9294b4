"""Train a DSpark / DFlash / Eagle3 drafter for a target (resumes from the latest checkpoint).

    python -m train.train --config configs/dspark_demo.py --set steps=200 --set out_dir=runs/x

Multi-host (TPU pod): run the same command on every host with --distributed.
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--config",
                   help="a configs/*.py file defining CONFIG = TrainConfig(...) (default: TrainConfig's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (pods; or with the flags below)")
    p.add_argument("--coordinator", help="host:port of process 0 (explicit multi-process setup)")
    p.add_argument("--num-processes", type=int, help="processes in all (with --coordinator)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    with cli_errors("train.train"):
        from train.config import load_config

        cfg = load_config(args.config, args.set)
        from dspark_jax import mesh as mesh_lib

        data, model = mesh_lib.parse_mesh(cfg.mesh)
        if args.distributed or args.coordinator:
            import jax

            kw = {}
            if args.coordinator:
                kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id)
            jax.distributed.initialize(**kw)
        else:
            mesh_lib.simulate_cpu_devices(data * model)
        from train import trainer

        _, drafter = trainer.run(cfg, progress=not args.no_progress)
        from dspark_jax.drafters.eagle3_export import EAGLE3_SUFFIX, parse_layouts
        from dspark_jax.drafters.zlab_export import ZLAB_SUFFIX

        suffix = {"deepspec": "", "zlab": ZLAB_SUFFIX, "eagle3": EAGLE3_SUFFIX}
        folders = [f"{cfg.out_dir}/drafter" + suffix[lay] for lay in parse_layouts(cfg.export_layout)]
        print(f"trained {drafter.kind} drafter exported to {' and '.join(folders)}")


if __name__ == "__main__":
    main()
