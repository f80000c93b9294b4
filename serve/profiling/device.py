"""The device side of profiling: host/backend facts, memory, timing of compiled calls, and
the measured bandwidth / matmul rates the roofline uses."""

from __future__ import annotations

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

from serve.profiling import roofline as rl


MIN_TIMED_S = 0.5     # fast calls are repeated until this much time is timed (at most MAX_REPEATS)
MAX_REPEATS = 100


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
