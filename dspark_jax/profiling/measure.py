"""What `python -m serve.profile` measures, on whatever backend JAX runs on.

For one target + block-drafter pair (a loaded pair, or a preset's full-size shapes with
random weights) it measures, in priority order so that an interrupted or time-limited
run keeps the most useful numbers:

1. calibration: memory bandwidth (a large on-device copy, and a read-only reduction)
   and matmul throughput (a large matmul in the run dtype): the roofline's two rates;
2. per (context, batch) cell: plain decode (q_len 1, no taps), verification at
   q_len 1 + gamma (with the drafter's taps), the drafter (parallel pass, sequential
   head, context ingest), then verification at the other query lengths;
3. SPS(B): steps/s of the packed verification pass at token budgets B;
4. prefill throughput.

Every pass is compiled ahead of time (`jit(...).lower(...).compile()`, so compile time
is measured on its own), run `warmup` times, then timed `repeats` times with
`block_until_ready`; the record keeps the median and every sample. Before allocating a
cell's caches an analytic estimate is checked against free memory (cells that do not
fit are scaled down to the largest batch that does, or skipped); after compiling,
XLA's own memory analysis is checked too. A failure inside one measurement is recorded
under `skipped` and the sweep goes on. The profile file is rewritten after every record.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import resource
import socket
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.errors import DSparkError
from dspark_jax.profiling import roofline as rl
from dspark_jax.profiling.schema import (DrafterRecord, PrefillRecord, Profile, Skipped, SpsRecord, StepRecord,
                                         write_profile)

DEFAULT_BATCHES = (1, 8, 64, 256)
DEFAULT_CONTEXTS = (512, 4096, 32768)
QUICK_BATCHES = (1, 8)
QUICK_CONTEXTS = (512,)
PRESET_NAMES = ("qwen3-4b", "qwen3-8b", "qwen3-14b", "gemma4-12b", "qwen3-tiny", "gemma4-tiny")
# The DSpark drafter of configs/dspark_qwen3_4b.py: what a random drafter for a preset looks like.
DRAFT_LAYERS, DRAFT_RANK = 5, 256
MIN_TIMED_S = 0.5     # fast calls are repeated until this much time is timed (at most MAX_REPEATS)
MAX_REPEATS = 100


@dataclasses.dataclass
class Settings:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    gamma: int
    q_lens: tuple[int, ...]           # verification query lengths (1 .. 1 + gamma)
    prefill_lens: tuple[int, ...]
    prefill_batch: int = 1
    sps_slots: tuple[int, ...] = ()   # () = the largest batch measured at the first context
    sps_budgets: tuple[int, ...] = ()  # () = powers of two up to slots x (1 + gamma)
    warmup: int = 2
    repeats: int = 10
    quick: bool = False
    time_budget_s: float | None = None
    memory_fraction: float = 0.85     # of the free memory a measurement may plan to use
    min_timed_s: float = MIN_TIMED_S  # fast calls repeat until this much time is timed


def resolve_settings(*, gamma: int, batches=None, contexts=None, q_lens=None, prefill_lens=None,
                     quick: bool = False, warmup=None, repeats=None, sps_slots=None, sps_budgets=None,
                     time_budget_s=None, max_positions: int | None = None) -> Settings:
    """Fill what the flags left out from the full or `--quick` defaults, and check it."""
    if gamma < 1:
        raise DSparkError(f"--gamma must be >= 1; got {gamma}")
    batches = tuple(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES))
    contexts = tuple(contexts or (QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS))
    if q_lens is None:
        q_lens = sorted({1, 2, 1 + (gamma + 1) // 2, 1 + gamma}) if quick else range(1, gamma + 2)
    q_lens = tuple(sorted(set(int(q) for q in q_lens)))
    for name, vals, lo in (("--batch", batches, 1), ("--context", contexts, 2), ("--q-len", q_lens, 1)):
        if not vals or any(v < lo for v in vals):
            raise DSparkError(f"{name} values must be >= {lo}; got {list(vals)}")
    if max(q_lens) > 1 + gamma:
        raise DSparkError(f"--q-len {max(q_lens)} is above 1 + gamma = {1 + gamma}")
    if max_positions is not None:
        too_long = [c for c in contexts if c > max_positions]
        if too_long:
            raise DSparkError(f"--context {too_long} exceeds the model's {max_positions} positions")
    for name, vals in (("--sps-slots", sps_slots or ()), ("--sps-budgets", sps_budgets or ()),
                       ("--prefill-len", prefill_lens or ())):
        if any(v < 1 for v in vals):
            raise DSparkError(f"{name} values must be >= 1; got {list(vals)}")
    if prefill_lens is None:
        prefill_lens = (min(min(contexts), 128),) if quick else tuple(c for c in contexts if c <= 8192) or \
            (min(contexts),)
    return Settings(batches=tuple(sorted(set(batches))), contexts=tuple(sorted(set(contexts))), gamma=gamma,
                    q_lens=q_lens, prefill_lens=tuple(sorted(set(prefill_lens))),
                    sps_slots=tuple(sps_slots or ()), sps_budgets=tuple(sps_budgets or ()),
                    warmup=warmup if warmup is not None else (1 if quick else 2),
                    repeats=repeats if repeats is not None else (3 if quick else 10),
                    quick=quick, time_budget_s=time_budget_s, min_timed_s=0.2 if quick else MIN_TIMED_S)


# ----------------------------------------------------------------------------- environment

def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_info() -> dict:
    total = _meminfo("MemTotal")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    return {"hostname": socket.gethostname(), "os": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "memory_bytes": total,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def device_memory(devices) -> tuple[int | None, str]:
    """(bytes limit of one device, where the number comes from)."""
    stats = _stats(devices[0])
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device.memory_stats()['bytes_limit']"
    avail = _meminfo("MemAvailable")
    return avail, "host MemAvailable (/proc/meminfo) at start: CPU devices share host memory"


def free_memory(devices) -> int | None:
    """Bytes one more allocation may use now (the tightest device of the mesh)."""
    free = []
    for d in devices:
        s = _stats(d)
        if s and s.get("bytes_limit"):
            free.append(int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)))
    if free:
        return min(free)
    return _meminfo("MemAvailable")


def _stats(device) -> dict | None:
    try:
        return device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def peak_memory(devices) -> dict:
    peaks = [int(s["peak_bytes_in_use"]) for s in map(_stats, devices) if s and "peak_bytes_in_use" in s]
    if peaks:
        return {"peak_bytes": max(peaks), "source": "device.memory_stats()['peak_bytes_in_use'] (max over devices)",
                "note": "includes the weights, caches and XLA temporaries of every measurement"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)
    return {"peak_bytes": int(rss), "source": "process peak RSS (getrusage ru_maxrss): no device memory stats "
            "on this backend (CPU)", "note": "host memory of the whole process: weights, caches, XLA buffers "
            "and the Python runtime"}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def backend_info(mesh) -> dict:
    import jaxlib

    devs = list(mesh.devices.flat)
    limit, source = device_memory(devs)
    desc = devs[0].device_kind
    if devs[0].platform == "cpu":
        desc = f"{_cpu_model() or 'CPU'} ({os.cpu_count()} cores)"
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "device_description": desc,
            "device_count": jax.device_count(), "devices_used": len(devs),
            "process_count": jax.process_count(), "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "memory_limit_bytes": limit, "memory_limit_source": source}


# ----------------------------------------------------------------------------- timing

def time_compiled(fn: Callable, args: list, *, warmup: int, repeats: int, carry: int | None = None,
                  min_total_s: float = MIN_TIMED_S) -> list[float]:
    """Seconds of each timed call: `warmup` untimed calls, then at least `repeats` timed
    ones, more for fast calls (until `min_total_s` is timed; at most MAX_REPEATS) so that
    the median of a sub-millisecond step survives a busy machine. `carry` = index of a
    donated argument that the call returns as the second element of its output (a
    cache), fed back to the next call."""
    args = list(args)
    times: list[float] = []
    i = 0
    while True:
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if carry is not None:
            args[carry] = out[1]
        del out
        i += 1
        if i > warmup:
            times.append(dt)
            enough = len(times) >= max(repeats, 1)
            if enough and (sum(times) >= min_total_s or len(times) >= max(MAX_REPEATS, repeats)):
                return times


def compile_fn(fn: Callable, args: list, donate: tuple[int, ...] = ()):
    """(compiled, lower + compile seconds, memory analysis dict or None, cost dict or None)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    secs = time.perf_counter() - t0
    mem = cost = None
    try:
        m = compiled.memory_analysis()
        if m is not None:
            mem = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
                   "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    except Exception:  # noqa: BLE001
        pass
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        if c:
            cost = {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}
    except Exception:  # noqa: BLE001
        pass
    return compiled, secs, mem, cost


def _peak(mem: dict | None) -> int | None:
    if mem is None:
        return None
    return mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]


# ----------------------------------------------------------------------------- calibration

def _pseudo_random(shape, salt: int, dtype, scale: float = 0.02):
    """Cheap deterministic values in scale x [-1, 1): an integer hash of the index
    (compiles and runs in a blink even for a 150k x 2560 table, unlike jax.random on CPU)."""
    n = math.prod(shape)
    salt = jnp.asarray(salt, jnp.uint32) * jnp.uint32(0x9E3779B1)
    i = jax.lax.iota(jnp.uint32, n) + salt
    h = i * jnp.uint32(0x9E3779B1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x85EBCA77)
    h = h ^ (h >> 13)
    x = (h >> 8).astype(jnp.float32) * (2.0 / 2 ** 24) - 1.0
    return (scale * x).reshape(shape).astype(dtype)


def calibrate(dtype: str, free_bytes: int | None, platform_name: str, repeats: int = 5) -> dict:
    """Memory bandwidth and matmul throughput measured here, in the run dtype for the matmul."""
    gib = 2 ** 30
    cap = (2 * gib) if platform_name != "cpu" else gib // 2
    if repeats <= 3:  # --quick
        cap //= 4
    nbytes = int(min(cap, max(64 * 2 ** 20, (free_bytes or 4 * gib) // 16)))
    n = nbytes // 4
    x = jax.jit(lambda: _pseudo_random((n,), 7, jnp.float32, 1.0))()
    copy = jax.jit(lambda a: a * 1.5 + 1.0)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t_copy = statistics.median(time_compiled(copy, [x], warmup=1, repeats=repeats))
    t_read = statistics.median(time_compiled(total, [x], warmup=1, repeats=repeats))
    del x
    copy_bw, read_bw = 2 * nbytes / t_copy, nbytes / t_read
    dt = rl.dtype_of(dtype)
    sizes, best = [], None
    size = 1024 if platform_name == "cpu" else 4096
    limit = 4096 if platform_name == "cpu" else 16384
    while True:
        a = jax.jit(lambda s=size: _pseudo_random((s, s), 1, dt, 1.0))()
        b = jax.jit(lambda s=size: _pseudo_random((s, s), 2, dt, 1.0))()
        mm = jax.jit(lambda p, q: p @ q)
        t = statistics.median(time_compiled(mm, [a, b], warmup=1, repeats=repeats))
        rate = 2 * size ** 3 / t
        sizes.append({"n": size, "seconds": t, "flops_per_s": rate})
        if best is None or rate > best["flops_per_s"]:
            best = sizes[-1]
        del a, b
        if t > 0.05 or size >= limit:
            break
        size *= 2
    return {
        "memory_bandwidth": {
            "bytes_per_s": max(copy_bw, read_bw), "array_bytes": nbytes,
            "copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw,
            "method": "max of a jitted elementwise copy (y = 1.5 x + 1, float32: reads and writes the array) "
                      "and a jitted float32 sum (reads it), median of the timed calls"},
        "matmul": {"flops_per_s": best["flops_per_s"], "n": best["n"], "dtype": dtype, "sizes": sizes,
                   "method": "jitted n x n @ n x n in the run dtype (2 n^3 FLOPs), n doubled until one "
                             "call takes 50 ms; the best rate"},
    }


# ----------------------------------------------------------------------------- models

@dataclasses.dataclass
class Pair:
    tcfg: object
    tparams: object
    drafter: object   # BlockDrafter
    dparams: object
    meta: dict        # run-level facts (source, paths, names, random_weights ...)


def preset_config(name: str, dtype: str):
    from dspark_jax import config as qcfg
    from dspark_jax import config_gemma4 as gcfg

    table = {"qwen3-4b": qcfg.qwen3_4b, "qwen3-8b": qcfg.qwen3_8b, "qwen3-14b": qcfg.qwen3_14b,
             "qwen3-tiny": qcfg.qwen3_tiny, "gemma4-12b": gcfg.gemma4_12b, "gemma4-tiny": gcfg.gemma4_tiny}
    if name not in table:
        raise DSparkError(f"unknown preset '{name}'; choose one of {', '.join(PRESET_NAMES)}")
    return table[name](dtype=dtype)


def default_taps(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` target layers spread over 1 .. L-3 (Qwen3-4B: 1, 9, 17, 25, 33)."""
    lo, hi = (1, num_layers - 3) if num_layers >= 6 else (0, max(num_layers - 2, 0))
    if count <= 1 or hi <= lo:
        return (lo,)
    return tuple(sorted({int(round(lo + (hi - lo) * k / (count - 1))) for k in range(count)}))


def random_drafter(tcfg, gamma: int, layers: int | None = None, seed: int = 1, mesh=None):
    """A DSpark drafter with random weights shaped like the Qwen3-4B recipe (5 layers,
    5 taps, block 7, Markov rank 256, confidence head); 1 layer / 2 taps below 12 layers."""
    drafter = drafter_for(tcfg, gamma, layers)
    shapes, axes = drafter.param_shapes_and_axes()
    return drafter, random_tree(shapes, axes, mesh, seed)


def drafter_for(tcfg, gamma: int, layers: int | None = None):
    """The BlockDrafter (no parameters) that `random_drafter` fills with random weights."""
    from dspark_jax.config import Qwen3Config
    from dspark_jax.drafters.config import DrafterConfig
    from dspark_jax.drafters.dspark import BlockDrafter

    big = tcfg.num_hidden_layers >= 12
    layers = layers or (DRAFT_LAYERS if big else 1)
    if isinstance(tcfg, Qwen3Config):
        arch = tcfg.replace(num_hidden_layers=layers)
    else:  # Gemma 4: Qwen3-shaped draft layers over the target's width and vocabulary
        arch = Qwen3Config(vocab_size=tcfg.vocab_size, hidden_size=tcfg.hidden_size,
                           intermediate_size=tcfg.intermediate_size, num_hidden_layers=layers,
                           num_attention_heads=tcfg.num_attention_heads,
                           num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
                           max_position_embeddings=tcfg.max_position_embeddings, dtype=tcfg.dtype)
    cfg = DrafterConfig(arch=arch, target_layer_ids=default_taps(tcfg.num_hidden_layers, 5 if big else 2),
                        block_size=max(7, gamma), mask_token_id=tcfg.vocab_size - 1,
                        markov_rank=DRAFT_RANK if big else 16, num_target_layers=tcfg.num_hidden_layers)
    return BlockDrafter(cfg, tcfg, gamma)


def random_tree(shapes, axes, mesh, seed: int = 0):
    """Parameters of the given shapes, generated on device already sharded: vectors
    (norm weights, biases) are ones, matrices small pseudo-random values. One compiled
    generator per distinct (shape, dtype, sharding); the salt is a runtime argument."""
    from dspark_jax import mesh as mesh_lib

    leaves, treedef = jax.tree.flatten(shapes)
    shardings = jax.tree.leaves(mesh_lib.tree_shardings(axes, shapes, mesh)) if mesh is not None else \
        [None] * len(leaves)
    makers: dict = {}
    out = []
    for i, (s, sh) in enumerate(zip(leaves, shardings)):
        key = (tuple(s.shape), np.dtype(s.dtype).name, sh)
        if key not in makers:
            def make(salt, shape=tuple(s.shape), dtype=s.dtype):
                if len(shape) <= 1:
                    return jnp.ones(shape, dtype)
                return _pseudo_random(shape, salt, dtype)
            makers[key] = jax.jit(make, out_shardings=sh)
        out.append(makers[key](jnp.uint32((seed * 7919 + i) & 0xFFFFFFFF)))
    return jax.tree.unflatten(treedef, out)


def load_pair(*, target_dir: str | None, draft_dir: str | None, preset: str | None, dtype: str | None,
              gamma: int | None, mesh, draft_layers: int | None = None) -> Pair:
    """The pair to profile: bundled (default), folders, or a preset with random weights."""
    from dspark_jax import drafters
    from dspark_jax.drafters.dspark import BlockDrafter
    from dspark_jax.serving import BUNDLED_DIR, bundled_folder

    meta = {"preset": preset, "target_path": target_dir, "draft_path": draft_dir, "random_weights": False,
            "random_drafter": False}
    if preset is not None:
        if target_dir or draft_dir:
            raise DSparkError("--preset takes random weights: drop --target / --draft, or drop --preset")
        tcfg = preset_config(preset, dtype or "bfloat16")
        shapes, axes = target.param_shapes_and_axes(tcfg)
        tparams = None  # generated after the memory check (run_profile)
        meta.update(source="preset", model_name=preset, random_weights=True, random_drafter=True,
                    target_shapes=(shapes, axes))
        g = gamma or 7
        drafter, dparams = None, None
        return Pair(tcfg, tparams, drafter, {"gamma": g, "layers": draft_layers}, meta)
    source = "folders"
    if target_dir is None:
        target_dir, source = bundled_folder("target"), "bundled"
        if target_dir is None:
            raise DSparkError(f"no bundled pair at {BUNDLED_DIR}: pass --target DIR [--draft DIR] or --preset NAME")
        draft_dir = draft_dir or bundled_folder("dspark")
    tcfg, tparams = target.load(target_dir, dtype)
    tparams = target.shard(tcfg, tparams, mesh)
    meta.update(source=source, target_path=target_dir, draft_path=draft_dir,
                model_name=os.path.basename(os.path.normpath(target_dir)))
    if draft_dir is None:
        drafter, dparams = random_drafter(tcfg, gamma or 7, draft_layers, mesh=mesh)
        meta["random_drafter"] = True
    else:
        held_gamma = gamma
        if held_gamma is None:  # default 7, capped at the drafter's block size
            from dspark_jax import checkpoints

            held_gamma = min(7, int(checkpoints.read_config(draft_dir).get("block_size", 7)))
        drafter, dparams = drafters.load(draft_dir, tcfg, gamma=held_gamma, dtype=dtype)
        if not isinstance(drafter, BlockDrafter):
            raise DSparkError(f"{draft_dir}: serve.profile measures block drafters (DSpark / DFlash); "
                              f"this folder holds a {drafter.kind} drafter")
        dparams = drafter.shard(dparams, mesh)
    return Pair(tcfg, tparams, drafter, dparams, meta)


def model_meta(tcfg, drafter, name: str) -> dict:
    def cfg_dict(c):
        d = dataclasses.asdict(c)
        return json_safe(d)

    shapes, _ = target.param_shapes_and_axes(tcfg)
    n_t = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    item = rl.itemsize(tcfg.dtype)
    out = {"target": {"type": type(tcfg).__name__, "name": name, "config": cfg_dict(tcfg), "num_params": n_t,
                      "weight_bytes": n_t * item}}
    if drafter is not None:
        dshapes, _ = drafter.param_shapes_and_axes()
        n_d = sum(math.prod(s.shape) for s in jax.tree.leaves(dshapes))
        dcfg = cfg_dict(drafter.cfg)
        out["drafter"] = {"kind": drafter.kind, "gamma": drafter.gamma, "block_size": drafter.cfg.block_size,
                          "tap_layers": list(drafter.tap_layers), "config": dcfg, "num_params": n_d,
                          "weight_bytes": n_d * rl.itemsize(drafter.cfg.arch.dtype),
                          "sts_temperatures": list(drafter.sts_temperatures) if drafter.sts_temperatures else None}
    return out


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the profiler

class OutOfTime(Exception):
    pass


class Profiler:
    """Runs the sweep for one pair and keeps the profile file current."""

    def __init__(self, pair: Pair, settings: Settings, mesh, out_path: str | None, command: list[str],
                 progress: Callable[[str], None] = lambda _: None, log: Callable[[str], None] = lambda _: None):
        self.pair, self.s, self.mesh, self.out_path = pair, settings, mesh, out_path
        self.progress, self.log = progress, log
        self.devices = list(mesh.devices.flat)
        self.data, self.model = mesh.devices.shape
        self.t_start = time.perf_counter()
        run = {"mesh": f"{self.data}x{self.model}", "dtype": pair.tcfg.dtype, "gamma": settings.gamma,
               "batches": list(settings.batches), "contexts": list(settings.contexts),
               "q_lens": list(settings.q_lens), "prefill_lens": list(settings.prefill_lens),
               "prefill_batch": settings.prefill_batch, "quick": settings.quick, "warmup": settings.warmup,
               "repeats": settings.repeats, "min_timed_s": settings.min_timed_s,
               "time_budget_s": settings.time_budget_s}
        run.update({k: v for k, v in pair.meta.items() if k != "target_shapes"})
        self.profile = Profile(created=now_iso(), command=list(command), host=host_info(),
                               backend=backend_info(mesh), run=run, models={})
        self.cost = rl.target_cost(pair.tcfg)
        self.bw = self.fs = 0.0

    # ---------------------------------------------------------------- bookkeeping
    def save(self):
        if self.out_path:
            self.profile.memory = peak_memory(self.devices)
            write_profile(self.out_path, self.profile)

    def skip(self, what: str, reason: str, batch=None, context=None, q_len=None):
        self.profile.skipped.append(Skipped(what=what, reason=reason, batch=batch, context=context, q_len=q_len))
        self.log(f"skipped {what} (batch {batch}, context {context}, q_len {q_len}): {reason}")
        self.save()

    def check_time(self):
        if self.s.time_budget_s is not None and time.perf_counter() - self.t_start > self.s.time_budget_s:
            raise OutOfTime()

    def free(self) -> int:
        f = free_memory(self.devices)
        return int(f * self.s.memory_fraction) if f is not None else 1 << 62

    def _roof(self, seconds: float, nbytes: int, flops: int):
        # data-parallel replicas each stream the (model-sharded) weights; rates add up over devices
        nbytes = nbytes + self.cost.weight_bytes * (self.data - 1)
        n = len(self.devices)
        return rl.roofline(seconds, nbytes, flops, self.bw * n, self.fs * n)

    # ---------------------------------------------------------------- plan
    def plan_size(self) -> int:
        s = self.s
        cells = len(s.batches) * len(s.contexts)
        return 2 + cells * (2 + len(s.q_lens)) + len(self.sps_plan()) + len(s.prefill_lens)

    def sps_plan(self) -> list[tuple[int, int]]:
        s = self.s
        slots = s.sps_slots or (max(s.batches),)
        out = []
        for n in slots:
            budgets = s.sps_budgets or _budgets(n, s.gamma, s.quick)
            out += [(n, b) for b in budgets]
        return out

    # ---------------------------------------------------------------- estimates (bytes)
    def cache_bytes(self, batch: int, context: int) -> int:
        shapes = jax.eval_shape(lambda: target.init_cache(self.pair.tcfg, batch, context))
        return tree_bytes(shapes)

    def dcache_bytes(self, batch: int, context: int) -> int:
        return tree_bytes(jax.eval_shape(lambda: self.pair.drafter.init_cache(batch, context)))

    def step_need(self, batch: int, context: int, q_len: int) -> int:
        t = self.pair.tcfg
        heads = t.num_attention_heads
        tokens = batch * q_len
        act = tokens * (4 * max(t.intermediate_size, t.hidden_size) * 4 + 3 * t.vocab_size * 4)
        scores = 3 * 4 * batch * heads * q_len * context
        return (self.cache_bytes(batch, context) + act + scores) // len(self.devices)

    def cell_need(self, batch: int, context: int) -> int:
        g = self.s.gamma
        return max(self.step_need(batch, context, 1 + g),
                   self.dcache_bytes(batch, context) + self.step_need(batch, context, self.pair.drafter.cfg.block_size)
                   - self.cache_bytes(batch, context) + 3 * 4 * batch * g * self.pair.tcfg.vocab_size)

    # ---------------------------------------------------------------- run
    def run(self):
        pair, s = self.pair, self.s
        try:
            self._prepare()
            self.progress("calibration")
            self.check_time()
            cal = calibrate(pair.tcfg.dtype, free_memory(self.devices), self.devices[0].platform,
                            repeats=3 if s.quick else 5)
            self.profile.calibration = cal
            self.bw, self.fs = cal["memory_bandwidth"]["bytes_per_s"], cal["matmul"]["flops_per_s"]
            self.save()
            self.progress("calibration")
            self._sweep()
            self._sps()
            self._prefill()
            self.profile.status = "complete"
        except OutOfTime:
            self.profile.status = "complete"
            self.skip("rest", f"time budget of {s.time_budget_s:.0f} s used up; later measurements not run")
        except KeyboardInterrupt:
            self.profile.status = "interrupted"
            self.profile.error = "interrupted (KeyboardInterrupt)"
            raise
        except BaseException as e:
            self.profile.status = "failed"
            self.profile.error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            raise
        finally:
            self.profile.finished = now_iso()
            self.save()
        return self.profile

    def _prepare(self):
        """Random weights for presets (after checking they fit) and the model metadata."""
        pair = self.pair
        if pair.tparams is None:
            shapes, axes = pair.meta["target_shapes"]
            spec = pair.dparams
            drafter = drafter_for(pair.tcfg, spec["gamma"], spec["layers"])
            dshapes, daxes = drafter.param_shapes_and_axes()
            free = self.free()
            t_bytes, d_bytes = tree_bytes(shapes) // self.model, tree_bytes(dshapes) // self.model
            self.profile.models = model_meta(pair.tcfg, drafter, pair.meta["model_name"])
            if t_bytes + d_bytes > free:
                msg = (f"the {pair.meta['model_name']} weights ({t_bytes / 2**30:.1f} GiB per device in "
                       f"{pair.tcfg.dtype}, plus {d_bytes / 2**30:.1f} GiB of drafter) do not fit the "
                       f"{free / 2**30:.1f} GiB this device may use; use --mesh 1xN, --draft-layers 1 or a "
                       f"smaller preset")
                self.skip("model", msg)
                raise DSparkError(msg)
            self.log("generating random weights")
            pair.tparams = random_tree(shapes, axes, self.mesh, seed=0)
            pair.drafter, pair.dparams = drafter, random_tree(dshapes, daxes, self.mesh, seed=1)
        if pair.drafter.gamma != self.s.gamma:
            raise DSparkError(f"gamma {self.s.gamma} does not match the drafter's {pair.drafter.gamma}")
        self.profile.models = model_meta(pair.tcfg, pair.drafter, pair.meta["model_name"])
        self.save()

    def _sweep(self):
        s = self.s
        verify_first = 1 + s.gamma
        other_q = [q for q in s.q_lens if q != verify_first]
        for context in s.contexts:
            done_batches = set()
            for batch in s.batches:
                n_items = 2 + len(s.q_lens)
                b = self._fit_batch(batch, context, done_batches)
                if b is None:
                    for _ in range(n_items):
                        self.progress("skip")
                    continue
                done_batches.add(b)
                self._step("decode", b, context, 1)
                if verify_first in s.q_lens:
                    self._step("verify", b, context, verify_first)
                self._drafter(b, context)
                for q in other_q:
                    self._step("verify", b, context, q)

    def _fit_batch(self, batch: int, context: int, done: set) -> int | None:
        free = self.free()
        if self.cell_need(batch, context) <= free:
            return batch
        b = batch
        while b > 1 and self.cell_need(b, context) > free:
            b //= 2
        need = self.cell_need(batch, context)
        if self.cell_need(b, context) <= free and b not in done and b > max(done, default=0):
            self.skip("cell", f"batch {batch} needs about {need / 2**30:.1f} GiB at context {context} "
                      f"(free {free / 2**30:.1f} GiB): scaled down to batch {b}", batch, context)
            return b
        self.skip("cell", f"needs about {need / 2**30:.1f} GiB (caches, logits, attention scores); "
                  f"{free / 2**30:.1f} GiB free", batch, context)
        return None

    def _guard(self, what: str, batch, context, q_len, fn):
        """Run one measurement; failures and late memory refusals become `skipped` entries."""
        self.check_time()
        try:
            fn()
        except (OutOfTime, KeyboardInterrupt):
            raise
        except _TooBig as e:
            self.skip(what, str(e), batch, context, q_len)
        except Exception as e:  # noqa: BLE001 - keep the sweep going, say what failed
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            self.skip(what, ("out of memory: " if oom else f"failed ({type(e).__name__}): ") + lines[0][:240],
                      batch, context, q_len)
        finally:
            self.progress(what)

    def _check_temp(self, mem):
        peak = _peak(mem)
        if mem is not None and mem["temp"] > self.free():
            raise _TooBig(f"XLA needs {mem['temp'] / 2**30:.1f} GiB of temporaries, "
                          f"{self.free() / 2**30:.1f} GiB free")
        return peak

    # ---------------------------------------------------------------- target steps
    def _step(self, kind: str, batch: int, context: int, q_len: int):
        self._guard(kind, batch, context, q_len, lambda: self._step_inner(kind, batch, context, q_len))

    def _step_inner(self, kind, batch, context, q_len):
        pair, s = self.pair, self.s
        tcfg = pair.tcfg
        taps = pair.drafter.tap_layers if kind == "verify" else ()
        if context < q_len + 1:
            raise _TooBig(f"context {context} is shorter than q_len {q_len} + 1")
        cache = target.shard_cache(target.init_cache(tcfg, batch, context), self.mesh)
        lengths = jnp.full((batch,), context - q_len, jnp.int32)
        tokens = jnp.full((batch, q_len), 5, jnp.int32)
        q_lens = jnp.full((batch,), q_len, jnp.int32)

        def fn(params, tokens, q_lens, cache, lengths):
            logits, cache, tapped = target.step(tcfg, params, tokens, q_lens, cache.replace(lengths=lengths), taps)
            return (logits, tapped), cache

        args = [pair.tparams, tokens, q_lens, cache, lengths]
        compiled, csecs, mem, cost = compile_fn(fn, args, donate=(3,))
        peak = self._check_temp(mem)
        times = time_compiled(compiled, args, warmup=s.warmup, repeats=s.repeats, carry=3,
                               min_total_s=s.min_timed_s)
        t = statistics.median(times)
        nbytes, flops = rl.step_cost(self.cost, batch, context, q_len)
        rec = StepRecord(kind=kind, batch=batch, context=context, q_len=q_len, time_ms=t * 1e3,
                         times_ms=[x * 1e3 for x in times], compile_s=csecs,
                         roofline=self._roof(t, nbytes, flops),
                         xla_flops=cost["flops"] if cost else None,
                         xla_bytes_accessed=cost["bytes"] if cost else None, peak_bytes=peak)
        self.profile.steps.append(rec)
        self.log(f"{kind} b{batch} ctx{context} q{q_len}: {rec.time_ms:.2f} ms "
                 f"(floor {rec.roofline.floor_ms:.2f} ms, x{rec.roofline.time_over_floor:.1f}; "
                 f"compile {csecs:.1f} s)")
        self.save()

    # ---------------------------------------------------------------- drafter
    def _drafter(self, batch: int, context: int):
        self._guard("drafter", batch, context, None, lambda: self._drafter_inner(batch, context))

    def _drafter_inner(self, batch, context):
        from dspark_jax.sampling import SamplingParams

        pair, s = self.pair, self.s
        d, tcfg, gamma = pair.drafter, pair.tcfg, s.gamma
        g = d.cfg.block_size
        if context < g + gamma + 2:
            raise _TooBig(f"context {context} is shorter than a drafter block")
        dcache = target.shard_cache(d.init_cache(batch, context), self.mesh)
        start = jnp.full((batch,), context - g - gamma - 1, jnp.int32)
        anchor = jnp.full((batch,), 5, jnp.int32)
        sampling = SamplingParams.make(batch, 0.0)
        keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
        width = len(d.tap_layers) * tcfg.hidden_size
        feats = jnp.zeros((batch, 1 + gamma, width), tcfg.jnp_dtype)
        nxt = jnp.full((batch, 1 + gamma), 5, jnp.int32)
        count = jnp.full((batch,), 1 + gamma, jnp.int32)

        def parallel(dparams, tparams, dcache, anchor, start):
            h = d.block_hidden(dparams, tparams, dcache, anchor, start)[:, :gamma]
            return target.logits(tcfg, tparams, h)

        def propose(dparams, tparams, dcache, anchor, start, sampling, keys):
            return d.propose(dparams, tparams, dcache, anchor, start, sampling, keys)

        def ingest(dparams, tparams, dcache, feats, nxt, start, count):
            lengths = dcache.lengths
            out = d.ingest(dparams, tparams, dcache, feats, nxt, start, count)
            return out.lengths, out.replace(lengths=lengths)

        runs = {}
        compile_s = {}
        peak = None
        for name, fn, args, donate in (
                ("parallel", parallel, [pair.dparams, pair.tparams, dcache, anchor, start], ()),
                ("propose", propose, [pair.dparams, pair.tparams, dcache, anchor, start, sampling, keys], ()),
                ("ingest", ingest, [pair.dparams, pair.tparams, dcache, feats, nxt, start, count], (2,))):
            compiled, csecs, mem, _ = compile_fn(fn, args, donate=donate)
            p = self._check_temp(mem)
            peak = max(peak or 0, p or 0)
            compile_s[name] = csecs
            runs[name] = statistics.median(time_compiled(compiled, args, warmup=s.warmup, repeats=s.repeats,
                                                         carry=2 if donate else None, min_total_s=s.min_timed_s))
            if donate:
                dcache = None
        nbytes, flops = rl.drafter_propose_cost(d, batch, context)
        rec = DrafterRecord(batch=batch, context=context, gamma=gamma, parallel_ms=runs["parallel"] * 1e3,
                            propose_ms=runs["propose"] * 1e3,
                            head_ms=max(runs["propose"] - runs["parallel"], 0.0) * 1e3,
                            ingest_ms=runs["ingest"] * 1e3, compile_s=compile_s,
                            roofline=self._roof(runs["propose"], nbytes, flops))
        self.profile.drafter.append(rec)
        self.log(f"drafter b{batch} ctx{context}: parallel {rec.parallel_ms:.2f} ms, propose {rec.propose_ms:.2f} ms, "
                 f"ingest {rec.ingest_ms:.2f} ms")
        self.save()

    # ---------------------------------------------------------------- SPS(B)
    def _sps(self):
        pair, s = self.pair, self.s
        context = s.contexts[0]
        plan = self.sps_plan()
        if not target.supports_packed(pair.tcfg):
            for slots, b in plan:
                self.progress("sps")
            self.skip("sps", f"{type(pair.tcfg).__name__} has no packed verification pass (SPS needs step_packed)")
            return
        for slots, budget in plan:
            if budget > slots * (1 + s.gamma):
                self.skip("sps", f"budget {budget} is above slots x (1 + gamma) = {slots * (1 + s.gamma)}",
                          slots, context, budget)
                self.progress("sps")
                continue
            if self.step_need(slots, context, 1) + 3 * 4 * budget * pair.tcfg.vocab_size > self.free():
                self.skip("sps", f"{slots} slots at context {context} do not fit", slots, context, budget)
                self.progress("sps")
                continue
            self._guard("sps", slots, context, budget, lambda a=slots, b=budget: self._sps_inner(a, b, context))

    def _sps_inner(self, slots, budget, context):
        pair, s = self.pair, self.s
        tcfg = pair.tcfg
        width = 1 + s.gamma
        cache = target.shard_cache(target.init_cache(tcfg, slots, context), self.mesh)
        lengths = np.full((slots,), max(0, context - width), np.int32)
        cache = cache.replace(lengths=jnp.asarray(lengths))
        i = np.arange(budget)
        rows, cols = i % slots, i // slots
        tokens = jnp.full((budget,), 5, jnp.int32)
        rows_a = jnp.asarray(rows, jnp.int32)
        positions = jnp.asarray(lengths[rows] + cols, jnp.int32)
        valid = jnp.ones((budget,), bool)
        qb = width if budget > slots else None
        taps = pair.drafter.tap_layers

        def fn(params, tokens, rows, positions, valid, cache):
            logits, cache, tapped = target.step_packed(tcfg, params, tokens, rows, positions, valid, cache, taps,
                                                       query_block=qb)
            return (logits, tapped), cache

        args = [pair.tparams, tokens, rows_a, positions, valid, cache]
        compiled, csecs, mem, _ = compile_fn(fn, args, donate=(5,))
        self._check_temp(mem)
        t = statistics.median(time_compiled(compiled, args, warmup=s.warmup, repeats=s.repeats, carry=5,
                                                    min_total_s=s.min_timed_s))
        nbytes, flops = rl.packed_cost(self.cost, slots, budget, context)
        rec = SpsRecord(slots=slots, context=context, budget=budget, time_ms=t * 1e3, sps=1.0 / t,
                        compile_s=csecs, roofline=self._roof(t, nbytes, flops))
        self.profile.sps.append(rec)
        self.log(f"sps slots{slots} B{budget}: {rec.sps:.1f} steps/s")
        self.save()

    # ---------------------------------------------------------------- prefill
    def _prefill(self):
        s = self.s
        b = s.prefill_batch
        for length in s.prefill_lens:
            t = self.pair.tcfg
            need = self.cache_bytes(b, length) + 3 * 4 * b * t.num_attention_heads * length * length + \
                b * length * 4 * (4 * t.intermediate_size + t.hidden_size)
            if need > self.free():
                self.skip("prefill", f"needs about {need / 2**30:.1f} GiB (the jnp attention holds "
                          f"[heads, T, T] scores), {self.free() / 2**30:.1f} GiB free", b, length)
                self.progress("prefill")
                continue
            self._guard("prefill", b, length, None, lambda L=length: self._prefill_inner(b, L))

    def _prefill_inner(self, batch, length):
        pair, s = self.pair, self.s
        tcfg = pair.tcfg
        cache = target.shard_cache(target.init_cache(tcfg, batch, length), self.mesh)
        tokens = jnp.asarray(np.random.default_rng(0).integers(4, tcfg.vocab_size, (batch, length)), jnp.int32)
        lengths = jnp.full((batch,), length, jnp.int32)
        zeros = jnp.zeros((batch,), jnp.int32)
        taps = pair.drafter.tap_layers

        def fn(params, tokens, lengths, cache, zeros):
            last, cache, tapped = target.prefill(tcfg, params, tokens, lengths, cache.replace(lengths=zeros), taps)
            return (last, tapped), cache

        args = [pair.tparams, tokens, lengths, cache, zeros]
        compiled, csecs, mem, _ = compile_fn(fn, args, donate=(3,))
        peak = self._check_temp(mem)
        times = time_compiled(compiled, args, warmup=min(s.warmup, 1), repeats=max(1, s.repeats // 3), carry=3,
                               min_total_s=0.0)
        t = statistics.median(times)
        nbytes, flops = rl.prefill_cost(self.cost, batch, length)
        rec = PrefillRecord(batch=batch, length=length, time_ms=t * 1e3, times_ms=[x * 1e3 for x in times],
                            tokens_per_s=batch * length / t, compile_s=csecs,
                            roofline=self._roof(t, nbytes, flops), peak_bytes=peak)
        self.profile.prefill.append(rec)
        self.log(f"prefill b{batch} T{length}: {rec.tokens_per_s:.0f} tokens/s")
        self.save()


class _TooBig(Exception):
    pass


def _budgets(slots: int, gamma: int, quick: bool) -> tuple[int, ...]:
    full = slots * (1 + gamma)
    if quick:
        return tuple(sorted({1, slots, full}))
    out, b = [], 1
    while b < full:
        out.append(b)
        b *= 2
    return tuple(out) + (full,)
