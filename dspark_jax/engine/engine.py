"""A continuous-batching speculative decoding engine with one round in flight.

    engine = Engine(tcfg, tparams, drafter, dparams, slots=8, max_len=1024, policy="fixed")
    rid = engine.submit(prompt_ids, max_new_tokens=128, on_tokens=print)   # any thread
    results = engine.run_until_done()

Each slot is one row of the target's and the drafter's caches and of the device's
`DecodeState`. `step()` dispatches the next round (round.py: drafting, depth scheduling on
the device, one packed verification pass, lossless acceptance) BEFORE it reads the round
before back: the device never waits for the host's streaming, retiring and admission,
which happen one round late while the next round runs. Everything a round needs from the
one before stays on the device; a request that finished in round n idles through round
n + 1 (its row is `done` on the device), so nothing past a stop id or max_new_tokens is
ever emitted; a round in which no row decodes is skipped on the device. With every slot
decoding and nothing waiting, `rounds_per_call` rounds run in one compiled call when some
row surely needs them all, or always with one slot, whose ended request skips the call's
later rounds (a free slot keeps calls to one round, so a request arriving for it waits at
most a round). Admission (slots.py) is a prefill pass when no slot is held, else chunked
prefill riding in the rounds' verification passes.

The host makes two choices per dispatch, both from what it has read back, never from the
round's own drafts (so every policy's depths stay lossless, policies.py): the budget
bucket (costs.py; production's capacity K from the survival of two rounds earlier), and
whether the round drafts at all, a table by row count fixed at start-up from the profile.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.engine import round as rnd
from dspark_jax.engine.costs import RoundCosts
from dspark_jax.engine.policies import POLICIES, SCHEDULED, Schedule, drafter_has_confidence
from dspark_jax.engine.results import (EngineMetrics, PendingRequest, RequestResult, TokenCallback, as_int,
                                       is_int, validate_prompt)
from dspark_jax.engine.programs import Programs, prefill_budget, prefill_width
from dspark_jax.engine.slots import SlotTable, paged_cache
from dspark_jax.engine.stream import InFlight, Streamer
from dspark_jax.errors import DSparkError
from dspark_jax.paged_cache import pages_needed
from dspark_jax.sampling import SamplingParams, validate


class Engine:
    """Fixed slots, caches of `max_len` positions, one policy for every round.

    policy: "none" (plain decoding; the drafter is ignored), "fixed" (depth `depth`,
    default gamma; a smaller depth drafts only that many), "threshold" (verify while
    c_k >= `threshold`), "algorithm1" or "production" (need `sps`: a curve indexed by B
    or a {B: steps/s} dict; `draft_time`, `acceptance` (the drafter's mean survival per
    position) and `rounds` (measured round times) as the profile holds them; see
    `costs.stored_costs`). prefill_chunk: prompt tokens per round riding in the verification
    pass (0: prefill passes only). rounds_per_call: rounds per dispatch when every slot
    decodes. lag: rounds in flight before the host reads one back (0: synchronous). trace: record
    each round's drafts and confidences. mesh: shards params and caches; current in every dispatch.
    """

    def __init__(self, tcfg, tparams, drafter=None, dparams=None, *, slots: int = 4, max_len: int = 256,
                 policy: str = "fixed", depth: int | None = None, threshold: float = 0.5, sps=None,
                 draft_time: float = 0.0, acceptance=None, rounds: dict | None = None,
                 buckets: Sequence[int] | None = None, prefill_chunk: int = 64, rounds_per_call: int = 4,
                 lag: int = 1, max_stop_ids: int = 4, paged: bool = False, page_size: int = 16,
                 num_pages: int | None = None, attention_impl: str = "auto", attention_interpret: bool = False,
                 mesh=None, trace: bool = False, clock=time.perf_counter):
        if policy not in POLICIES:
            raise DSparkError(f"unknown policy '{policy}' (choose from {', '.join(POLICIES)})")
        if policy == "none":
            drafter, dparams = None, None
        elif drafter is None:
            raise DSparkError(f"policy '{policy}' needs a drafter")
        elif policy in ("threshold",) + SCHEDULED and not drafter_has_confidence(drafter):
            raise DSparkError(f"policy '{policy}' needs drafter confidences; this drafter has no confidence head "
                              "(use policy 'fixed')")
        if slots < 1 or max_len < 2 or prefill_chunk < 0 or rounds_per_call < 1 or lag < 0:
            raise DSparkError(f"need slots >= 1, max_len >= 2, prefill_chunk >= 0, rounds_per_call >= 1 and "
                              f"lag >= 0; got {slots}, {max_len}, {prefill_chunk}, {rounds_per_call}, {lag}")
        if max_len > tcfg.max_position_embeddings:
            raise DSparkError(f"max_len {max_len} exceeds the model's {tcfg.max_position_embeddings} positions")
        gamma = drafter.gamma if drafter is not None else 0
        self.depth = gamma if depth is None else int(depth)
        if not 0 <= self.depth <= gamma:
            raise DSparkError(f"depth must be in [0, gamma={gamma}]; got {depth}")
        if policy == "fixed" and 0 < self.depth < gamma and dataclasses.is_dataclass(drafter):
            drafter = dataclasses.replace(drafter, gamma=self.depth)  # draft only what is verified
        self.tcfg, self.drafter, self.policy = tcfg, drafter, policy
        self.gamma = drafter.gamma if drafter is not None else 0
        self.slots, self.max_len, self.max_stop_ids = slots, max_len, max_stop_ids
        if policy in SCHEDULED and sps is None:
            raise DSparkError(f"policy '{policy}' needs an SPS profile (python -m serve.profile_sps makes one)")
        self.costs = RoundCosts(slots=slots, gamma=self.gamma, policy=policy,
                                buckets=buckets, sps=sps, draft_time=draft_time, acceptance=acceptance,
                                rounds=rounds)
        self.notice = None  # said once by the caller: why the engine runs without its drafter
        if policy in SCHEDULED and not self.costs.pays_anywhere:  # plain decoding's own engine, then
            self.notice = (f"policy '{policy}': the profile predicts that drafting pays at no batch size on this "
                           "backend; serving without the drafter")
            drafter = dparams = self.drafter = None
            self.gamma = 0
            self.costs = RoundCosts(slots=slots, gamma=0, policy="none", sps=sps)
        self.rounds_per_call, self.lag, self.clock, self.trace = rounds_per_call, lag, clock, trace
        self.paged = bool(paged)
        if self.paged and mesh is not None:
            raise DSparkError("the paged engine does not support a mesh yet (use paged=False)")
        self.prefill_chunk = prefill_chunk if target.supports_packed(tcfg) and not self.paged else 0
        if mesh is not None:
            tparams = target.shard(tcfg, tparams, mesh)
            dparams = drafter.shard(dparams, mesh) if drafter is not None else None
        else:  # on the device once, not copied there by every call
            tparams, dparams = jax.device_put((tparams, dparams))
        self.tparams, self.dparams, self.mesh = tparams, dparams, mesh
        allocator, cache = (paged_cache(tcfg, slots, max_len + self.gamma + 1, page_size, num_pages, attention_impl,
                                        attention_interpret) if self.paged
                            else (None, target.init_cache(tcfg, slots, max_len)))
        if mesh is not None:
            cache = target.shard_cache(cache, mesh)
        self.table = SlotTable(slots, self.gamma, max_stop_ids, allocator)
        self._state = rnd.DecodeState(
            cache=cache, draft_cache=drafter.init_cache(slots, max_len) if drafter is not None else None,
            anchor=jnp.zeros((slots,), jnp.int32), keys=jax.vmap(jax.random.key)(jnp.arange(slots, dtype=jnp.uint32)),
            done=jnp.ones((slots,), bool), n_out=jnp.zeros((slots,), jnp.int32), max_new=jnp.ones((slots,), jnp.int32),
            max_depth=jnp.zeros((slots,), jnp.int32), stop_ids=jnp.full((slots, max_stop_ids), -1, jnp.int32),
            sampling=SamplingParams.make(slots))
        self._stale = jnp.zeros((2, slots, self.gamma), jnp.float32)
        self._stale_host = np.zeros((2, slots, self.gamma), np.float32)
        c = self.costs
        self._sched = Schedule(sps=jnp.asarray(c.sps), threshold=jnp.asarray(threshold, jnp.float32),
                               draft_time=jnp.asarray(c.draft_time, jnp.float32), prior=jnp.asarray(c.prior),
                               live=jnp.zeros((slots,), bool))
        self._live_sent = np.zeros(slots, bool)
        self._pages_dirty = False
        self._inflight: collections.deque[InFlight] = collections.deque()
        self._lock = threading.Lock()
        self._inbox: collections.deque[PendingRequest] = collections.deque()
        self._cancels: list[int] = []
        self._next_id = 0
        self.results: dict[int, RequestResult] = {}
        self.metrics = EngineMetrics()
        self.stream = Streamer(self)
        self.programs = Programs(self)

    # ---------------------------------------------------------------- requests (any thread)

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
               max_depth: int | None = None, on_tokens: TokenCallback | None = None) -> int:
        """Queue a request; returns its id. Callable from any thread. A bad request is not
        raised: its result is finished at once with a one-line `error`."""
        with self._lock:
            rid = self._next_id
            self._next_id += 1
        prompt = list(prompt_ids) if prompt_ids is not None else []
        res = RequestResult(rid, len(prompt), int(max_new_tokens) if is_int(max_new_tokens) else 0,
                            accepted_per_position=[0] * self.gamma, submitted_at=self.clock())
        self.results[rid] = res
        try:
            prompt, stops, depth = self._validate(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                                  stop_ids, max_depth, rid)
        except DSparkError as e:
            res.error, res.finish_reason = " ".join(str(e).split()), "error"
            res.finished, res.finished_at = True, self.clock()
            if on_tokens is not None:
                on_tokens(rid, [], True)
            return rid
        self._inbox.append(PendingRequest(res, prompt, float(temperature), int(top_k), float(top_p), int(seed),
                                          stops, depth, on_tokens))
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request (callable from any thread): at the next step its slot and pages
        are free and no further token of it is emitted."""
        with self._lock:
            self._cancels.append(int(request_id))

    def _validate(self, prompt, max_new, temperature, top_k, top_p, seed, stop_ids, max_depth, rid):
        try:
            prompt = [operator.index(t) for t in prompt]
            stops = tuple(operator.index(t) for t in stop_ids)
            max_new, top_k, seed = as_int(max_new, "max_new_tokens"), as_int(top_k, "top-k"), as_int(seed, "seed")
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError) as e:
            raise DSparkError(f"bad request field: {e}") from None
        validate_prompt(prompt, self.tcfg.vocab_size, max_new, rid)
        if len(prompt) + max_new > self.max_len:
            raise DSparkError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the engine's "
                              f"max length {self.max_len}")
        if self.paged:
            need = pages_needed(self.table.reserve_tokens(len(prompt), max_new), self.table.allocator.page_size)
            if need > self.table.allocator.capacity:
                raise DSparkError(f"request needs {need} KV cache pages but the whole pool has "
                                  f"{self.table.allocator.capacity} (enlarge num_pages)")
        validate(np.float32(temperature), np.int32(top_k), np.float32(top_p))
        if not 0 <= seed < 2**32:
            raise DSparkError(f"seed must be in [0, 2^32); got {seed}")
        if len(stops) > self.max_stop_ids or any(not 0 <= t < self.tcfg.vocab_size for t in stops):
            raise DSparkError(f"stop_ids must be at most {self.max_stop_ids} ids in [0, {self.tcfg.vocab_size})")
        limit = self.depth if self.policy == "fixed" else self.gamma
        if max_depth is not None:
            if as_int(max_depth, "max_depth") < 0:
                raise DSparkError(f"max_depth must be >= 0; got {max_depth}")
            limit = min(limit, int(max_depth))
        return prompt, stops, limit

    def forget(self, request_id: int) -> None:
        """Drop a finished request's result (a long-running server keeps only what it reads)."""
        if getattr(self.results.get(request_id), "finished", False):
            del self.results[request_id]

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet holding a slot."""
        return len(self._inbox) + len(self.table.waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.table.req)

    @property
    def idle(self) -> bool:
        """Nothing queued, seated or in flight."""
        return not self._inbox and not self.table.waiting and not self.table.occupied() and not self._inflight

    def result(self, request_id: int) -> RequestResult:
        return self.results[request_id]

    # ---------------------------------------------------------------- the loop

    def step(self) -> bool:
        """Dispatch the next call (admission and rounds) if any slot is held, then read
        back calls until at most `lag` stay in flight. Returns whether anything ran."""
        self._take_inbox()
        dispatched = self._dispatch()
        keep = self.lag if dispatched else 0
        consumed = len(self._inflight) > keep
        while len(self._inflight) > keep:
            self.stream.consume(self._inflight.popleft())
        return dispatched or consumed

    def run_until_done(self, max_steps: int | None = None) -> list[RequestResult]:
        """Step until nothing waits, runs or is in flight; returns every result, by id."""
        steps = 0
        while not self.idle and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return [self.results[i] for i in sorted(self.results)]

    def _take_inbox(self) -> None:
        while self._inbox:
            self.table.waiting.append(self._inbox.popleft())
        with self._lock:
            cancels, self._cancels = self._cancels, []
        now = self.clock()
        for rid in cancels:
            res = self.results.get(rid)
            if res is None or res.finished:
                continue
            req = self.table.remove_waiting(rid)
            if req is None:
                s = next((s for s, r in enumerate(self.table.req) if r is not None and r.result is res), None)
                if s is None:
                    continue
                req = self.table.unseat(s)
                self._pages_dirty = self.paged
            self.stream.finish(req, "cancelled", now)

    def _rounds_needed(self) -> int | None:
        """Rounds after those in flight that some decoding row surely needs: a row with r
        tokens left takes at least ceil(r / (gamma + 1)) rounds. None when no row decodes
        or a prompt is half sent."""
        rows = self.table.decoding()
        if not rows or self.table.prefilling:
            return None
        left = self.table.max_new[rows] - self.table.seen[rows]
        flying = sum(f.summary.shape[0] for f in self._inflight if f.summary is not None)
        return int(-(-left.max() // (self.gamma + 1))) - flying

    def _dispatch(self) -> bool:
        t = self.table
        if self.metrics.started_at is None and (t.waiting or t.occupied()):
            self.metrics.started_at = self.clock()
        chunking = self.prefill_chunk > 0 and bool(t.decoding())
        seated = t.take_waiting()
        now = self.clock()
        for _, req in seated:
            req.result.admitted_at = now
        if chunking:
            t.prefilling.extend(s for s, _ in seated)
            prefilled = []
        else:  # nothing decodes: one prefill pass, which also restarts any half-sent prompt
            prefilled = t.prefilling + [s for s, _ in seated]
            t.prefilling.clear()
        if not t.occupied():
            return False
        greedy = t.all_greedy()
        if self.paged and (seated or self._pages_dirty):
            self._state = self._state.replace(cache=self._state.cache.replace(
                page_table=jnp.asarray(t.page_table(self._state.cache.pages_per_seq))))
            self._pages_dirty = False
        first = self._prefill(prefilled, greedy) if prefilled else None
        chunk = t.next_chunk(self.prefill_chunk) if t.prefilling else None
        admission = self.admission_line(chunk, greedy) if chunk is not None else None
        if chunk is not None:
            self.metrics.prefill_chunks += 1
        rows = t.decoding()
        n = len(rows)
        draft = self.gamma > 0 and n > 0 and bool(self.costs.drafts_at[n])
        if draft:
            idx = np.asarray(rows)
            budget = self.costs.budget(n, t.limits(idx), self._stale_host[1, idx])
        else:
            budget = self.costs.bucket(max(n, 1))
        k = self.rounds_per_call  # several rounds a call: see the module docstring
        count = k if n == self.slots and not t.waiting and (n == 1 or (self._rounds_needed() or 0) >= k) else 1
        key = ("round", budget, draft, admission is not None, greedy, count)
        self._sync_live()
        summary = self.call_rounds(budget, draft, count, greedy, admission)
        self.metrics.count_call(key)
        self._inflight.append(InFlight(summary, first, list(t.req), prefilled, key))
        return True

    def call_rounds(self, budget: int, draft: bool, count: int, greedy: bool, admission=None):
        """Dispatch `count` rounds (the state stays on the device) -> their packed summaries."""
        if self._state.sampling.greedy != greedy:
            self._state = self._state.replace(sampling=self._state.sampling.promise_greedy(greedy))
        with jax.set_mesh(self.mesh):
            self._state, self._stale, summary = rnd.rounds(
                self.tcfg, self.drafter, self.gamma, budget, self.policy, draft, count, self.tparams, self.dparams,
                self._state, self._stale, self._sched, admission)
        return summary

    def call_prefill(self, rows, prompts, lengths, seeds, budget: int, greedy: bool):
        """Dispatch a prefill pass of the `rows` [S] bool given their prompts -> first tokens [S]."""
        t = self.table
        with jax.set_mesh(self.mesh):
            self._state, self._stale, first = rnd.prefill(
                self.tcfg, self.drafter, self.tparams, self.dparams, self._state, self._stale, rows, prompts, lengths,
                seeds, self._sampling(greedy), t.max_new.copy(), t.max_depth.copy(), t.stops.copy(), budget=budget)
        return first

    def _sync_live(self) -> None:
        if not np.array_equal(self.table.live, self._live_sent):
            self._live_sent = self.table.live.copy()
            self._sched = self._sched.replace(live=jnp.asarray(self._live_sent))

    def _prefill(self, rows_in: list, greedy: bool):
        """One prefill pass admitting the requests in slots `rows_in` -> first tokens [S]."""
        t, s = self.table, self.slots
        width = prefill_width(max(len(t.req[r].prompt) for r in rows_in), self.max_len)
        rows, prompts = np.zeros(s, bool), np.zeros((s, width), np.int32)
        lengths, seeds = np.ones(s, np.int32), np.zeros(s, np.uint32)
        for r in rows_in:
            req = t.req[r]
            t.start(r)
            rows[r], lengths[r], seeds[r] = True, len(req.prompt), req.seed
            prompts[r, :len(req.prompt)] = req.prompt
        budget = prefill_budget(int(lengths[rows].sum()), width, s)
        first = self.call_prefill(rows, prompts, lengths, seeds, budget, greedy)
        self.metrics.prefills += 1
        self.metrics.count_call(("prefill", width, budget, greedy))
        self.metrics.count_work(("prefill", width, budget, greedy), len(rows_in))
        return first

    def _sampling(self, greedy: bool) -> SamplingParams:
        t = self.table
        return SamplingParams(t.temp.copy(), t.top_k.copy(), t.top_p.copy(), greedy=greedy)

    def admission_line(self, chunk, greedy: bool) -> rnd.Admission:
        """One chunk line and the per-slot tables, sent to the device in one transfer."""
        s, tokens, nxt, at, n, final = chunk
        t = self.table
        return jax.device_put(rnd.Admission(
            tokens=tokens[None], next=nxt[None], rows=np.asarray([s], np.int32), length=np.asarray([n], np.int32),
            first=np.asarray([at == 0]), final=np.asarray([final]),
            seeds=np.asarray([t.req[s].seed if t.req[s] is not None else 0], np.uint32),
            sampling=self._sampling(greedy), max_new=t.max_new.copy(), max_depth=t.max_depth.copy(),
            stop_ids=t.stops.copy()))

    def program_keys(self, prompt_lens: Sequence[int] = (1,), greedy: Sequence[bool] = (True, False)) -> list:
        """Every program (a `metrics.programs` key) this engine can run for these prompt lengths."""
        return self.programs.keys(prompt_lens, greedy)

    def warmup(self, prompt_lens: Sequence[int] = (1,), greedy: Sequence[bool] = (True, False)) -> None:
        """Compile every program of `program_keys` (idle only: over empty slots, nothing changes)."""
        self.programs.warmup(prompt_lens, greedy)

    def program_seconds(self, key: tuple, repeats: int = 8, trials: int = 3, rows: int | None = None) -> float:
        """Seconds per call of a program (a `metrics.programs` key), idle only: the median over
        `trials` of `repeats` calls back to back on device-resident inputs, over `rows` rows
        that decode (or are prefilled); default: as many as its budget holds."""
        return self.programs.seconds(key, repeats, trials, rows)
