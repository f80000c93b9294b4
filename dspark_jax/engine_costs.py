"""What a round costs, as the engine's scheduled policies see it, and the drafting gate.

Two cost models feed Algorithm 1, the production variant and the gate:

- the pass model (always there): SPS(B) of the target's verification pass and one
  drafting pass's seconds, both from profile_sps; a speculative round at budget B is
  predicted to take draft_time + 1 / SPS(B), a plain round with R rows 1 / SPS(R);
- the round profile (`Engine.profile_rounds`, engine_profile.py, or stored in the
  profile file): the engine's own compiled rounds timed at every bucket, speculative
  and plain, the backlog flushes of lazy ingest at every compiled shape (the gate adds
  the flush a drafted round needs to its predicted time) and the host work of a drafted
  step (added likewise). A round is
  more than its passes: acceptance, the drafter's ingest of committed positions, reading
  the round's summary back and the host's bookkeeping. On the CPU demo these add ~5 ms
  to a 13 ms prediction at 4 slots, and a model that misses them verifies too little
  and drafts when a plain round would be faster. With a round profile the objective is
  Theta = tau* x rounds/s(B), with no separate drafting term.

Whatever the model, a round at budget B runs its bucket's static-shape program, so it
costs what that bucket costs. The production variant's global search reads the rates
as that step curve (profile_sps.at_buckets): its capacity then lands on a bucket's edge
and the padding of the chosen bucket is verified rather than wasted. Algorithm 1's early
stop needs a curve without steps (it would stop at the first bucket edge), so it reads
the rates interpolated linearly between buckets. Plain rounds always run at the bucket
of their row count.

The gate also picks the slots a drafted round drafts for: those with a draft among the
top-K candidates of its estimates (scheduler.rows_worth_drafting); a probe drafts for
all. With lazy ingest (engine_ingest.py, the scheduled policies' default on the CPU) a
drafted round first flushes the backlog of the slots it drafts for.

While a round drafted because it paid, or a plain round that changes the batch, runs on
the device, the host reaches the next round's verdict (engine_foresight.py). The look at
new requests, which a verdict may weigh, is in engine_look.py.

The gate scales the predicted speculative costs by a factor calibrated on what the
engine's drafted steps took against plain ones (engine_step_costs.py).

What the gate learns about the traffic (not about the seated requests) moves between
engines: `gate_memory` / `recall_gate` (a restarted server; the load bench's timed runs
after their warm-up run).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from dspark_jax import profile_sps, scheduler
from dspark_jax.errors import DSparkError

SCHEDULED = ("algorithm1", "production")
ACCEPTANCE_PRIOR = 4.0  # predicted drafts' worth of the all-slot ratio in a slot's acceptance ratio
# per round since a slot was last drafted for, the gate keeps this share of its smoothed
# survival's distance from the request's own mean: the rounds the gate skips teach it
# nothing, and a request's survival drifts around its mean (replayed with the H200 demo's
# round profile at one slot, a request the gate stopped drafting for stayed undrafted to its
# end: 28% of rounds drafted, where estimates refreshed every round found 51% paying)
STALE_KEEP = 0.8
# drafted rounds' worth of the running mean in a request's own mean survival (the
# running mean is of drafted rounds, which the gate picks: relaxing towards it alone made
# the gate redraft the CPU demo's code and prose requests at 2 slots, where none paid)
OWN_MEAN_PRIOR = 2.0
# a verdict to draft needs a speculative round predicted this much faster than a plain one:
# closer calls are coin flips of the cost model (round times over idle slots, estimates
# that regress) that still pay a drafted round's flush; on the CPU demo at 4 slots, rounds
# drafted without a margin made 0.8-0.9x a plain round's tokens/s
GATE_MARGIN = 0.1
# the most of the predicted time that probes finding nothing may cost (`probe_cap`): on the
# CPU demo a probe over 4 slots (a full-budget round and the backlogs' flush) costs 3.7
# plain rounds, and at the old fixed wait of 128 rounds probes were 2% of the time
PROBE_SHARE = 0.01


class RoundCostModel:
    """Mixin of `Engine`: the scheduled policies' cost curves, their measurement and the
    drafting gate. Expects the engine's policy, slots, gamma, buckets and round state."""

    def _resolve_sps(self, sps, sps_file) -> tuple[np.ndarray, float, dict | None]:
        """(pass SPS at every budget, the profiled drafting seconds (0 when none was
        profiled), the profile record when it came from a file)."""
        bmax = self.full_budget
        self._profile_ref = None
        if sps is None and self.policy not in SCHEDULED:
            return np.ones(bmax + 1, np.float32), 0.0, None  # unused by the other policies
        draft_seconds, rec = 0.0, None
        if sps is None:
            sps, rec = profile_sps.load_or_profile(
                self.tcfg, self.tparams, slots=self.slots, gamma=self.gamma, max_len=self.max_len,
                buckets=self.buckets, tap_layers=self.drafter.tap_layers, mesh=self.mesh, path=sps_file,
                drafter=self.drafter if self.dparams is not None else None, dparams=self.dparams)
            draft_seconds = float(rec.get("draft_seconds", 0.0))
            self._profile_ref = (sps_file or profile_sps.default_path(), rec["key"])
        elif isinstance(sps, dict):
            sps = profile_sps.interpolate(sps, bmax)
        sps = np.asarray(sps, np.float32).reshape(-1)
        if len(sps) < bmax + 1:  # a shorter table ends there (later budgets are never chosen)
            sps = np.concatenate([sps, np.zeros(bmax + 1 - len(sps), np.float32)])
        return sps[:bmax + 1], draft_seconds, rec

    @property
    def plain_buckets(self) -> tuple[int, ...]:
        """The buckets plain rounds run at: one per active-row count."""
        return tuple(sorted({self._bucket(n) for n in range(1, self.slots + 1)}))

    def _apply_costs(self, rounds: dict | None) -> None:
        """Set the curves the scheduled policies read: from measured `rounds` ({"spec":
        {B: s}, "plain": {B: s}}) when given, else from the pass model."""
        bmax = self.full_budget
        if rounds is not None:
            missing = [b for b in self.buckets if b not in rounds["spec"]]
            missing += [b for b in self.plain_buckets if b not in rounds["plain"]]
            if missing:
                raise DSparkError(f"the round profile has no time for bucket {missing[0]}")
            spec = profile_sps.interpolate({b: 1.0 / t for b, t in rounds["spec"].items()}, bmax)
            plain = np.zeros(bmax + 1, np.float32)
            for b, t in rounds["plain"].items():
                plain[int(b)] = 1.0 / t
            draft_time = 0.0
        else:
            spec, plain, draft_time = self._pass_sps, self._pass_sps, self._pass_draft_time
        self._flush_cost = {tuple(map(int, k)): float(t) for k, t in (rounds or {}).get("flush", {}).items()}
        self._host_time = float((rounds or {}).get("host", 0.0))
        self.rounds = rounds
        self.draft_time = float(draft_time)
        self.sps = profile_sps.at_buckets(spec, self.buckets) if self.policy == "production" else spec
        self.plain_sps = profile_sps.at_buckets(plain, self.plain_buckets)[:self.slots + 1]
        self.gated = self.policy in SCHEDULED and self.gamma > 0 and (draft_time > 0 or rounds is not None)
        self._verdict_key = self._foreseen = None  # the gate decides afresh on the new costs
        self._look_memo = {}
        self._upload_costs()

    def should_draft(self, occupied: Sequence[int]) -> bool:
        """The drafting gate: draft unless a plain round is predicted faster (from earlier
        rounds only). Always True for ungated policies.

        The estimate is each slot's smoothed survival, scaled by the acceptance seen
        against the acceptance the survival predicted (`slot_acceptance_ratio`), then by
        the gate's own record on the rounds it drafted because they paid
        (`gate_accuracy`: it drafts when its estimates are high, and they regress). A streak
        of plain rounds is broken by a probe (a speculative round) after `probe_every`
        rounds; when the probe does not change the verdict the next one waits twice as
        long (up to `probe_cap`), and a probe that finds speculation paying resets
        the wait. A drafted round's predicted time includes the flush of the backlogs it
        needs (`_flush_seconds`). Slots never drafted for get a look (a drafted round
        for them) when what it may find is worth what it costs (`_look_pays`). A verdict
        to draft also names the slots worth drafting for (`_chosen`; a probe: all). The
        verdict is kept until its inputs change (a drafted round, a seat, a departure),
        a verdict to draft also until the slots' room left changes; meanwhile backlogs
        only grow and requests' room and tokens left only shrink, which only make
        drafting dearer and a look worth less, so a verdict not to draft stands (its
        recomputation, every round in a crowded batch where some request nears its end,
        cost about 4% of a plain round on the CPU demo) until the plain streak reaches 2,
        8, 32 or 128 rounds (the estimates of slots not drafted for relax towards their
        request's own mean: `_gate_estimates`). A verdict `foresee` reached while the
        round before ran (one drafted because it paid, or a plain round after which
        the batch changes) is taken up instead when it is for this batch
        (`_take_foreseen`, engine_foresight.py)."""
        self._chosen, self._paid_round = None, False
        if not self.gated or self._prior is None:
            return True
        if self._plain_streak >= self._probe_gap:
            self._probed = True
            return True
        key = self._gate_key(occupied, self._plain_streak)
        if not self._take_foreseen(occupied, key):
            pays, look, _ = self._verdict
            if key != self._verdict_key or pays or look:  # a standing no needs no arrays (every plain step)
                idx = np.asarray(occupied)
                limits = self._depth_limits(idx)
                if key != self._verdict_key or not np.array_equal(limits, self._verdict_limits):
                    self._verdict_key, self._verdict_limits = key, limits
                    pays, look, chosen, raw = self._verdicts(idx, limits)
                    self._verdict, self._verdict_raw[idx] = (pays, look, chosen), raw
        pays, look, chosen = self._verdict
        if self._probed:  # a probe ran last round: it found speculation paying again, or not
            self._probe_gap = self.probe_every if pays else min(2 * self._probe_gap, self.probe_cap)
        self._probed = False
        if pays or look:
            self._chosen, self._paid_round = chosen, pays
        return pays or look

    @property
    def probe_cap(self) -> int:
        """The longest wait between probes, in plain rounds: 8 x probe_every, or longer
        where a probe is dear next to a plain round, so that probes finding nothing cost
        at most PROBE_SHARE of the predicted time. A probe's cost is its predicted round
        at the full budget (with the widest backlog flush profiled and a drafted step's
        host work) less a plain round over every slot. The GPU demo's probes cost 0.3
        plain rounds (the wait stays 8 x probe_every), the CPU demo's 2-4 (200-400)."""
        plain_rate = self.plain_sps[self.slots]
        sps, extra = self._spec_costs(max(self._flush_cost.values(), default=0.0))
        if not (plain_rate > 0 and sps[self.full_budget] > 0):
            return 8 * self.probe_every
        plain = 1.0 / plain_rate
        dearer = 1.0 / sps[self.full_budget] + extra - plain
        return max(8 * self.probe_every, int(np.ceil(dearer / (PROBE_SHARE * plain))))

    def _gate_key(self, occupied: Sequence[int], streak: int) -> tuple:
        """What a verdict is reached on, beyond the estimates: the slots and their
        requests ((slot, request id) pairs: a request seated where another left is a new
        batch, one still prefilling is not in it), the cost factor, and the plain streak's
        length in powers of 4 (`_gate_estimates` relaxes the estimates of slots not
        drafted for, so a verdict not to draft is looked at again after 2, 8, 32 and 128
        plain rounds; at every doubling it cost 5% of the CPU demo's time at one slot)."""
        return self._batch_key(occupied), round(self.spec_cost_factor, 2) if self.learn_step_costs else 1.0, \
            int(streak).bit_length() // 2

    def _batch_key(self, occupied: Sequence[int]) -> tuple:
        """The batch as (slot, request id) pairs (-1: no request), which the gate's
        verdicts and the production variant's foreseen capacity are keyed by."""
        return tuple((s, r.result.request_id if (r := self._slot_req[s]) is not None else -1) for s in occupied)

    def _verdicts(self, idx: np.ndarray, limits: np.ndarray,
                  ahead: int = 0) -> tuple[bool, bool, np.ndarray, np.ndarray]:
        """(whether speculation pays on the slots' estimates (the flush it needs
        included), whether a look at the slots never drafted for is worth it (when they
        are at least half of the batch: `_look_pays`), the slots worth drafting for on
        those estimates (a look: with the new ones), the estimates read (before
        gate_accuracy)). limits: the slots' depth limits; ahead: for the round that many
        rounds on (`_gate_estimates`)."""
        raw, fresh = self._gate_estimates(idx, limits, ahead)
        est = np.minimum(1.0, raw * self.gate_accuracy)
        chosen = idx[self._worth(est)]
        if self._pays(est, self._flush_seconds(chosen)):
            return True, False, chosen, raw
        if 2 * fresh.sum() < len(idx) or not self._past_estimates:  # new requests: too few to matter
            return False, False, idx[:0], raw
        live = np.arange(self.gamma)[None, :] < limits[fresh][:, None]
        look, worth = self._look_pays(idx, est, fresh, live)
        return False, look, idx[worth | fresh] if look else idx[:0], raw

    def _worth(self, est: np.ndarray) -> np.ndarray:
        return scheduler.rows_worth_drafting(est, self.sps, draft_time=self.draft_time)

    def _spec_costs(self, flush: float = 0.0) -> tuple[np.ndarray, float]:
        """(the speculative rates, the seconds a speculative round costs beyond them) as the
        gate predicts them, `flush` seconds of backlog flush and the host work a drafted
        step adds (the round profile's "host") included."""
        f = self.spec_cost_factor
        return self.sps / f, (self.draft_time + flush + self._host_time) * f

    def _pays(self, est: np.ndarray, flush: float = 0.0) -> bool:
        sps, extra = self._spec_costs(flush)
        return scheduler.speculation_pays(est, sps, draft_time=extra, plain_sps=self.plain_sps,
                                          margin=self.gate_margin)[0]

    def _flush_seconds(self, slots: Sequence[int]) -> float:
        """The predicted seconds of the backlog flush a round drafting for `slots` runs
        first (`_flush`), from the round profile (0 without one)."""
        plan = self._flush_plan(slots)
        return 0.0 if plan is None else self._flush_cost.get((len(plan[1]), plan[2]), 0.0)

    def _gate_estimates(self, idx: np.ndarray, limits: np.ndarray | None = None,
                        ahead: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(survival the gate expects of slots idx next round [n, G], which of them were
        never drafted for): the smoothed survival (the running mean for those never drafted
        for), moved towards the request's own mean survival (shrunk towards the running
        mean by OWN_MEAN_PRIOR rounds' worth of it) by STALE_KEEP per round since the slot
        was last drafted for, x the slot's acceptance ratio, clipped to 1 and masked to its
        live positions (limits: the slots' depth limits, None: computed here; ahead: the
        estimates `ahead` rounds on, when no round between drafts)."""
        est = self._recent[idx].astype(np.float64)
        fresh = est.max(axis=1) <= 0
        est[fresh] = self._prior
        idle = np.maximum(self.metrics.rounds + ahead - self._last_drafted[idx] - 1, 0)
        total, count = self._own_survival[:, idx]
        mean = (total + OWN_MEAN_PRIOR * self._prior) / (count + OWN_MEAN_PRIOR)
        est = mean + (est - mean) * (STALE_KEEP ** idle)[:, None]
        est = np.minimum(1.0, est * self.slot_acceptance_ratio(idx)[:, None])
        limits = self._depth_limits(idx) if limits is None else limits
        return est * (np.arange(self.gamma)[None, :] < limits[:, None]), fresh

    def _learn_survival(self, occupied: Sequence[int], info) -> None:
        """Fold the round's survival into each drafted slot's smoothed survival (a slot's
        first drafted round is taken as is: requests differ, and the running mean would
        outweigh the slot's own rounds for long) and into the running per-position mean."""
        idx = np.asarray([s for s in occupied if info.active[s]], np.int64)
        if not len(idx) or self.gamma == 0:
            return
        surv = np.asarray(info.survival[idx], np.float64)
        live = np.arange(self.gamma)[None, :] < self._depth_limits(idx)[:, None]
        prev = self._recent[idx].astype(np.float64)
        fresh = prev.max(axis=1, keepdims=True) <= 0
        base = np.where(fresh, self._prior if self._prior is not None else surv, prev)  # kept where not live
        self._recent[idx] = np.where(live, np.where(fresh, surv, 0.8 * prev + 0.2 * surv), base)
        self._last_drafted[idx] = self.metrics.rounds
        self._own_survival[:, idx] += np.stack([surv * live, live])
        counts = live.sum(axis=0)
        if not counts.any():
            return
        mean = np.where(counts > 0, (surv * live).sum(axis=0) / np.maximum(counts, 1), 0.0)
        if self._prior is None:
            self._set_prior(np.where(counts > 0, mean, 0.0))
        else:
            self._set_prior(np.where(counts > 0, 0.8 * self._prior + 0.2 * mean, self._prior))

    def _learn_acceptance(self, occupied: Sequence[int], info) -> None:
        """Tally a drafted round's accepted drafts against those its survival predicted at
        the verified depths (sums decayed by 0.9 a round), over all slots and per slot:
        the gate's check on the confidences, which the drafter's calibration data may not
        match, and which differ between requests (by domain)."""
        idx = np.asarray([s for s in occupied if info.active[s]], np.int64)
        if not len(idx) or self.gamma == 0:
            return
        verified = np.arange(self.gamma)[None, :] < np.asarray(info.depth[idx])[:, None]
        expected = (np.asarray(info.survival[idx], np.float64) * verified).sum(axis=1)
        seen = np.asarray(info.accepted[idx], np.float64)
        self._acc_expected = 0.9 * self._acc_expected + float(expected.sum())
        self._acc_seen = 0.9 * self._acc_seen + float(seen.sum())
        self._slot_acc[idx] = 0.9 * self._slot_acc[idx] + np.stack([seen, expected], axis=1)
        if self._paid_round:  # the gate's own estimate, at the depths the round verified
            gate = (self._verdict_raw[idx] * verified).sum()
            self._paid_acc = 0.9 * self._paid_acc + (float(seen.sum()), float(gate))
        self._verdict_key = None

    @property
    def gate_accuracy(self) -> float:
        """Accepted drafts seen / predicted by the gate's estimates, over recent rounds it
        drafted because they paid (shrunk towards 1 by ACCEPTANCE_PRIOR drafts' worth;
        clipped to [0.25, 1.5]); the gate scales its estimates by it. The gate drafts
        when its estimates are high, and those regress (on the CPU demo at c=8: 9.05
        accepted drafts predicted per such round, 7.40 seen), which the per-slot ratios,
        measured over every drafted round, do not see. It counts tokens, not time, so the
        verdicts stay reproducible."""
        seen, gate = self._paid_acc
        k = ACCEPTANCE_PRIOR
        return float(np.clip((seen + k) / (gate + k), 0.25, 1.5))

    @property
    def acceptance_ratio(self) -> float:
        """Accepted drafts seen / predicted by the survival, over recent drafted rounds of
        every slot (1 before any)."""
        return self._acc_seen / self._acc_expected if self._acc_expected > 0 else 1.0

    def slot_acceptance_ratio(self, idx: np.ndarray) -> np.ndarray:
        """Each slot's accepted / predicted drafts since it was seated, shrunk towards the
        all-slot ratio by ACCEPTANCE_PRIOR predicted drafts' worth of it."""
        seen, expected = np.asarray(self._slot_acc[idx], np.float64).T
        k = ACCEPTANCE_PRIOR
        return (seen + k * self.acceptance_ratio) / (expected + k)

    def _remember_request(self, slot: int) -> None:
        """A finishing request's gate estimate joins those `_past_quantiles` reads
        (requests never drafted for tell nothing and are left out)."""
        if self.gated and self._slot_acc[slot, 1] > 0:
            ratio = self.slot_acceptance_ratio(np.asarray([slot]))[0]
            self._remember([np.minimum(1.0, self._recent[slot].astype(np.float64) * ratio)])
        self._verdict_key = None

    # ------------------------------------------------ the gate's memory of the traffic

    def gate_memory(self) -> dict:
        """What the gate has learnt about the traffic rather than about the requests
        seated now: the running mean survival per position, the finished requests'
        estimates (what a look expects of a new request), the acceptance ratios, its own
        record on the rounds it drafted because they paid, the probe wait and what its
        steps took against their predictions (engine_step_costs.py). Another engine of
        the same drafter takes it up with `recall_gate`: a restarted server, or a
        benchmark's timed run after its warm-up run, starts where the traffic left it
        instead of drafting blind (a first round always drafts when nothing is known, and
        looks at new requests need finished ones). Copies."""
        return {"gamma": self.gamma, "prior": None if self._prior is None else self._prior.copy(),
                "past_estimates": [e.copy() for e in self._past_estimates],
                "acceptance": (self._acc_seen, self._acc_expected), "paid": self._paid_acc.copy(),
                "probe_gap": self._probe_gap, **self._step_cost_memory(), **self._dormancy_memory()}

    def recall_gate(self, memory: dict) -> None:
        """Take up another engine's `gate_memory` (same drafter gamma); the seated
        requests' own estimates are not part of it. The gate's step-cost factor is
        calibrated on that engine's steps (`calibrate_step_costs`)."""
        if memory.get("gamma") != self.gamma:
            raise DSparkError(f"gate memory of a gamma {memory.get('gamma')} drafter; this engine's gamma is "
                              f"{self.gamma}")
        if memory["prior"] is not None:
            self._set_prior(np.array(memory["prior"], np.float64))
        else:
            self._prior = None
        self._remember(memory["past_estimates"], clear=True)
        self._acc_seen, self._acc_expected = (float(x) for x in memory["acceptance"])
        self._paid_acc = np.array(memory["paid"], np.float64)
        self._probe_gap = int(memory["probe_gap"])
        self._recall_step_costs(memory)  # and calibrate on them (engine_step_costs.py)
        self._recall_dormancy(memory)  # (engine_dormancy.py)

    def _set_prior(self, prior: np.ndarray) -> None:
        """The running mean survival per position. Its device copy (only the production
        variant's capacity reads it, for rows with no survival yet) is refreshed by
        `_sync_prior`, when such a row is about to draft: a transfer every drafted round
        cost 0.3 ms of host time on the CPU demo."""
        self._prior = prior
        self._prior_synced = False

    def _sync_prior(self, known: np.ndarray) -> None:
        """Refresh the prior's device copy when a row about to draft has no survival yet
        (known: per row, whether it has) and the prior moved since the last transfer."""
        if not self._prior_synced and self._prior is not None and not known.all():
            self._prior_dev = jax.device_put(np.asarray(self._prior, np.float32))  # plain transfer: no device cast
            self._prior_synced = True

    # ------------------------------------------------ the gate's state

    def _init_gate(self, lazy_ingest: bool) -> None:
        """The gate's state, and the drafter's ingest (`_init_ingest`)."""
        self._plain_streak, self._probe_gap, self._probed = 0, self.probe_every, False
        self._acc_expected = self._acc_seen = 0.0
        self._slot_acc = np.zeros((self.slots, 2))  # per slot: accepted drafts seen, predicted (decayed)
        self._init_look()  # the past requests' estimates (engine_look.py)
        self._verdict_key, self._verdict = None, (True, False, None)  # the gate's last verdict and its inputs
        self._foreseen: tuple | None = None  # (key, limits, verdict) reached while a round ran (`foresee`)
        self._verdict_limits = np.zeros(0, np.int32)  # the depth limits it was reached at
        self._verdict_raw = np.zeros((self.slots, self.gamma))  # the estimates it read, before gate_accuracy
        self._last_drafted = np.zeros(self.slots, np.int64)  # each slot's last drafted round (metrics.rounds)
        self._own_survival = np.zeros((2, self.slots, self.gamma))  # per slot: survival summed, rounds counted
        self._paid_round = False  # the round about to run drafts because it pays (not a probe, not a look)
        self._paid_acc = np.zeros(2)  # accepted drafts seen, predicted by the gate, over such rounds (decayed)
        self._chosen: np.ndarray | None = None  # the slots the gate chose to draft for (None: all)
        self._drafting = np.ones(self.slots, bool)  # the slots the round about to run drafts for
        self._init_step_costs()  # the steps' realized costs (engine_step_costs.py)
        self._init_ingest(lazy_ingest)
