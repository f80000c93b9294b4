"""Micro-benchmark of the sparse MoE (routed_experts) against the dense reference (dense_experts).

    python -m serve.moe_bench                                # CPU: about a minute
    python -m serve.moe_bench --tokens 8,64,512 --experts 8,32,128 --top-k 1,2,4,8 --out moe.json
    python -m serve.moe_bench --dtype bfloat16 --d 2048 --inter 768   # accelerator-sized

Two sweeps at each token count N: total experts X (at --sweep-k active experts per
token) and active experts K (at --sweep-x total experts). Each case jits both functions
on the same random inputs, then times them alternately (--repeats rounds, one call of
each per round) and reports the medians and the largest difference between the two
outputs, and how many distinct experts the tokens hit (the weights the routed path must
read). The routed cost should follow K (active) and stay about flat in X (total) while
the experts hit do; the dense cost follows X.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def cases(tokens, experts, top_ks, sweep_k: int, sweep_x: int) -> list[tuple[int, int, int]]:
    """(N, X, K) for both sweeps at every N, each case once, in sweep order."""
    out = []
    for n in tokens:
        out += [(n, x, sweep_k) for x in experts] + [(n, sweep_x, k) for k in top_ks]
    return list(dict.fromkeys(out))


def measure(n: int, x: int, k: int, d: int, inter: int, dtype: str, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds per call of routed_experts and dense_experts on one random case."""
    import jax
    import jax.numpy as jnp

    from dspark_jax.models.moe import dense_experts, routed_experts

    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    inputs = (jax.random.normal(keys[0], (n, d), dtype),
              jax.nn.softmax(jax.random.normal(keys[1], (n, k)), axis=-1),
              jax.vmap(lambda kk: jax.random.permutation(kk, x)[:k])(jax.random.split(keys[2], n)).astype(jnp.int32),
              (jax.random.normal(keys[3], (x, 2, inter, d)) * d ** -0.5).astype(dtype),
              (jax.random.normal(keys[4], (x, d, inter)) * inter ** -0.5).astype(dtype))
    fns = {name: jax.jit(lambda *a, f=f: f(*a, jax.nn.silu))
           for name, f in (("routed", routed_experts), ("dense", dense_experts))}
    outs = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn(*inputs).block_until_ready()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*inputs).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    touched = int(jnp.unique(inputs[2]).size)
    diff = float(jnp.abs(outs["routed"].astype(jnp.float32) - outs["dense"].astype(jnp.float32)).max())
    return {"tokens": n, "experts": x, "top_k": k, "touched": touched, "d": d, "inter": inter, "dtype": dtype,
            "routed_s": statistics.median(times["routed"]), "dense_s": statistics.median(times["dense"]),
            "max_abs_diff": diff}


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| tokens N | experts X | top-k K | experts hit | routed ms | dense ms | dense / routed | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['experts']} | {r['top_k']} | {r['touched']} | {r['routed_s'] * 1e3:.2f} | "
                     f"{r['dense_s'] * 1e3:.2f} | {r['dense_s'] / r['routed_s']:.1f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.moe_bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--tokens", type=_int_list, default=[8, 64, 512], help="token counts N, e.g. 64,512")
    p.add_argument("--experts", type=_int_list, default=[8, 32, 128], help="total experts X of the X sweep")
    p.add_argument("--top-k", type=_int_list, default=[1, 2, 4, 8], help="active experts K of the K sweep")
    p.add_argument("--sweep-k", type=int, default=2, help="K during the X sweep")
    p.add_argument("--sweep-x", type=int, default=32, help="X during the K sweep")
    p.add_argument("--d", type=int, default=128, help="model width d")
    p.add_argument("--inter", type=int, default=128, help="expert intermediate size I")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each (the first one compiles)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--out", help="also write the rows and the run's setup as JSON to this file")
    args = p.parse_args(argv)
    with cli_errors("serve.moe_bench"):
        if args.warmup < 1 or args.repeats < 1:
            raise DSparkError("--warmup and --repeats must be >= 1")
        if min(args.d, args.inter, args.sweep_k, args.sweep_x) < 1:
            raise DSparkError("--d, --inter, --sweep-k and --sweep-x must be >= 1")
        todo = cases(args.tokens, args.experts, args.top_k, args.sweep_k, args.sweep_x)
        too_many = [(x, k) for _, x, k in todo if k > x]
        if too_many:
            raise DSparkError(f"top-k {too_many[0][1]} is more than the {too_many[0][0]} experts")
        import jax

        rows = [measure(n, x, k, args.d, args.inter, args.dtype, args.warmup, args.repeats) for n, x, k in todo]
        device = jax.devices()[0]
        title = (f"{device.device_kind} ({jax.default_backend()}, jax {jax.__version__}), {args.dtype}, "
                 f"d {args.d}, I {args.inter}, silu; median of {args.repeats} interleaved rounds")
        print(markdown(rows, title))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
                           "argv": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
