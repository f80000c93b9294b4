"""Old engine against new on this machine: the load bench of two checkouts, run in
alternating subprocesses, one concurrency level at a time; prints new / old per cell.

    git worktree add ../old <commit>
    python docs/load_bench_cpu/old_vs_new.py --old ../old --old-sps OLD.json --new-sps NEW.json \
        --concurrency 1 2 4 8 --rounds 3 --out work/old_vs_new

Each subprocess runs `python -m serve.load_bench` in its checkout with the same workload
(docs/load_bench_cpu/prompts.jsonl, 32 new tokens spread 0.5, pow2 buckets) for the
policies none, fixed and production; the SPS files are each checkout's own profile
format. A cell's ratio is the median over rounds of new / old median throughput.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

POLICIES = ("none", "fixed", "production")


def run(checkout: str, sps: str, c: int, rpc: int, repeats: int, out: str, extra: list) -> dict:
    cmd = [sys.executable, "-m", "serve.load_bench", "--prompt-file",
           os.path.abspath("docs/load_bench_cpu/prompts.jsonl"), "--concurrency", str(c), "--policy", *POLICIES,
           "--max-new-tokens", "32", "--length-spread", "0.5", "--buckets", "pow2", "--repeats", str(repeats),
           "--requests-per-client", str(rpc), "--sps-file", sps, "--out-dir", out, *extra]
    subprocess.run(cmd, cwd=checkout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        return {r["policy"]: r for r in json.load(f)["rows"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the old checkout (a git worktree)")
    p.add_argument("--old-sps", required=True)
    p.add_argument("--new-sps", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=3, help="old/new alternations per level")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point inside each subprocess")
    p.add_argument("--new-args", nargs=argparse.REMAINDER, default=[], help="extra flags for the new load bench")
    p.add_argument("--out", default="work/old_vs_new")
    args = p.parse_args()
    new_checkout = os.getcwd()
    table = {}
    for c in args.concurrency:
        rpc = max(3, 12 // c)
        for i in range(args.rounds):
            order = [("old", args.old, args.old_sps, []), ("new", new_checkout, args.new_sps, args.new_args)]
            for name, checkout, sps, extra in order if i % 2 == 0 else order[::-1]:
                out = os.path.abspath(os.path.join(args.out, f"{name}_c{c}_{i}"))
                rows = run(checkout, os.path.abspath(sps), c, rpc, args.repeats, out, extra)
                for pol in POLICIES:
                    table.setdefault((c, pol), {}).setdefault(name, []).append(rows[pol])
                print(f"c={c} round {i} {name}: " + ", ".join(f"{pol} {rows[pol]['throughput']:.0f}"
                                                             for pol in POLICIES), flush=True)
    print("\n| c | policy | old tok/s | new tok/s | new / old (median, range) | new host_exposed_frac |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for (c, pol), got in sorted(table.items()):
        ratios = [n["throughput"] / o["throughput"] for n, o in zip(got["new"], got["old"])]
        old = statistics.median(r["throughput"] for r in got["old"])
        new = statistics.median(r["throughput"] for r in got["new"])
        exposed = statistics.median(r.get("host_exposed_frac", 0.0) for r in got["new"])
        print(f"| {c} | {pol} | {old:.0f} | {new:.0f} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) | {exposed:.3f} |")


if __name__ == "__main__":
    main()
