"""Benchmark the paged attention kernels against the jnp reference and JAX's shipped kernels.

    python -m serve.bench_kernels                                  # CPU: reference only, about a minute
    python -m serve.bench_kernels --batch 1,8,64,256 --context 512,2048,8192,32768 --q-len 1,8,16
    python -m serve.bench_kernels --interpret                      # CPU smoke run of the kernels
    python -m serve.bench_kernels --kernel block --q-len 8,16      # the drafter's block attention

Reports the median time per call, the K/V bandwidth it achieves (bytes of K/V pages read /
time) against the HBM bandwidth measured in the same run, the cost of verifying q_len
tokens relative to decoding one (same batch and context), and the error against the
reference. `--impl kernel` is the Pallas kernel of the current backend; `shipped` is JAX's
own kernel where one covers the case (TPU ragged_paged_attention; GPU paged_attention for
q_len 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _merge(values: list[list[int]] | None, default: list[int]) -> list[int]:
    return sorted({v for vs in values for v in vs}) if values else default


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.bench_kernels", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--kernel", action="append", choices=("verify", "block"),
                   help="which attention (repeatable; default: verify)")
    p.add_argument("--impl", action="append", choices=("reference", "kernel", "tpu", "gpu", "shipped"),
                   help="implementations (repeatable; default: reference on CPU, reference+kernel+shipped on "
                        "GPU/TPU, all with --interpret)")
    p.add_argument("--batch", action="append", type=_int_list,
                   help="batch sizes, e.g. 1,8,64 (repeatable; default: 1,8,64,256 on GPU/TPU, 1,8,32 on CPU, "
                        "2 with --interpret on CPU)")
    p.add_argument("--context", action="append", type=_int_list,
                   help="context lengths (kv_len incl. the new tokens), e.g. 512,2048 (default: 512,2048,8192,32768 on "
                        "GPU/TPU, 512,2048,8192 on CPU, 256 with --interpret on CPU)")
    p.add_argument("--q-len", action="append", type=_int_list,
                   help="query tokens per sequence (verify: 1 = decode, 1+gamma = verification; block: block size; "
                        "default: 1,8,16 on GPU/TPU, 1,8 on CPU)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls (the first one compiles)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    p.add_argument("--interpret", action="store_true",
                   help="run Pallas kernels in interpret mode (CPU smoke run; small default shapes)")
    p.add_argument("--max-pool-gib", type=float, default=None,
                   help="skip shapes whose K/V pool is larger (default: 40%% of device memory, 2 GiB on CPU)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="size of the bandwidth-probe copy (default: 1 GiB, 0.25 on CPU)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of Markdown")
    args = p.parse_args(argv)
    with cli_errors("serve.bench_kernels"):
        import jax
        from tqdm import tqdm

        from pallas_kernels import bench

        if args.warmup < 1 or args.repeats < 1:
            raise DSparkError("--warmup and --repeats must be >= 1")
        if args.heads % args.kv_heads:
            raise DSparkError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
        if min(args.heads, args.kv_heads, args.head_dim, args.page_size) < 1:
            raise DSparkError("--heads, --kv-heads, --head-dim and --page-size must be >= 1")
        backend = jax.default_backend()
        accel = backend in ("gpu", "tpu")
        small = backend == "cpu" and args.interpret
        kernels = args.kernel or ["verify"]
        batches = _merge(args.batch, [2] if small else [1, 8, 64, 256] if accel else [1, 8, 32])
        contexts = _merge(args.context, [256] if small else [512, 2048, 8192, 32768] if accel else [512, 2048, 8192])
        q_lens = _merge(args.q_len, [1, 8] if not accel else [1, 8, 16])
        if "verify" in kernels and min(contexts) < max(q_lens):
            raise DSparkError(f"--context {min(contexts)} is shorter than --q-len {max(q_lens)} (the context "
                              "counts the new tokens)")
        if args.impl:
            impls = list(dict.fromkeys(args.impl))
        elif backend == "cpu":
            impls = ["reference", "tpu", "gpu", "shipped"] if args.interpret else ["reference"]
        else:
            impls = ["reference", "kernel", "shipped"]
        if "reference" in impls:  # measured first: the others are checked against its output
            impls.remove("reference")
            impls.insert(0, "reference")
        dtype = args.dtype or ("bfloat16" if accel else "float32")
        device = jax.devices()[0]
        mem = (getattr(device, "memory_stats", lambda: None)() or {}).get("bytes_limit")
        max_pool = (args.max_pool_gib * 2**30 if args.max_pool_gib is not None
                    else 0.4 * mem if mem else 2 * 2**30 if backend == "cpu" else 16 * 2**30)
        probe = int((args.hbm_gib or (1.0 if accel else 0.25)) * 2**30)
        hbm = bench.measure_hbm_bandwidth(probe)
        shapes = [bench.Shape(kernel=k, batch=b, context=c, q_len=t, heads=args.heads, kv_heads=args.kv_heads,
                              head_dim=args.head_dim, page_size=args.page_size, dtype=dtype)
                  for k in kernels for b in batches for c in contexts for t in q_lens]
        rows = []
        with tqdm(total=len(shapes) * len(impls), desc="bench_kernels", unit="run", disable=args.json) as bar:
            for row in bench.run(shapes, impls, interpret=args.interpret, warmup=args.warmup,
                                 repeats=args.repeats, hbm_bytes_per_s=hbm, max_pool_bytes=max_pool,
                                 progress=bar.update):
                rows.append(row)
        if args.json:
            for r in rows:
                print(json.dumps({**dataclasses.asdict(r), "device": device.device_kind, "backend": backend,
                                  "jax": jax.__version__, "dtype": dtype, "hbm_gb_per_s": hbm / 1e9,
                                  "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                                  "page_size": args.page_size}))
        else:
            title = (f"{device.device_kind} ({backend}, jax {jax.__version__}), {dtype}, Hq {args.heads} / "
                     f"Hkv {args.kv_heads} / D {args.head_dim}, page {args.page_size}; measured HBM copy "
                     f"bandwidth {hbm / 1e9:.1f} GB/s")
            print(bench.markdown(rows, title))


if __name__ == "__main__":
    main()
