"""Profile a target + drafter pair on this backend: step times beside their roofline floor.

    python -m serve.profile                                  # the bundled pair
    python -m serve.profile --target T [--draft D]           # folders (random drafter without --draft)
    python -m serve.profile --preset qwen3-4b --out gpu_qwen3_4b.json   # full-size shapes, random weights
    python -m serve.profile --preset qwen3-4b --quick --batch 1 --context 512

Measures prefill tokens/s, plain decode and verification step times (q_len 1..1+gamma)
per batch and context, the drafter's parallel pass / sequential head / context ingest,
SPS(B), compile times and peak memory, plus the memory bandwidth and matmul throughput
that set each step's roofline floor. Writes one self-describing JSON (rewritten after
every measurement, so an interrupted run keeps what it measured); `python -m
serve.report` compares several. Needs no network.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise DSparkError(f"{flag} takes comma-separated integers (e.g. 1,8,64); got '{text}'") from None
    if not vals:
        raise DSparkError(f"{flag} needs at least one value")
    return vals


def parser() -> argparse.ArgumentParser:
    from serve.profiling.pairs import PRESET_NAMES

    p = argparse.ArgumentParser(prog="python -m serve.profile", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    src = p.add_argument_group("what to profile (default: the bundled pair)")
    src.add_argument("--target", help="target folder (Hugging Face layout)")
    src.add_argument("--draft", help="DSpark/DFlash drafter folder (default with --target: a random drafter)")
    src.add_argument("--preset", choices=PRESET_NAMES,
                     help="full-size shapes with random weights (target and a DSpark drafter)")
    src.add_argument("--draft-layers", type=int, default=None, help="layers of a random drafter (default 5; 1 "
                     "for targets under 12 layers)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL device mesh")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="run dtype (default: float32 on a CPU, else the checkpoint's; bfloat16 for presets)")
    p.add_argument("--batch", help="comma-separated batch sizes (default 1,8,64,256; --quick 1,8)")
    p.add_argument("--context", help="comma-separated cache lengths (default 512,4096,32768; --quick 512)")
    p.add_argument("--q-len", help="verification query lengths (default 1..1+gamma; --quick 1,2,mid,1+gamma)")
    p.add_argument("--prefill-len", help="prompt lengths for prefill (default: contexts up to 8192; --quick 128)")
    p.add_argument("--sps-slots", help="cache rows for SPS(B) (default: the largest batch)")
    p.add_argument("--sps-budgets", help="token budgets B for SPS(B) (default: powers of two up to "
                   "slots x (1 + gamma); --quick 1, slots and the maximum)")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default 7, capped at a "
                   "loaded drafter's block size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 10; --quick 3)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop starting new measurements after this many seconds; the file stays valid (default: no "
                        "limit)")
    p.add_argument("--quick", action="store_true", help="a small grid and few repeats (minutes, not hours)")
    p.add_argument("--out", default=None, help="profile JSON (default profile_<device>_<model>.json)")
    p.add_argument("--quiet", action="store_true", help="no per-measurement log lines (the progress bar stays)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    with cli_errors("serve.profile"):
        from tqdm import tqdm

        from dspark_jax import mesh as mesh_lib
        from serve.profiling import measure, pairs, settings as settings_lib

        if args.preset and (args.target or args.draft):
            raise DSparkError("--preset takes random weights: drop --target / --draft, or drop --preset")
        data, model = mesh_lib.parse_mesh(args.mesh)
        import jax

        if jax.devices()[0].platform == "cpu" and data * model > jax.device_count():
            raise DSparkError(f"mesh {args.mesh} needs {data * model} devices; on CPU set XLA_FLAGS="
                              f"--xla_force_host_platform_device_count={data * model} before starting")
        mesh = mesh_lib.make_mesh(args.mesh)
        for name, val in (("--warmup", args.warmup), ("--repeats", args.repeats)):
            if val is not None and val < (0 if name == "--warmup" else 1):
                raise DSparkError(f"{name} must be >= {0 if name == '--warmup' else 1}; got {val}")
        pair = pairs.load_pair(target_dir=args.target, draft_dir=args.draft, preset=args.preset,
                                 dtype=args.dtype, gamma=args.gamma, mesh=mesh, draft_layers=args.draft_layers)
        gamma = pair.drafter.gamma if pair.drafter is not None else pair.dparams["gamma"]
        settings = settings_lib.resolve_settings(
            gamma=gamma, quick=args.quick,
            batches=_ints(args.batch, "--batch") if args.batch else None,
            contexts=_ints(args.context, "--context") if args.context else None,
            q_lens=_ints(args.q_len, "--q-len") if args.q_len else None,
            prefill_lens=_ints(args.prefill_len, "--prefill-len") if args.prefill_len else None,
            sps_slots=_ints(args.sps_slots, "--sps-slots") if args.sps_slots else None,
            sps_budgets=_ints(args.sps_budgets, "--sps-budgets") if args.sps_budgets else None,
            warmup=args.warmup, repeats=args.repeats, time_budget_s=args.time_budget,
            max_positions=getattr(pair.tcfg, "max_position_embeddings", None))
        out = args.out or _default_out(jax.devices()[0].device_kind, pair.meta["model_name"])
        bar = tqdm(total=1, desc="profile", unit="meas", dynamic_ncols=True)
        log = (lambda _: None) if args.quiet else (lambda msg: tqdm.write(f"  {msg}", file=sys.stderr))
        prof = measure.Profiler(pair, settings, mesh, out, ["python", "-m", "serve.profile", *(argv or sys.argv[1:])],
                                progress=lambda what: (bar.set_postfix_str(what), bar.update(1)), log=log)
        bar.reset(total=prof.plan_size())
        previous = signal.signal(signal.SIGTERM, _sigterm)  # `kill` also leaves an "interrupted" profile
        try:
            result = prof.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
            print(f"serve.profile: wrote {out}", file=sys.stderr)
        n = len(result.steps) + len(result.drafter) + len(result.sps) + len(result.prefill)
        print(f"{result.label}: {n} measurements, {len(result.skipped)} skipped -> {out}")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _default_out(kind: str, model: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in f"{kind}_{model}".lower()).strip("_")
    return os.path.join("profiles", f"profile_{safe}.json")


if __name__ == "__main__":
    main()
