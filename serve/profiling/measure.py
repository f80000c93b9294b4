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

import time
from typing import Callable

import jax

from dspark_jax import target
from dspark_jax.errors import DSparkError
from serve.profiling import passes
from serve.profiling import roofline as rl
from serve.profiling.device import _peak, backend_info, calibrate, free_memory, host_info, now_iso, peak_memory
from serve.profiling.pairs import Pair, drafter_for, model_meta, random_tree, tree_bytes
from serve.profiling.passes import TooBig
from serve.profiling.schema import Profile, Skipped, write_profile
from serve.profiling.settings import Settings, sps_plan


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
        self.bench = passes.Bench(pair, settings, mesh, self.cost, self._check_temp, self._roof)

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
        return 2 + cells * (2 + len(s.q_lens)) + len(sps_plan(s)) + len(s.prefill_lens)

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
        except TooBig as e:
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
            raise TooBig(f"XLA needs {mem['temp'] / 2**30:.1f} GiB of temporaries, "
                          f"{self.free() / 2**30:.1f} GiB free")
        return peak

    # ---------------------------------------------------------------- the measurements
    def _record(self, records: list, rec, line: str):
        records.append(rec)
        self.log(line)
        self.save()

    def _step(self, kind: str, batch: int, context: int, q_len: int):
        def go():
            rec = passes.target_step(self.bench, kind, batch, context, q_len)
            self._record(self.profile.steps, rec,
                         f"{kind} b{batch} ctx{context} q{q_len}: {rec.time_ms:.2f} ms "
                         f"(floor {rec.roofline.floor_ms:.2f} ms, x{rec.roofline.time_over_floor:.1f}; "
                         f"compile {rec.compile_s:.1f} s)")
        self._guard(kind, batch, context, q_len, go)

    def _drafter(self, batch: int, context: int):
        def go():
            rec = passes.drafter_pass(self.bench, batch, context)
            self._record(self.profile.drafter, rec,
                         f"drafter b{batch} ctx{context}: parallel {rec.parallel_ms:.2f} ms, "
                         f"propose {rec.propose_ms:.2f} ms, ingest {rec.ingest_ms:.2f} ms")
        self._guard("drafter", batch, context, None, go)

    def _sps(self):
        pair, s = self.pair, self.s
        context = s.contexts[0]
        plan = sps_plan(s)
        if not target.supports_packed(pair.tcfg):
            for _ in plan:
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

            def go(slots=slots, budget=budget):
                rec = passes.packed_step(self.bench, slots, budget, context)
                self._record(self.profile.sps, rec, f"sps slots{slots} B{budget}: {rec.sps:.1f} steps/s")
            self._guard("sps", slots, context, budget, go)

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

            def go(length=length):
                rec = passes.prefill(self.bench, b, length)
                self._record(self.profile.prefill, rec, f"prefill b{b} T{length}: {rec.tokens_per_s:.0f} tokens/s")
            self._guard("prefill", b, length, None, go)
