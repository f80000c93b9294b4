"""Load benchmark of the HTTP server against the in-process engine, closed loop.

    python -m serve.server_bench --concurrency 1 2 4 8 16 --policy none production \
        --sps-file docs/load_bench_cpu/sps_profile.json --out-dir docs/server_bench_cpu

For each policy and concurrency c: `python -m serve.server` in its own process (min(c, 8)
slots, the engine load bench's cache length and buckets), and this process as the client:
c clients, each streaming its next request (`/v1/completions`, token-id prompts, T = 0,
`ignore_eos`) when the one before ends. The workload is the engine load bench's (the same
prompts and max_tokens per request), so the in-process engine runs it too, in this process
after the server has stopped, as `serve.load_bench` would (the same slots). Repeats
alternate server and engine. Reported per point: aggregate and per-user tokens/s, time to
first token and each request's mean gap between tokens (p50 / p99 over requests), and the
server's throughput over the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time

from dspark_jax.errors import DefaultsFormatter, cli_errors

MAX_SLOTS = 8


async def _one(client, url: str, model: str, prompt: list[int], max_new: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_new, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, events, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                events.append(time.perf_counter())
    end = time.perf_counter()
    first = events[0] if events else end
    return {"tokens": tokens, "ttft": first - start, "seconds": end - start,
            "gap": (events[-1] - first) / (tokens - 1) if len(events) > 1 and tokens > 1 else 0.0}


async def _closed_loop(url: str, model: str, prompts, lengths, clients: int) -> tuple[list[dict], float]:
    import httpx

    todo = list(range(len(lengths)))
    done: list[dict] = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def worker():
            while todo:
                i = todo.pop(0)
                done.append(await _one(client, url, model, prompts[i % len(prompts)], int(lengths[i])))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done, time.perf_counter() - t0


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else 0.0


def _server_point(args, policy: str, c: int, cache_len: int, prompts, lengths) -> dict:
    cmd = [sys.executable, "-m", "serve.server", "--port", "0", "--slots", str(min(c, MAX_SLOTS)), "--max-len",
           str(cache_len), "--policy", policy, "--buckets", "pow2", "--max-queue", str(max(c, 1)), "--warmup", "full"]
    if args.sps_file:
        cmd += ["--sps-file", args.sps_file]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            m = re.search(r"serving (\S+) on (http://\S+)", line)
            if m:
                break
        else:
            raise RuntimeError(f"the server exited ({proc.wait()}) before it was ready")
        model, url = m.group(1), m.group(2)
        asyncio.run(_closed_loop(url, model, prompts, lengths[:c], c))  # compiles what the run needs
        reqs, secs = asyncio.run(_closed_loop(url, model, prompts, lengths, c))
    finally:
        proc.terminate()
        proc.wait(60)
    tokens = sum(r["tokens"] for r in reqs)
    return {"throughput": tokens / secs, "per_user": statistics.fmean(r["tokens"] / r["seconds"] for r in reqs),
            "ttft_p50": _pct([r["ttft"] for r in reqs], 0.5), "ttft_p99": _pct([r["ttft"] for r in reqs], 0.99),
            "gap_p50": _pct([r["gap"] for r in reqs], 0.5), "gap_p99": _pct([r["gap"] for r in reqs], 0.99),
            "tokens": tokens, "requests": len(reqs)}


def _write(args, rows) -> str:
    """results.json and results.md under --out-dir -> the markdown table."""
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    lines = ["| policy | c | server tok/s | per-user tok/s | TTFT p50 / p99 (ms) | token gap p50 / p99 (ms) | "
             "engine tok/s | server / engine |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['concurrency']} | {r['throughput']:.0f} | {r['per_user']:.0f} | "
                     f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | {1e3 * r['gap_p50']:.1f} / "
                     f"{1e3 * r['gap_p99']:.1f} | {r['engine_throughput']:.0f} | {r['server_over_engine']:.2f} |")
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.server_bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--policy", nargs="+", default=["none", "production"])
    p.add_argument("--prompt-file", default="docs/load_bench_cpu/prompts.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--length-spread", type=float, default=0.5)
    p.add_argument("--sps-file", default=None,
                   help="profile for the scheduled policies (default: ~/.cache/dspark_jax/sps.json)")
    p.add_argument("--repeats", type=int, default=2, help="server / engine alternations per point")
    p.add_argument("--out-dir", default="server_bench_out")
    args = p.parse_args(argv)
    with cli_errors("serve.server_bench"):
        from dspark_jax import drafters, prompts as prompts_lib, target
        from dspark_jax.serving import GenerateRequest, resolve_folders
        from dspark_jax.tokenizer import Tokenizer
        from serve import load_points

        tfolder, dfolder, kind = resolve_folders(GenerateRequest())
        prompts = prompts_lib.encode_prompts(prompts_lib.read_prompt_file(args.prompt_file), Tokenizer(tfolder), False)
        tcfg, tparams = target.load(tfolder)
        drafter, dparams = drafters.load(dfolder, tcfg, kind=kind)
        rows = []
        for policy in args.policy:
            for c in args.concurrency:
                slots = min(c, MAX_SLOTS)
                settings = load_points.LoadSettings(
                    concurrency=(slots,), policies=(policy,), requests_per_client=max(3, 12 // c) * c // slots,
                    prompt_len=max(map(len, prompts)), max_new_tokens=args.max_new_tokens,
                    length_spread=args.length_spread, buckets="pow2", sps_file=args.sps_file, device_time=False)
                lengths = load_points.request_lengths(settings, max(3, 12 // c) * c)
                costs = load_points.profile_costs(tcfg, drafter, slots, settings) if policy in ("production",
                                                                                                "algorithm1") else None
                server, engine_rows, eng = [], [], None
                for _ in range(args.repeats):
                    server.append(_server_point(args, policy, c, settings.cache_len, prompts, lengths))
                    row, eng = load_points.run_point(tcfg, tparams, drafter if policy != "none" else None, dparams,
                                                     policy, "closed", slots, settings, prompts, costs=costs,
                                                     engine=eng)
                    engine_rows.append(row.throughput)
                best = sorted(server, key=lambda r: r["throughput"])[len(server) // 2]
                ratios = [s["throughput"] / e for s, e in zip(server, engine_rows)]
                rows.append({"policy": policy, "concurrency": c, **best,
                             "engine_throughput": statistics.median(engine_rows),
                             "server_over_engine": statistics.median(ratios)})
                _write(args, rows)  # after every point: a stopped run keeps what it measured
                print(f"{policy} c={c}: server {best['throughput']:.0f} tok/s, engine "
                      f"{statistics.median(engine_rows):.0f}, ratio {statistics.median(ratios):.2f}", flush=True)
        print(_write(args, rows))


if __name__ == "__main__":
    main()
