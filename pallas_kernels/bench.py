"""Timing harness for the paged attention kernels (the CLI is serve/bench_kernels.py).

Every measurement: one fragmented page pool per (kernel, batch, context), each
implementation called once to compile (and compared with the reference output when the
reference ran), then the median of `repeats` timed calls with `block_until_ready`.
Achieved bandwidth = bytes of K/V the attention must read (whole pages up to each
sequence's length, K and V) / time, set against the device's HBM bandwidth measured in
the same run with a large on-device copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.block_attention import block_attention
from pallas_kernels.verify_attention import verify_attention

KERNELS = ("verify", "block")
IMPLS = ("reference", "kernel", "tpu", "gpu", "shipped")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    kernel: str          # "verify" (target, q_len = 1 + gamma) or "block" (drafter, q_len = block size)
    batch: int
    context: int         # kv_len (verify: including the q_len new tokens) or ctx_len (block)
    q_len: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"

    @property
    def pages_per_seq(self) -> int:
        return -(-self.context // self.page_size)

    @property
    def kv_bytes(self) -> int:
        """K and V bytes the attention reads: whole pages up to each sequence's length."""
        item = jnp.dtype(self.dtype).itemsize
        return 2 * self.batch * self.pages_per_seq * self.page_size * self.kv_heads * self.head_dim * item

    @property
    def reference_bytes(self) -> int:
        """Rough peak extra memory of the jnp reference: gathered K/V copy + f32 logits/probs."""
        s = self.pages_per_seq * self.page_size
        keys = s + (self.q_len if self.kernel == "block" else 0)
        return self.kv_bytes + 3 * 4 * self.batch * self.heads * self.q_len * keys

    @property
    def pool_bytes(self) -> int:
        return self.kv_bytes + 2 * self.page_size * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass
class Row:
    kernel: str
    impl: str
    batch: int
    context: int
    q_len: int
    time_ms: float | None = None
    kv_gb_per_s: float | None = None
    hbm_fraction: float | None = None
    vs_decode: float | None = None     # time(q_len) / time(q_len == 1), same impl, batch and context
    max_abs_err: float | None = None   # against the reference output, when it ran
    note: str = ""


def measure_hbm_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a large on-device elementwise copy (reads and writes nbytes each)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = time_call(f, (x,), warmup=1, repeats=repeats)
    return 2 * x.size * 4 / t


def time_call(fn: Callable, args: tuple, *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pseudo_random(shape: tuple[int, ...], salt: float, dtype) -> jax.Array:
    """Cheap deterministic values in [-1, 1) (sin-hash): compiles in milliseconds, unlike
    jax.random on CPU, and the timing does not care about the distribution."""
    i = lax.iota(jnp.float32, math.prod(shape)).reshape(shape)
    x = jnp.sin(i * 12.9898 + salt) * 43758.5453
    return (2.0 * (x - jnp.floor(x)) - 1.0).astype(dtype)


def make_inputs(shape: Shape, seed: int = 0) -> dict:
    """A pool of batch * pages_per_seq pages + the NULL page 0, handed out in random order."""
    b, pps = shape.batch, shape.pages_per_seq
    num_pages = b * pps + 1
    table = np.random.default_rng(seed).permutation(num_pages - 1).reshape(b, pps).astype(np.int32) + 1
    return dict(_device_inputs(shape, seed), page_table=jnp.asarray(table),
                lens=jnp.full((b,), shape.context, jnp.int32), q_lens=jnp.full((b,), shape.q_len, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per shape, not one per op
def _device_inputs(shape: Shape, seed: int) -> dict:
    dt = jnp.dtype(shape.dtype)
    b = shape.batch
    pool = (shape.kv_heads, b * shape.pages_per_seq + 1, shape.page_size, shape.head_dim)
    out = dict(k_pages=_pseudo_random(pool, seed + 0.1, dt), v_pages=_pseudo_random(pool, seed + 0.2, dt),
               q=_pseudo_random((b, shape.q_len, shape.heads, shape.head_dim), seed + 0.3, dt))
    if shape.kernel == "block":
        blk = (b, shape.q_len, shape.kv_heads, shape.head_dim)
        out.update(k_blk=_pseudo_random(blk, seed + 0.4, dt), v_blk=_pseudo_random(blk, seed + 0.5, dt))
    return out


def _kernel_for_backend() -> str | None:
    return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend())


def label(impl: str, shape: Shape) -> str:
    """Row name: "kernel" shows which variant it resolved to, "shipped" which JAX kernel."""
    backend = jax.default_backend()
    if impl == "kernel":
        return f"kernel:{_kernel_for_backend() or 'tpu'}"
    if impl == "shipped" and shape.kernel == "verify":
        ragged = backend == "tpu" or (backend == "cpu" and shape.q_len > 1)
        return "shipped:ragged_paged" if ragged else "shipped:paged_decode"
    return impl


def implementation(shape: Shape, impl: str, interpret: bool) -> Callable | str:
    """A callable inputs -> output, or a one-line reason why `impl` does not apply here.

    The callables dispatch straight into a jitted function (no eager ops in the timed call).
    """
    scale = shape.head_dim ** -0.5
    backend = jax.default_backend()
    if impl == "kernel":
        impl = _kernel_for_backend() or "tpu"
        if backend == "cpu" and not interpret:
            return "n/a on cpu: the Pallas kernels run only interpreted here (pass --interpret)"
    if impl in ("tpu", "gpu") and backend != impl and not interpret:
        return f"n/a on {backend}: the {impl} kernel needs --interpret here"
    if impl in ("reference", "tpu", "gpu"):
        interp = backend != impl and impl != "reference"
        if shape.kernel == "verify":
            def run(x):
                return verify_attention(x["q"], x["k_pages"], x["v_pages"], x["lens"], x["q_lens"],
                                        x["page_table"], sm_scale=scale, impl=impl, interpret=interp)
        else:
            def run(x):
                return block_attention(x["q"], x["k_pages"], x["v_pages"], x["lens"], x["page_table"],
                                       x["k_blk"], x["v_blk"], sm_scale=scale, impl=impl, interpret=interp)
        return run  # verify_attention / block_attention are jitted
    if impl == "shipped":
        return _shipped(shape, scale, interpret)
    raise ValueError(f"unknown impl {impl!r}")


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _shipped(shape: Shape, scale: float, interpret: bool) -> Callable | str:
    """JAX's own Pallas kernels where they cover the case (see ../shared/docs/pallas-notes.md)."""
    backend = jax.default_backend()
    if shape.kernel == "block":
        return "n/a: no shipped kernel covers paged context + bidirectional block"
    if backend == "cpu" and not interpret:
        return "n/a on cpu: shipped kernels run only interpreted here (pass --interpret)"
    if backend == "tpu" or (backend == "cpu" and shape.q_len > 1):
        # ragged_paged_attention: q [tokens, Hq, D], K/V interleaved per head in one pool.
        try:
            from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
        except ImportError as e:
            return f"n/a: ragged_paged_attention not importable ({e})"
        b, t = shape.batch, shape.q_len
        ppb = _divisor_at_most(shape.pages_per_seq, max(1, 128 // shape.page_size))

        def run(x):
            k, v = x["k_pages"], x["v_pages"]
            hkv, p, page, d = k.shape
            kv = jnp.stack([k, v], axis=3).transpose(1, 2, 0, 3, 4).reshape(p, page, 2 * hkv, d)
            cu = jnp.arange(b + 1, dtype=jnp.int32) * t
            o = ragged_paged_attention(x["q"].reshape(b * t, shape.heads, d), kv, x["lens"], x["page_table"], cu,
                                       jnp.array([b], jnp.int32), sm_scale=scale, num_kv_pages_per_block=ppb,
                                       num_queries_per_block=min(16, b * t) if backend == "cpu" else None)
            return o.reshape(b, t, shape.heads, d)
        # The K/V interleave is part of the timed call: a serving stack using this kernel
        # would keep its pool in that layout instead (so this slightly overstates its cost).
        if backend == "cpu":  # jax 0.10.2: fails in the interpreter; the row then says why
            from jax.experimental.pallas import tpu as pltpu

            def run_interpreted(x, run=run):
                with pltpu.force_tpu_interpret_mode():
                    return run(x)
            return run_interpreted
        return jax.jit(run)
    if shape.q_len != 1:
        return "n/a on gpu: the shipped paged kernel is decode-only (q_len 1)"
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except ImportError as e:
        return f"n/a: gpu paged_attention not importable ({e})"
    splits = _divisor_at_most(shape.pages_per_seq, 16)
    per_block = _divisor_at_most(shape.pages_per_seq // splits, 8)

    def run(x):
        q = (x["q"][:, 0] * scale).astype(x["q"].dtype)   # this kernel has no sm_scale argument
        o = paged_attention(q, x["k_pages"], x["v_pages"], x["page_table"], x["lens"], k_splits=splits,
                            pages_per_compute_block=per_block, interpret=backend == "cpu")
        return o[:, None]
    return jax.jit(run)


def run(shapes: list[Shape], impls: list[str], *, interpret: bool, warmup: int, repeats: int,
        hbm_bytes_per_s: float | None, max_pool_bytes: int, progress: Callable[[], None] = lambda: None
        ) -> Iterator[Row]:
    """Measure every shape x impl; yields rows (skipped ones carry a note)."""
    decode_ms: dict[tuple, float] = {}
    for shape in shapes:
        key = (shape.kernel, shape.batch, shape.context)
        if shape.pool_bytes > max_pool_bytes:
            for impl in impls:
                progress()
                yield Row(shape.kernel, label(impl, shape), shape.batch, shape.context, shape.q_len,
                          note=f"skipped: pool of {shape.pool_bytes / 2**30:.1f} GiB over the memory limit")
            continue
        x = make_inputs(shape)
        want = None
        for impl in impls:
            row = Row(shape.kernel, label(impl, shape), shape.batch, shape.context, shape.q_len)
            fn = implementation(shape, impl, interpret)
            if impl == "reference" and shape.pool_bytes + shape.reference_bytes > max_pool_bytes:
                row.note = (f"skipped: the reference would need {shape.reference_bytes / 2**30:.1f} GiB more "
                            "than the pool (over the memory limit)")
            elif isinstance(fn, str):
                row.note = fn
            else:
                try:
                    got = jax.block_until_ready(fn(x))
                    if impl == "reference":
                        want = got
                    elif want is not None:
                        row.max_abs_err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
                    t = time_call(fn, (x,), warmup=max(warmup - 1, 0), repeats=repeats)
                except Exception as e:  # noqa: BLE001 - report per row, keep the sweep going
                    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                    row.note = f"failed on jax {jax.__version__}: {lines[-1][:160]}"
                else:
                    row.time_ms = t * 1e3
                    row.kv_gb_per_s = shape.kv_bytes / t / 1e9
                    if hbm_bytes_per_s:
                        row.hbm_fraction = shape.kv_bytes / t / hbm_bytes_per_s
                    if shape.q_len == 1:
                        decode_ms[key + (impl,)] = row.time_ms
                    elif key + (impl,) in decode_ms:
                        row.vs_decode = row.time_ms / decode_ms[key + (impl,)]
            progress()
            yield row


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(rows: list[Row], title: str) -> str:
    head = ("| kernel | impl | batch | context | q_len | time (ms) | K/V GB/s | % HBM | vs q_len 1 | max err | note |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [f"### {title}", "", head]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.impl} | {r.batch} | {r.context} | {r.q_len} | {_fmt(r.time_ms, '.3f')} | "
                     f"{_fmt(r.kv_gb_per_s, '.1f')} | {_fmt(r.hbm_fraction and 100 * r.hbm_fraction, '.1f')} | "
                     f"{_fmt(r.vs_decode, '.2f')} | {_fmt(r.max_abs_err, '.1e')} | {r.note} |")
    return "\n".join(lines)
