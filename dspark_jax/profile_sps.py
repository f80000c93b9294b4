"""SPS(B): steps per second of the packed verification pass at a budget of B tokens.

Algorithm 1 and the production variant weigh expected accepted tokens against the cost
of verifying them, Theta = tau* x SPS(B). The engine compiles the verification pass for
a few budget buckets; this module times that pass at every bucket (warm-up first, then
timed repeats with block_until_ready), interpolates step time linearly to every integer
B, and stores the table in a JSON file keyed by everything that changes it: backend,
device kind, model shape, mesh, slots, gamma and cache length. Given the drafter, it
also times one drafting pass over all slots (`draft_seconds`, greedy rows): the fixed
cost of a speculative round that the scheduler's objective charges (scheduler.py).
`load_or_profile` reuses a matching entry and profiles otherwise.

The pass and a drafting pass are not all a round costs: acceptance, the drafter's
ingest and the host's work between rounds come on top. `Engine.profile_rounds` times
the engine's own compiled rounds at every bucket (speculative and plain) and stores
them in the same record under "rounds" (`save_rounds`); an engine that finds them uses
those round rates in its objective and drafting gate instead of the pass-plus-drafting
model.

File layout: {"version": 1, "profiles": {digest: {"key": {...}, "table": {"B": sps},
"sps": [interpolated, index = B], "draft_seconds": float (with a drafter),
"created": unix time, "rounds": {policy: {"spec": {"B": s}, "plain": {"B": s}}}}}}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.errors import DSparkError

VERSION = 1


def default_path() -> str:
    """Where profiles live unless told otherwise ($DSPARK_SPS_FILE overrides)."""
    return os.environ.get("DSPARK_SPS_FILE",
                          os.path.join(os.path.expanduser("~"), ".cache", "dspark_jax", "sps.json"))


def budget_buckets(slots: int, gamma: int) -> tuple[int, ...]:
    """Token-budget buckets: powers of two below slots * (1 + gamma), then that maximum."""
    full = slots * (1 + gamma)
    out, b = [], 1
    while b < full:
        out.append(b)
        b *= 2
    return tuple(out) + (full,)


def profile_key(tcfg, *, slots: int, gamma: int, max_len: int, tap_layers: Sequence[int] = (),
                mesh=None, drafter=None) -> dict:
    """Everything the measured curve depends on, as a JSON-able dict."""
    dev = jax.devices()[0]
    fields = dataclasses.asdict(tcfg) if dataclasses.is_dataclass(tcfg) else {}
    shape_fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "dtype")
    model = {k: fields[k] for k in shape_fields if k in fields}
    model["type"] = type(tcfg).__name__
    key = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
           "mesh": {str(k): int(v) for k, v in mesh.shape.items()} if mesh is not None else {"devices": 1},
           "model": model, "slots": int(slots), "gamma": int(gamma), "max_len": int(max_len),
           "taps": len(tuple(tap_layers))}
    if drafter is not None:
        key["drafter"] = drafter_key(drafter)
    return key


def drafter_key(drafter) -> dict:
    """The drafter facts its drafting time depends on."""
    cfg = getattr(drafter, "cfg", None)
    arch = getattr(cfg, "arch", cfg)
    out = {"type": type(drafter).__name__, "kind": str(getattr(drafter, "kind", "")), "gamma": int(drafter.gamma)}
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "dtype"):
        if hasattr(arch, name):
            out[name] = getattr(arch, name)
    for name in ("markov_rank", "markov_head_type"):
        if hasattr(cfg, name):
            out[name] = getattr(cfg, name)
    return out


def digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _packed_inputs(slots: int, width: int, budget: int, lengths: np.ndarray):
    """`budget` valid tokens spread over the rows like a round verifying them would."""
    i = np.arange(budget)
    rows, cols = i % slots, i // slots
    return (jnp.full((budget,), 5, jnp.int32), jnp.asarray(rows, jnp.int32),
            jnp.asarray(lengths[rows] + cols, jnp.int32), jnp.ones((budget,), bool),
            width if budget > slots else None)


def measure(tcfg, tparams, *, slots: int, gamma: int, max_len: int, buckets: Sequence[int],
            tap_layers: Sequence[int] = (), warmup: int = 2, repeats: int = 10, mesh=None,
            progress: Callable[[], None] | None = None) -> dict[int, float]:
    """{B: steps/s} of `target.step_packed` at every bucket, on a half-full cache."""
    width = 1 + gamma
    if max(buckets) > slots * width:
        raise DSparkError(f"bucket {max(buckets)} exceeds slots x (1 + gamma) = {slots * width}")
    cache = target.init_cache(tcfg, slots, max_len)
    if mesh is not None:
        cache = target.shard_cache(cache, mesh)
    lengths = np.full((slots,), max(0, max_len // 2 - width), np.int32)
    cache = cache.replace(lengths=jnp.asarray(lengths))
    taps = tuple(tap_layers)
    table = {}
    for b in buckets:
        tokens, rows, positions, valid, qb = _packed_inputs(slots, width, int(b), lengths)
        for _ in range(max(1, warmup)):
            out, cache, _ = target.step_packed(tcfg, tparams, tokens, rows, positions, valid, cache, taps,
                                               query_block=qb)
            out.block_until_ready()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            out, cache, _ = target.step_packed(tcfg, tparams, tokens, rows, positions, valid, cache, taps,
                                               query_block=qb)
            out.block_until_ready()
            times.append(time.perf_counter() - t0)
        table[int(b)] = 1.0 / max(low_quartile(times), 1e-9)
        if progress is not None:
            progress()
    return table


def measure_draft(drafter, dparams, tparams, *, slots: int, max_len: int, warmup: int = 2,
                  repeats: int = 10) -> float:
    """Seconds (low quartile) of one `drafter.propose` over `slots` greedy rows on a half-full cache."""
    from dspark_jax.sampling import SamplingParams

    dcache = drafter.init_cache(slots, max_len)
    start = jnp.full((slots,), max(1, max_len // 2 - 1 - drafter.gamma), jnp.int32)
    anchor = jnp.full((slots,), 5, jnp.int32)
    sampling = SamplingParams.make(slots)
    keys = jax.vmap(jax.random.key)(jnp.arange(slots, dtype=jnp.uint32))
    propose = jax.jit(drafter.propose)
    for _ in range(max(1, warmup)):
        jax.block_until_ready(propose(dparams, tparams, dcache, anchor, start, sampling, keys))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(propose(dparams, tparams, dcache, anchor, start, sampling, keys))
        times.append(time.perf_counter() - t0)
    return low_quartile(times)


def low_quartile(times: Sequence[float]) -> float:
    """The 25th percentile of repeated timings: noise on a shared machine only ever adds
    time, so a low quantile tracks the pass's own cost better than the median."""
    return float(np.percentile(np.asarray(times, np.float64), 25))


def monotone(step_time: np.ndarray) -> np.ndarray:
    """Step times made non-decreasing in B (pool-adjacent-violators): a pass over more
    tokens is never faster, and a noisy dip or bump would mislead Algorithm 1's early
    stop into a local optimum."""
    blocks: list[list[float]] = []  # [mean, count]
    for t in np.asarray(step_time, np.float64):
        blocks.append([float(t), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def interpolate(table: dict[int, float], bmax: int) -> np.ndarray:
    """SPS at every integer B in [0, bmax] (index 0 unused): step time is made
    non-decreasing over the measured budgets (`monotone`), linear between them and flat
    beyond the ends."""
    if not table:
        raise DSparkError("empty SPS table")
    table = {int(b): float(v) for b, v in table.items()}
    bs = np.array(sorted(table), np.float64)
    step_time = monotone(np.array([1.0 / table[int(b)] for b in bs]))
    t = np.interp(np.arange(bmax + 1, dtype=np.float64), bs, step_time)
    return (1.0 / t).astype(np.float32)


def at_buckets(curve: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """The rate the engine really gets at each budget B: a round at B runs its bucket's
    static-shape program, so B costs what the smallest bucket >= B costs (a step curve;
    budgets past the last bucket keep their value)."""
    curve = np.asarray(curve, np.float32).copy()
    bs = np.asarray(sorted(int(b) for b in buckets))
    idx = np.arange(len(curve))
    pos = np.searchsorted(bs, idx)
    inside = (pos < len(bs)) & (idx > 0)
    curve[inside] = curve[np.minimum(bs[np.minimum(pos[inside], len(bs) - 1)], len(curve) - 1)]
    return curve


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {"version": VERSION, "profiles": {}}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data.get("profiles"), dict):
            raise ValueError
        return data
    except (json.JSONDecodeError, ValueError, AttributeError):
        raise DSparkError(f"{path} is not an SPS profile file (expected {{'profiles': {{...}}}})") from None


def _write(path: str, data: dict) -> None:
    """Replace the file in one step (a reader never sees half of it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def lookup(path: str, key: dict, buckets: Sequence[int]) -> dict | None:
    """The stored record for `key` if it covers every bucket (and has the drafting time
    when the key names a drafter), else None."""
    rec = _read(path)["profiles"].get(digest(key))
    if rec is None or rec.get("key") != key:
        return None
    if any(str(int(b)) not in rec.get("table", {}) for b in buckets):
        return None
    if "drafter" in key and "draft_seconds" not in rec:
        return None
    return rec


def save(path: str, key: dict, table: dict[int, float], bmax: int, draft_seconds: float | None = None) -> dict:
    data = _read(path)
    rec = {"key": key, "table": {str(b): float(v) for b, v in sorted(table.items())},
           "sps": interpolate(table, bmax).tolist(), "created": time.time()}
    if draft_seconds is not None:
        rec["draft_seconds"] = float(draft_seconds)
    data["profiles"][digest(key)] = rec
    _write(path, data)
    return rec


def save_rounds(path: str, key: dict, policy: str, rounds: dict) -> None:
    """Store an engine's measured round times (Engine.profile_rounds: {"spec": {B: s},
    "plain": {B: s}}, "flush": {(lines, width): s} with lazy ingest, stored as "LxW",
    and "host": s) under the profile record of `key`, for `policy`."""
    data = _read(path)
    rec = data["profiles"].get(digest(key))
    if rec is None or rec.get("key") != key:
        raise DSparkError(f"{path} holds no SPS profile for this engine; profile SPS(B) first")
    out = {kind: {str(int(b)): float(t) for b, t in sorted(rounds[kind].items())} for kind in ("spec", "plain")}
    if rounds.get("flush"):
        out["flush"] = {f"{int(n)}x{int(w)}": float(t) for (n, w), t in sorted(rounds["flush"].items())}
    if "host" in rounds:
        out["host"] = float(rounds["host"])
    rec.setdefault("rounds", {})[policy] = out
    _write(path, data)


def stored_rounds(rec: dict, policy: str, buckets: Sequence[int], plain_buckets: Sequence[int]) -> dict | None:
    """The record's round times for `policy` if they cover these buckets, else None."""
    got = (rec or {}).get("rounds", {}).get(policy)
    if not got:
        return None
    out = {kind: {int(b): float(t) for b, t in got.get(kind, {}).items()} for kind in ("spec", "plain")}
    if any(int(b) not in out["spec"] for b in buckets) or any(int(b) not in out["plain"] for b in plain_buckets):
        return None
    if "flush" in got:
        out["flush"] = {tuple(int(x) for x in k.split("x")): float(t) for k, t in got["flush"].items()}
    if "host" in got:
        out["host"] = float(got["host"])
    return out


def load_or_profile(tcfg, tparams, *, slots: int, gamma: int, max_len: int, buckets: Sequence[int] | None = None,
                    tap_layers: Sequence[int] = (), mesh=None, path: str | None = None, force: bool = False,
                    warmup: int = 2, repeats: int = 10, progress=None, drafter=None,
                    dparams=None) -> tuple[np.ndarray, dict]:
    """(sps [slots * (1 + gamma) + 1], record): the stored curve when one matches, else a
    fresh measurement (then stored). With `drafter` and `dparams` the record also holds
    `draft_seconds`."""
    buckets = tuple(buckets or budget_buckets(slots, gamma))
    bmax = slots * (1 + gamma)
    path = path or default_path()
    if drafter is not None and dparams is None:
        raise DSparkError("timing the drafter needs its parameters (dparams)")
    key = profile_key(tcfg, slots=slots, gamma=gamma, max_len=max_len, tap_layers=tap_layers, mesh=mesh,
                      drafter=drafter)
    rec = None if force else lookup(path, key, buckets)
    if rec is None:
        table = measure(tcfg, tparams, slots=slots, gamma=gamma, max_len=max_len, buckets=buckets,
                        tap_layers=tap_layers, warmup=warmup, repeats=repeats, mesh=mesh, progress=progress)
        draft_seconds = None
        if drafter is not None:
            draft_seconds = measure_draft(drafter, dparams, tparams, slots=slots, max_len=max_len, warmup=warmup,
                                          repeats=repeats)
        rec = save(path, key, table, bmax, draft_seconds)
    table = {int(b): float(v) for b, v in rec["table"].items()}
    return interpolate(table, bmax), rec


def plot(rec: dict, png: str) -> str:
    """Measured points and the interpolated curve (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {int(b): float(v) for b, v in rec["table"].items()}
    sps = np.asarray(rec["sps"], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    bs = np.arange(1, len(sps))
    ax.plot(bs, sps[1:], "-", label="interpolated")
    ax.plot(sorted(table), [table[b] for b in sorted(table)], "o", label="measured bucket")
    ax.plot(bs, sps[1:] * bs, ":", label="tokens/s if all accepted (B x SPS)")
    k = rec["key"]
    title = f"SPS(B): {k['device_kind']}, slots {k['slots']}, gamma {k['gamma']}"
    if rec.get("draft_seconds") is not None:
        d = float(rec["draft_seconds"])
        ax.plot(bs, sps[1:] * bs / (1.0 + d * sps[1:]), "--", label="B tokens/s with drafting")
        title += f", drafting {d * 1e3:.2f} ms"
    for policy, rounds in sorted(rec.get("rounds", {}).items()):
        for kind, marker in (("spec", "s"), ("plain", "^")):
            pts = sorted((int(b), 1.0 / float(t)) for b, t in rounds.get(kind, {}).items())
            ax.plot([b for b, _ in pts], [r for _, r in pts], marker, mfc="none",
                    label=f"{policy} engine round ({'speculative' if kind == 'spec' else 'plain'}), rounds/s")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("verification budget B (tokens)")
    ax.set_ylabel("steps / s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def markdown(rec: dict) -> str:
    lines = ["| B | steps/s | ms/step | B x steps/s |", "| ---: | ---: | ---: | ---: |"]
    for b, v in sorted((int(b), float(v)) for b, v in rec["table"].items()):
        lines.append(f"| {b} | {v:.1f} | {1000.0 / v:.3f} | {b * v:.0f} |")
    if rec.get("draft_seconds") is not None:
        lines.append(f"\ndrafting pass (all slots): {float(rec['draft_seconds']) * 1e3:.3f} ms")
    for policy, rounds in sorted(rec.get("rounds", {}).items()):
        lines += [f"\nengine rounds ({policy}): ms per round", "| B | speculative | plain |", "| ---: | ---: | ---: |"]
        for b in sorted({int(b) for kind in ("spec", "plain") for b in rounds.get(kind, {})}):
            cells = [f"{float(rounds[kind][str(b)]) * 1e3:.3f}" if str(b) in rounds.get(kind, {}) else ""
                     for kind in ("spec", "plain")]
            lines.append(f"| {b} | {cells[0]} | {cells[1]} |")
        if "host" in rounds:
            lines.append(f"\nhost work per drafted step: {float(rounds['host']) * 1e3:.3f} ms")
    return "\n".join(lines)
