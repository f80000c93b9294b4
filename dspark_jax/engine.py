"""A continuous-batching speculative decoding engine over a fixed set of slots.

    engine = Engine(tcfg, tparams, drafter, dparams, slots=8, max_len=1024, policy="production")
    rid = engine.submit(prompt_ids, max_new_tokens=128, temperature=0.0, on_tokens=print)
    results = engine.run_until_done()

Each slot is one row of a fixed-length KV cache (target and drafter) and of the jitted
DecodeState. `step()` admits waiting requests into free slots, then runs one speculation
round over the decoding slots (`slot_round.engine_round`): drafting, depth scheduling on
device, packed verification in a token-budget bucket, lossless acceptance. Admission
(engine_slots.py) is a batched prefill pass when no slot decodes, and otherwise chunked
prefill: the new prompt rides along in the rounds' verification passes, `prefill_chunk`
tokens per round. Between rounds the host reads a small summary back (new tokens,
depths, survival), streams tokens, retires finished requests and frees their slots;
requests join and leave only there.

The budget bucket is one of two decisions taken on the host. It uses only what is known
before the round (active slots, the room each has left, the survival of earlier
rounds), so it can never depend on the current round's drafts; see slot_round.py for why
each policy's depths then stay lossless (engine_budget.py; the production variant's
capacity search runs while the round before is on the device).

The other is the drafting gate of the scheduled policies (algorithm1, production), on
when the cost model charges drafting (a profiled `draft_time` > 0, or round times): each
round, before drafting, the host predicts the best speculative round from every slot's
survival, smoothed over its drafted rounds (a running mean per position stands in for
slots not drafted for yet) and scaled by the slot's accepted over predicted drafts and
by the gate's own record (accepted drafts over its estimates, on the rounds it drafted
because they paid), and runs a plain decoding round instead unless a speculative one is
predicted at least `gate_margin` (10%) faster (`scheduler.speculation_pays`;
engine_costs.py has the details, probes among them; engine_look.py: looks at new
requests; engine_foresight.py: verdicts reached while the round before runs). A round
that drafts drafts only for the slots worth it (the others verify nothing). On the CPU
the drafter ingests lazily (engine_ingest.py), so a plain round costs about what plain
decoding costs (on the CPU demo 2% more: it writes the feature log). After
`probe_every` plain rounds in a row one speculative round refreshes the estimates (the
wait doubles while probes keep finding speculation does not pay, up to `probe_cap`:
longer where probes are dear). A plain round is every depth at 0, chosen before the
drafts exist: lossless. The fixed policy with depth d < gamma drafts only d tokens (the
drafter's gamma is cut to d), so MTP-1 costs one drafted token, not a block. Where a window
of steps finds drafting did not save what carrying the drafter costs, a gated engine runs
plain decoding's programs for a span (dormant, engine_dormancy.py).

What a round costs (engine_costs.py): by default the target pass's SPS(B) plus a
drafting pass; after `engine.profile_rounds()` (or when the profile file holds them) the
engine's own measured round times, acceptance and host work included, and the measured
backlog flushes, which the gate adds to a drafted round's predicted time. The production
variant reads either as a step curve over the buckets, so it fills the bucket it pays
for. An opt-in refinement, learnt from finished rounds only (fixed before each round:
lossless): `recalibrate=True` reads the confidences through
`calibration.OnlineCorrection`, a per-position factor for greedy and for sampled rows
(STS is fitted at one temperature; greedy acceptance differs).

Paged mode (`Engine(..., paged=True, page_size=16, num_pages=N)`, Qwen3 targets): the
target cache is a `PagedKVCache` pool of N pages shared by all slots, attended with
`pallas_kernels.verify_attention` (`attention_impl` / `attention_interpret`: "auto" is
the jnp reference on CPU and the Pallas kernel on GPU / TPU). A host `PageAllocator`
reserves a request's pages at admission, for prompt + max_new_tokens + gamma + 1 tokens
(every position a round can write), so a running request never runs out; its pages go
back when it finishes. A request that does not fit in the free pages waits in the queue
(first come, first served: later requests do not overtake it) until finished requests
free enough; one that could never fit, even in an empty pool, fails at submit with a
one-line error. The page table reaches the device between rounds (a small device_put);
the drafter's cache stays slot-based. Paged mode admits by prefill passes only (no
chunked prefill yet).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import generation, profile_sps, slot_round, speculate, target
from dspark_jax.calibration import OnlineCorrection
from dspark_jax.engine_budget import BudgetChoice
from dspark_jax.engine_costs import GATE_MARGIN, SCHEDULED, RoundCostModel
from dspark_jax.engine_dormancy import DORMANCY_WINDOW, Dormancy
from dspark_jax.engine_foresight import Foresight
from dspark_jax.engine_ingest import LazyIngest
from dspark_jax.engine_look import LookAtNewRequests
from dspark_jax.engine_records import EngineMetrics, PendingRequest, RequestResult, TokenCallback, as_int, is_int
from dspark_jax.engine_profile import RoundProfiler
from dspark_jax.engine_slots import SlotAdmission
from dspark_jax.engine_step_costs import StepCosts
from dspark_jax.errors import DSparkError
from dspark_jax.paged_cache import PageAllocator, pages_needed
from dspark_jax.sampling import SamplingParams, validate

def drafter_has_confidence(drafter) -> bool:
    """Block drafters say so in their config; drafters without a config (test oracles)
    are trusted to return meaningful confidences."""
    cfg = getattr(drafter, "cfg", None)
    return cfg is None or bool(getattr(cfg, "has_confidence", False))


class Engine(SlotAdmission, RoundCostModel, StepCosts, Foresight, LookAtNewRequests, BudgetChoice, LazyIngest,
             RoundProfiler, Dormancy):
    """Fixed slots, slot-based caches of `max_len` positions, one policy for every round.

    policy: "none" (plain decoding; the drafter is ignored), "fixed" (depth `depth`,
    default gamma), "threshold" (verify while c_k >= `threshold`), "algorithm1" or
    "production" (need `sps`: an array indexed by B, a {B: steps/s} dict, or None to
    load / measure it with profile_sps, stored at `sps_file`). draft_time: seconds of one
    drafting pass for the scheduled policies' objective and gate (None: the profile's
    when it is measured here, else 0, which is the paper's objective and no gate).
    prefill_chunk: prompt tokens per round mixed into the verification pass while other
    slots decode (chunked prefill, packed targets; 0: a separate prefill pass instead).
    recalibrate: the scheduled policies correct the confidences online from observed
    acceptances (`calibration.OnlineCorrection`; default off: on the CPU demo runs, where
    deeper verification costs little, it verified less and lost throughput). rounds:
    measured round times ({"spec": {B: s}, "plain": {B: s}}, what `profile_rounds`
    returns) for the scheduled policies' objective and gate (None: the profile file's when
    it holds them, else the pass model). lazy_ingest: keep the target features of every
    cached position (speculate.FeatureLog: slots x max_len x the taps' width) and let the
    drafter ingest a slot's positions only when a round drafts for it (None: for the
    scheduled policies on the CPU, whose gate may not draft; on a GPU / TPU a small
    model's round costs its launches, and a flush is one more; False: every round ingests).
    learn_step_costs: the gate scales speculative rounds' predicted times by how much
    dearer than predicted, relative to plain ones, its steps have run so far, updated every
    step (`spec_cost_factor`; default: the factor is calibrated once, by
    `calibrate_step_costs` or `recall_gate`, engine_step_costs.py).
    gate_margin: how much faster than a plain round a speculative one must be predicted.
    dormancy: whether the engine may go dormant (None: when the gate is on);
    dormancy_window: steps without prompt work per dormancy verdict."""

    def __init__(self, tcfg, tparams, drafter=None, dparams=None, *, slots: int = 4, max_len: int = 256,
                 policy: str | None = None, depth: int | None = None, threshold: float = 0.5, sps=None,
                 sps_file: str | None = None, buckets: Sequence[int] | None = None, adaptive_budget: bool = True,
                 max_stop_ids: int = 8, mesh=None, clock: Callable[[], float] = time.perf_counter,
                 draft_time: float | None = None, probe_every: int = 16, prefill_chunk: int = 64,
                 recalibrate: bool = False, rounds: dict | None = None,
                 paged: bool = False, page_size: int = 16, num_pages: int | None = None,
                 attention_impl: str = "auto", attention_interpret: bool = False, lazy_ingest: bool | None = None,
                 learn_step_costs: bool = False, gate_margin: float = GATE_MARGIN, dormancy: bool | None = None,
                 dormancy_window: int = DORMANCY_WINDOW):
        policy = policy or ("none" if drafter is None else
                            "production" if drafter_has_confidence(drafter) else "fixed")
        if policy not in slot_round.POLICIES:
            raise DSparkError(f"unknown policy '{policy}' (choose from {', '.join(slot_round.POLICIES)})")
        if policy == "none":
            drafter, dparams = None, None
        elif drafter is None:
            raise DSparkError(f"policy '{policy}' needs a drafter")
        elif policy in ("threshold", "algorithm1", "production") and not drafter_has_confidence(drafter):
            raise DSparkError(f"policy '{policy}' needs drafter confidences; this drafter has no confidence "
                              "head (use policy 'fixed')")
        if slots < 1 or max_len < 2:
            raise DSparkError(f"need slots >= 1 and max_len >= 2; got {slots}, {max_len}")
        if max_len > tcfg.max_position_embeddings:
            raise DSparkError(f"max_len {max_len} exceeds the model's {tcfg.max_position_embeddings} positions")
        gamma = drafter.gamma if drafter is not None else 0
        self.depth = gamma if depth is None else int(depth)
        if not 0 <= self.depth <= gamma:
            raise DSparkError(f"depth must be in [0, gamma={gamma}]; got {depth}")
        if policy == "fixed" and 0 < self.depth < gamma and dataclasses.is_dataclass(drafter):
            drafter = dataclasses.replace(drafter, gamma=self.depth)  # draft only what is verified
        if probe_every < 1 or prefill_chunk < 0 or not 0.0 <= gate_margin < 1.0 or dormancy_window < 1:
            raise DSparkError(f"need probe_every >= 1, prefill_chunk >= 0, gate_margin in [0, 1) and "
                              f"dormancy_window >= 1; got {probe_every}, {prefill_chunk}, {gate_margin}, "
                              f"{dormancy_window}")
        self.tcfg, self.drafter, self.policy = tcfg, drafter, policy
        self.gamma = drafter.gamma if drafter is not None else 0
        self.slots, self.max_len, self.max_stop_ids = slots, max_len, max_stop_ids
        self.threshold, self.adaptive_budget, self.clock = float(threshold), adaptive_budget, clock
        self.full_budget = slots * (1 + self.gamma)
        self.buckets = tuple(sorted(set(int(b) for b in (buckets or profile_sps.budget_buckets(slots, self.gamma)))))
        if self.buckets[-1] < self.full_budget or self.buckets[0] < 1:
            raise DSparkError(f"buckets must be >= 1 and reach slots x (1 + gamma) = {self.full_budget}")
        if paged and mesh is not None:
            raise DSparkError("the paged engine does not support a mesh yet (use paged=False)")
        if mesh is not None:
            tparams = target.shard(tcfg, tparams, mesh)
            dparams = drafter.shard(dparams, mesh) if drafter is not None else None
        else:  # on the device once, not copied there by every round (host arrays would be)
            tparams, dparams = jax.device_put((tparams, dparams))
        self.tparams, self.dparams, self.mesh = tparams, dparams, mesh
        self._pass_sps, profiled_draft, record = self._resolve_sps(sps, sps_file)
        self._pass_draft_time = float(profiled_draft if draft_time is None else draft_time)
        if not np.isfinite(self._pass_draft_time) or self._pass_draft_time < 0:
            raise DSparkError(f"draft_time must be >= 0 seconds; got {draft_time}")
        if rounds is None and record is not None:
            rounds = profile_sps.stored_rounds(record, policy, self.buckets, self.plain_buckets)
        self._apply_costs(rounds if policy in SCHEDULED else None)
        self.probe_every = int(probe_every)
        self.learn_step_costs, self.gate_margin = bool(learn_step_costs), float(gate_margin)
        self.prefill_chunk = int(prefill_chunk)
        self.mixing = self.prefill_chunk > 0 and target.supports_packed(tcfg) and not paged
        self._threshold_dev = jnp.asarray(self.threshold, jnp.float32)

        self.paged = bool(paged)
        self.allocator: PageAllocator | None = None
        self._table_dirty = False
        if self.paged:
            cache = self._init_paged(page_size, num_pages, attention_impl, attention_interpret)
        else:
            cache = target.init_cache(tcfg, slots, max_len)
        if mesh is not None:
            cache = target.shard_cache(cache, mesh)
        self._state = speculate.DecodeState(
            cache=cache, draft_cache=drafter.init_cache(slots, max_len) if drafter is not None else None,
            anchor=jnp.zeros((slots,), jnp.int32), keys=jax.vmap(jax.random.key)(jnp.arange(slots, dtype=jnp.uint32)),
            done=jnp.ones((slots,), bool), out=jnp.zeros((slots, max_len), jnp.int32),
            n_out=jnp.zeros((slots,), jnp.int32), max_new=jnp.ones((slots,), jnp.int32),
            stop_ids=jnp.full((slots, max_stop_ids), -1, jnp.int32), sampling=SamplingParams.make(slots))
        self._stale = jnp.zeros((2, slots, self.gamma), jnp.float32)
        lazy = policy in SCHEDULED and jax.default_backend() == "cpu"  # the default (lazy_ingest above)
        self._init_gate(lazy if lazy_ingest is None else bool(lazy_ingest))
        self._init_dormancy(dormancy, dormancy_window)
        # host mirrors of per-slot facts the budget choice and admission need
        self._stale_host = np.zeros((2, slots, self.gamma), np.float32)
        self._slot_req: list[PendingRequest | None] = [None] * slots
        self._n_out = np.zeros(slots, np.int64)
        self._temp = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._max_new = np.ones(slots, np.int32)
        self._stops = np.full((slots, max_stop_ids), -1, np.int32)
        self._max_depth = np.zeros(slots, np.int32)
        self._max_depth_dev: jax.Array | None = None  # its device copy: the limits x the slots drafted for
        self._max_depth_sent: np.ndarray | None = None  # what that copy holds (None: nothing sent yet)
        self._last_round: tuple[int, int] | None = None  # (active slots, verified B)
        # each slot's survival, smoothed over its drafted rounds: it predicts the next round's
        # committed tokens better than the last round's survival alone (the drafting gate reads it)
        self._recent = np.zeros((slots, self.gamma), np.float32)
        self._prior: np.ndarray | None = None  # running mean survival per position (drafted rounds)
        self._prior_dev = jnp.zeros((self.gamma,), jnp.float32)  # its device copy (zeros until known)
        self._prior_synced = True  # whether that copy holds the prior (`_sync_prior`)
        scheduled = policy in SCHEDULED and self.gamma > 0
        self.correction = OnlineCorrection(self.gamma) if scheduled and recalibrate else None
        self._conf_scale_dev = jnp.ones((2, self.gamma), jnp.float32) if self.correction is not None else None
        self._prefill_at = np.zeros(slots, np.int64)  # prompt tokens in the cache, for chunked prefill
        self._prefilling: list[int] = []  # slots whose prompt is entering chunk by chunk, in arrival order
        self._waiting: collections.deque[PendingRequest] = collections.deque()
        self._next_id = 0
        self.results: dict[int, RequestResult] = {}
        self.metrics = EngineMetrics()

    # ---------------------------------------------------------------- requests

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
               max_depth: int | None = None, on_tokens: TokenCallback | None = None) -> int:
        """Queue a request; returns its id. A bad request is not raised: its result is
        finished at once with a one-line `error`, and the engine serves the others."""
        rid = self._next_id
        self._next_id += 1
        prompt = list(prompt_ids) if prompt_ids is not None else []
        res = RequestResult(rid, len(prompt), int(max_new_tokens) if is_int(max_new_tokens) else 0,
                            accepted_per_position=[0] * self.gamma, submitted_at=self.clock())
        self.results[rid] = res
        try:
            prompt, stops, depth = self._validate(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                                  stop_ids, max_depth)
        except DSparkError as e:
            res.error, res.finished, res.finished_at = " ".join(str(e).split()), True, self.clock()
            if on_tokens is not None:
                on_tokens(rid, [], True)
            return rid
        self._waiting.append(PendingRequest(res, prompt, float(temperature), int(top_k), float(top_p), int(seed),
                                      stops, depth, on_tokens))
        return rid

    def _validate(self, prompt, max_new, temperature, top_k, top_p, seed, stop_ids, max_depth):
        try:
            prompt = [operator.index(t) for t in prompt]
            stops = tuple(operator.index(t) for t in stop_ids)
            max_new, top_k, seed = as_int(max_new, "max_new_tokens"), as_int(top_k, "top-k"), as_int(seed, "seed")
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError) as e:
            raise DSparkError(f"bad request field: {e}") from None
        generation.validate_request(prompt, self.tcfg.vocab_size, max_new, self._next_id - 1)
        if len(prompt) + max_new > self.max_len:
            raise DSparkError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the engine's "
                              f"max length {self.max_len}")
        if self.paged:
            need = pages_needed(self._reserve_tokens(len(prompt), max_new), self.allocator.page_size)
            if need > self.allocator.capacity:
                raise DSparkError(f"request needs {need} KV cache pages but the whole pool has "
                                  f"{self.allocator.capacity} (enlarge num_pages)")
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

    @property
    def idle(self) -> bool:
        return not self._waiting and all(r is None for r in self._slot_req)

    def result(self, request_id: int) -> RequestResult:
        return self.results[request_id]

    # ---------------------------------------------------------------- the loop

    def step(self) -> bool:
        """Admit waiting requests, then one round over the active slots. Returns whether
        anything ran."""
        now = start = self.clock()
        if self.metrics.started_at is None and not self.idle:
            self.metrics.started_at = now
        self._maybe_wake()  # (engine_dormancy.py)
        admitted, first = self._admit(now)
        for s in admitted:  # their prompt is in the cache, not yet in the drafter's (lazy ingest)
            self._lag[s] = len(self._slot_req[s].prompt)
        if self._table_dirty:  # finished rows' pages went back: clear their rows on device
            self._sync_page_table()
        occupied = [s for s, r in enumerate(self._slot_req) if r is not None and s not in self._prefilling]
        if not occupied:
            return False
        adm, plan = self._plan_chunks()
        dormant = self.dormant
        draft = (not dormant and not self._unlogged[occupied].all() and not self._plain_wanted(occupied)
                 and self.should_draft(occupied))
        drafted = self._prepare_round(draft, occupied)
        budget = self.choose_budget(occupied) if draft else self._bucket(len(occupied))
        info = self._round(budget, draft, adm)
        if not dormant:
            self.foresee(occupied, draft, plan)  # the next verdict (and budget), while the device runs this round
        if draft:
            self.foresee_budget(occupied)
        first, info = jax.device_get((first, info))
        self._lag = np.array(info.lag, np.int64)
        now = self.clock()
        for s in admitted:
            self._emit(s, [int(first[s])], now)
        started = self._advance_chunks(plan)
        for s in started:
            self._emit(s, [int(info.first[s])], now)
        n_active = int(np.sum(info.active))
        m = self.metrics
        if draft:
            self._stale_host = np.stack([self._stale_host[1], info.survival])
            self._last_round = (n_active, int(info.verified))
            self._learn_survival(drafted, info)
            self._learn_acceptance(drafted, info)
            self._learn_correction(drafted, info)
        else:
            m.plain_rounds += 1
            m.dormant_rounds += dormant
        self._plain_streak = 0 if draft else self._plain_streak + 1
        m.rounds, m.verified, m.budget, m.active = (m.rounds + 1, m.verified + int(info.verified),
                                                    m.budget + budget, m.active + n_active)
        m.prefill_chunks += len(plan)
        for s in occupied + started:
            req = self._slot_req[s]
            if info.active[s]:
                res = req.result
                res.rounds += 1
                res.verified_per_round.append(1 + int(info.depth[s]))
                for k in range(int(info.accepted[s])):
                    res.accepted_per_position[k] += 1
                self._n_out[s] += int(info.appended[s])
                self._emit(s, info.tokens[s, :info.appended[s]].tolist(), now)
            if info.done[s]:
                self._finish(s, now)
        m.last_at = now
        seconds = None if admitted or plan else self.clock() - start  # timed: steps without prompt work
        if seconds is not None and not dormant:  # what it took against its prediction
            self._observe_step(draft, budget, len(occupied), seconds)
        self._observe_dormancy(draft, occupied, n_active, int(np.sum(info.appended[info.active])), seconds)
        return True

    def run_until_done(self, max_steps: int | None = None) -> list[RequestResult]:
        """Step until nothing waits or runs; returns every request's result, by id."""
        steps = 0
        while not self.idle and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return [self.results[i] for i in sorted(self.results)]

    def _depth_limits(self, idx: np.ndarray, ahead: int = 0) -> np.ndarray:
        """Each slot's depth limit this round: its own max_depth and the room it has left
        (ahead: after that many more tokens)."""
        room = np.minimum(self._max_depth[idx], self._max_new[idx] - self._n_out[idx] - 1 - ahead)
        return np.maximum(np.minimum(room, self.gamma), 0)  # (np.clip is slower on small arrays)

    def _learn_correction(self, occupied: Sequence[int], info) -> None:
        """Feed the round's verified outcomes to the online confidence correction."""
        if self.correction is None:
            return
        idx = np.asarray([s for s in occupied if info.active[s]], np.int64)
        self.correction.update(info.confidence[idx], info.accepted[idx], info.depth[idx], self._temp[idx] > 0)
        self._conf_scale_dev = jax.device_put(np.asarray(self.correction.scale, np.float32))

    def warmup(self, prompt_lens: Sequence[int] = (1,), greedy: bool | None = None,
               prefills: Sequence[Sequence[int]] | None = None) -> None:
        """Compile every budget bucket's round (and the gate's plain rounds; each also with
        a chunked-prefill line) and the prefill for these prompt lengths at every packed
        budget (only while idle: the rounds run over empty slots and change nothing), and
        an engine that may go dormant its dormant ones. greedy: the programs of all-greedy
        batches (True), of batches with a sampled request (False), or both (None: mixed
        traffic switches between them). prefills: instead, only the prefill passes that
        admit these prompt lengths together (one list per pass)."""
        if not self.idle:
            raise DSparkError("warmup needs an idle engine")
        if greedy is None:
            for flavour in (True, False):
                self.warmup(prompt_lens, flavour, prefills)
            return
        for dormant in (False, True) if self.dormancy else (False,):  # (engine_dormancy.py)
            with self._mode(dormant):
                self._warm(self._prefill_passes(prompt_lens, prefills), greedy)

    def _warm(self, passes: Sequence[tuple[int, int]], greedy: bool) -> None:
        s = self.slots
        for width, budget in passes:
            self._state, self._stale, _ = self._run_admit(np.zeros(s, bool), np.zeros((s, width), np.int32),
                                                          np.ones(s, np.int32), np.zeros(s, np.uint32), budget,
                                                          greedy=greedy)
        rounds = [(b, True) for b in self.buckets] if not self.dormant else []
        if self.gated or self.dormant:
            rounds += [(b, False) for b in self.plain_buckets]
        chunks = [None] + ([self._empty_admission(greedy)] if self.mixing else [])
        for (b, draft), adm in itertools.product(rounds, chunks):
            self._round(b, draft, adm, greedy)
        self._warm_flushes()
        jax.block_until_ready(self._state.anchor)

    # ---------------------------------------------------------------- internals

    def _round(self, budget: int, draft: bool, admission=None, greedy: bool | None = None):
        """One `slot_round.engine_round` over the slots (state updated in place) -> its info.
        When every seated request is greedy the round is the greedy program (argmax draws,
        no keys split; SamplingParams.greedy); an admission line carries the same promise.
        greedy: that choice (None: from the seated requests; warmup compiles either)."""
        sampling = self._state.sampling.promise_greedy(self._promise(greedy))
        if sampling is not self._state.sampling:
            self._state = self._state.replace(sampling=sampling)
        if self.dormant:  # plain decoding's own compiled program (its engine's rounds: no drafter, gamma 0)
            if draft:
                raise DSparkError("a dormant engine cannot run a drafted round")
            self._state, self._bare_stale, info = slot_round.engine_round(
                self.tcfg, None, 0, budget, "none", self.tparams, None, self._state, self._bare_stale,
                self._bare_schedule, draft=True, admission=admission)
            return info
        # a plain round with a feature log (lazy ingest) never reads the drafter's weights or
        # cache: they stay out of the call
        bare = not draft and self._state.log is not None
        dparams, state = (None, self._state.replace(draft_cache=None)) if bare else (self.dparams, self._state)
        state, self._stale, info = slot_round.engine_round(
            self.tcfg, self.drafter, self.gamma, budget, self.policy, self.tparams, dparams,
            state, self._stale, self._schedule(), draft=draft, admission=admission)
        self._state = state.replace(draft_cache=self._state.draft_cache) if bare else state
        return info

    def _schedule(self) -> slot_round.Schedule:
        limits = np.where(self._drafting, self._max_depth, 0).astype(np.int32)  # 0: not drafted for
        if self._max_depth_sent is None or not np.array_equal(limits, self._max_depth_sent):
            self._max_depth_dev, self._max_depth_sent = jax.device_put(limits), limits
        return slot_round.Schedule(sps=self._sps_dev, max_depth=self._max_depth_dev,
                                  threshold=self._threshold_dev, draft_time=self._draft_time_dev,
                                  prior=self._prior_dev, conf_scale=self._conf_scale_dev)

    def _prior_or_zeros(self) -> np.ndarray:
        return self._prior.astype(np.float32) if self._prior is not None else np.zeros(self.gamma, np.float32)

    def _upload_costs(self) -> None:
        self._sps_dev = jnp.asarray(self.sps)
        self._draft_time_dev = jnp.asarray(self.draft_time, jnp.float32)

    def _emit(self, slot: int, tokens: list, now: float) -> None:
        req = self._slot_req[slot]
        if not tokens:
            return
        res = req.result
        if res.first_token_at is None:
            res.first_token_at = now
        res.token_ids.extend(tokens)
        self.metrics.tokens += len(tokens)
        if req.on_tokens is not None:
            req.on_tokens(res.request_id, list(tokens), False)

    def _finish(self, slot: int, now: float) -> None:
        req = self._slot_req[slot]
        req.result.finished, req.result.finished_at = True, now
        self._remember_request(slot)
        self._slot_req[slot] = None
        self._release_pages(req)
        if req.on_tokens is not None:
            req.on_tokens(req.result.request_id, [], True)
