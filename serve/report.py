"""Compare backend profiles side by side: Markdown tables and PNG plots.

    python -m serve.report gpu_qwen3_4b.json cpu_qwen3_4b.json --out docs/backends --tau 3.2

Writes <DIR>/report.md (backends, decode step time vs batch, verify/decode cost ratio
vs query length, time over the roofline floor, drafter costs, SPS(B), prefill, the
expected per-user speedup of DSpark at the given tau, compile times, what was skipped)
and the PNGs it links (step time vs batch, cost ratio vs query length, SPS curves,
time over floor, expected speedup).
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.report", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("profiles", nargs="+", metavar="PROFILE.json", help="files written by python -m serve.profile")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the PNGs")
    p.add_argument("--tau", type=float, default=3.2,
                   help="measured mean tokens committed per round (bonus included) for the speedup estimate")
    p.add_argument("--no-plots", action="store_true", help="Markdown only")
    p.add_argument("--note", default=None, help="a paragraph quoted at the top of report.md")
    args = p.parse_args(argv)
    with cli_errors("serve.report"):
        from serve.profiling.report import render

        out = render(args.profiles, args.out, args.tau, plots=not args.no_plots, note=args.note)
        print(out["markdown"])
        for path in out["plots"]:
            print(path)


if __name__ == "__main__":
    main()
