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
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.errors import DSparkError
from serve.profiling import roofline as rl
from serve.profiling.schema import (DrafterRecord, PrefillRecord, Profile, Skipped, SpsRecord, StepRecord,
                                    write_profile)

from serve.profiling.device import (MIN_TIMED_S, now_iso, host_info, free_memory, peak_memory, backend_info, time_compiled, compile_fn, _peak, calibrate)
from serve.profiling.pairs import (  # noqa: F401  load_pair is re-exported
    load_pair, Pair, drafter_for, random_tree, model_meta, tree_bytes)
DEFAULT_BATCHES = (1, 8, 64, 256)
DEFAULT_CONTEXTS = (512, 4096, 32768)
QUICK_BATCHES = (1, 8)
QUICK_CONTEXTS = (512,)
# The DSpark drafter of configs/dspark_qwen3_4b.py: what a random drafter for a preset looks like.


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
