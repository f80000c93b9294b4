"""The backend profile file: one self-describing JSON per `serve.profile` run.

Layout (schema version 1; every time is the median of the timed repeats):

    {"schema": "dspark-jax.backend-profile", "schema_version": 1,
     "status": "running" | "complete" | "interrupted" | "failed", "error": str | null,
     "created": ISO-8601 UTC, "finished": ISO-8601 UTC | null, "command": [argv...],
     "host":    {hostname, os, machine, python, cpu_count, memory_bytes},
     "backend": {platform, device_kind, device_count, devices_used, jax_version,
                 jaxlib_version, memory_limit_bytes, memory_limit_source},
     "run":     {mesh, dtype, gamma, batches, contexts, q_lens, quick, warmup, repeats,
                 source ("bundled" | "folders" | "preset"), preset, target_path,
                 draft_path, random_weights, random_drafter, time_budget_s, model_name},
     "models":  {"target": {type, name, config, num_params, weight_bytes},
                 "drafter": {kind, gamma, block_size, config, num_params, weight_bytes}},
     "calibration": {"memory_bandwidth": {...bytes_per_s...}, "matmul": {...flops_per_s...}},
     "steps":   [StepRecord]     decode (q_len 1, no taps) and verify (q_len 1..1+gamma, taps)
     "prefill": [PrefillRecord],
     "drafter": [DrafterRecord], parallel pass, sequential head, context ingest
     "sps":     [SpsRecord],     target verification steps/s at a budget of B tokens
     "skipped": [Skipped],       what was planned but not measured, and why
     "memory":  {peak_bytes, source, note}}

`write_profile` writes atomically (tmp file + rename), so a run interrupted between two
measurements leaves a valid file holding everything measured so far. `read_profile`
checks the schema name and version and raises a one-line `DSparkError` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

from dspark_jax.errors import DSparkError

SCHEMA = "dspark-jax.backend-profile"
SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "interrupted", "failed")


@dataclasses.dataclass
class Roofline:
    """Bytes and FLOPs an ideal implementation must move / do, and the floor they imply."""

    bytes: int
    flops: int
    floor_ms: float
    bound: str              # "memory" or "compute": which term sets the floor
    time_over_floor: float  # measured time / floor


@dataclasses.dataclass
class StepRecord:
    kind: str               # "decode" (q_len 1, no taps) or "verify" (q_len tokens, drafter taps)
    batch: int
    context: int            # cache positions each row attends to
    q_len: int
    time_ms: float
    times_ms: list[float]
    compile_s: float
    roofline: Roofline
    xla_flops: float | None = None          # XLA's cost_analysis of the compiled step
    xla_bytes_accessed: float | None = None
    peak_bytes: int | None = None           # XLA's memory_analysis (arguments + temps + outputs)


@dataclasses.dataclass
class PrefillRecord:
    batch: int
    length: int             # prompt tokens per row
    time_ms: float
    times_ms: list[float]
    tokens_per_s: float
    compile_s: float
    roofline: Roofline
    peak_bytes: int | None = None


@dataclasses.dataclass
class DrafterRecord:
    batch: int
    context: int
    gamma: int
    parallel_ms: float      # block_hidden + base logits of gamma positions (one parallel pass)
    propose_ms: float       # the whole `propose`: parallel pass + sequential head (lax.scan)
    head_ms: float          # propose - parallel: the sequential head, confidences and sampling
    ingest_ms: float        # appending 1 + gamma positions of context K/V to the drafter cache
    compile_s: dict[str, float]
    roofline: Roofline      # of `propose`

    @property
    def draft_ms(self) -> float:
        """Drafter time per speculation round: propose + ingest."""
        return self.propose_ms + self.ingest_ms


@dataclasses.dataclass
class SpsRecord:
    slots: int              # cache rows the budget is spread over
    context: int
    budget: int             # B: verified tokens per step (packed)
    time_ms: float
    sps: float              # steps per second
    compile_s: float
    roofline: Roofline


@dataclasses.dataclass
class Skipped:
    what: str               # "decode" / "verify" / "prefill" / "drafter" / "sps" / "model"
    reason: str
    batch: int | None = None
    context: int | None = None
    q_len: int | None = None


@dataclasses.dataclass
class Profile:
    created: str
    command: list[str]
    host: dict[str, Any]
    backend: dict[str, Any]
    run: dict[str, Any]
    models: dict[str, Any]
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    prefill: list[PrefillRecord] = dataclasses.field(default_factory=list)
    drafter: list[DrafterRecord] = dataclasses.field(default_factory=list)
    sps: list[SpsRecord] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    finished: str | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ lookups
    def step(self, kind: str, batch: int, context: int, q_len: int) -> StepRecord | None:
        for s in self.steps:
            if (s.kind, s.batch, s.context, s.q_len) == (kind, batch, context, q_len):
                return s
        return None

    def drafter_at(self, batch: int, context: int) -> DrafterRecord | None:
        for d in self.drafter:
            if (d.batch, d.context) == (batch, context):
                return d
        return None

    @property
    def label(self) -> str:
        """`device kind (platform x n) dtype`: how a report names this backend."""
        b = self.backend
        n = b.get("devices_used") or 1
        name = b.get("device_description") or b.get("device_kind", "?")
        dev = f"{name} ({b.get('platform', '?')}{' x%d' % n if n > 1 else ''})"
        return f"{dev}, {self.run.get('dtype', '?')}"

    @property
    def model_name(self) -> str:
        return str(self.run.get("model_name") or self.models.get("target", {}).get("name") or "?")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- (de)serialising

def _build(cls, data, where: str):
    """A dataclass from a dict, checking required fields and (shallowly) their types."""
    if not isinstance(data, dict):
        raise DSparkError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DSparkError(f"{where}: missing field '{f.name}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise DSparkError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise DSparkError(f"{where}: expected an object, got {type(value).__name__}")
        if args and args[1] is float:
            return {k: _convert(float, v, f"{where}.{k}") for k, v in value.items()}
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DSparkError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DSparkError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise DSparkError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(data, where: str = "profile") -> Profile:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DSparkError(f"{where} is not a dspark-jax backend profile (no \"schema\": \"{SCHEMA}\")")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DSparkError(f"{where} has profile schema version {version!r}; this dspark-jax reads "
                          f"version {SCHEMA_VERSION} (re-run python -m serve.profile)")
    prof = _build(Profile, data, where)
    if prof.status not in STATUSES:
        raise DSparkError(f"{where}: status '{prof.status}' is not one of {', '.join(STATUSES)}")
    return prof


def write_profile(path: str, profile: Profile) -> str:
    """Atomic write: a reader (or a crash) never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(profile.to_dict(), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_profile(path: str) -> Profile:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DSparkError(f"{path}: no such profile file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DSparkError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    return from_dict(data, path)
