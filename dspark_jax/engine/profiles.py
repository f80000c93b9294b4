"""The profile store: measured costs of one engine configuration, kept in a JSON file.

A record is keyed by everything its numbers depend on (backend, device kind, model
shape, mesh, slots, gamma, cache length, drafter) and holds:
- "table": {"B": steps/s} of the target's packed verification pass at each budget
  bucket, and "sps", that curve interpolated to every integer B (index 0 unused);
- "draft_seconds": one drafting pass over every slot;
- "acceptance": [G] the drafter's mean prefix survival per position, measured;
- "rounds": {"spec": {"B": s}, "plain": {"B": s}}: the engine's own compiled rounds,
  drafting, acceptance and ingest included, timed back to back on the device.
`python -m serve.profile_sps` measures and writes them; the engine only reads them.
File layout: {"version": 2, "profiles": {digest: record}}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import jax
import numpy as np

from dspark_jax.errors import DSparkError

VERSION = 2


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


def records(path: str) -> list[dict]:
    """Every record in the file (none when it does not exist)."""
    return list(_read(path)["profiles"].values())


def save(path: str, key: dict, record: dict) -> dict:
    """Store `record` (its "table" a {B: steps/s} dict) under `key`; returns it as stored."""
    data = _read(path)
    table = {int(b): float(v) for b, v in record["table"].items()}
    rec = dict(record, key=key, table={str(b): v for b, v in sorted(table.items())},
               sps=interpolate(table, max(table)).tolist())
    if rec.get("rounds"):  # as JSON keeps them: budgets as strings
        rec["rounds"] = {kind: {str(int(b)): float(t) for b, t in sorted(times.items(), key=lambda x: int(x[0]))}
                         for kind, times in rec["rounds"].items()}
    data["profiles"][digest(key)] = rec
    _write(path, data)
    return rec


def round_times(rec: dict) -> dict | None:
    """{"spec": {B: s}, "plain": {B: s}} from a record, or None when it has none."""
    got = rec.get("rounds")
    if not got:
        return None
    return {kind: {int(b): float(t) for b, t in got.get(kind, {}).items()} for kind in ("spec", "plain")}
