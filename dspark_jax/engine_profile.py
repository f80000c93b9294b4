"""The engine's round profile: what its own rounds cost, measured (`Engine.profile_rounds`).

The scheduled policies' cost model (engine_costs.py) reads SPS(B) of the verification
pass and a drafting pass by default. A round is more than its passes, and a drafted
*step* is more than its round, so the profile times, on this engine, with its compiled
programs:

- every bucket's speculative round and every plain round (over idle slots: shapes are
  static, so an empty row costs what a busy one does);
- with lazy ingest, the backlog flush at every compiled (lines, width);
- the host work a drafted step adds: folding the round into the gate's estimates and
  the verdict the next step recomputes (every drafted round changes its inputs). Timed
  on the engine's own gate state with every slot seated at its depth limit, then
  restored (on the CPU demo, 0.11-0.18 ms at 1-8 slots, against 4-12 ms drafted rounds).

Everything in it is measured once and then fixed, so the gate's verdicts do not depend
on a run's timing (they would otherwise reach shapes a warm-up did not compile).
"""

from __future__ import annotations

import copy
import types

import jax
import numpy as np

from dspark_jax import profile_sps
from dspark_jax.engine_costs import SCHEDULED
from dspark_jax.errors import DSparkError

# what the host-work timing changes and puts back
_GATE_STATE = ("_recent", "_prior", "_prior_dev", "_prior_synced", "_acc_expected", "_acc_seen", "_slot_acc",
               "_paid_acc", "_verdict_key", "_verdict", "_foreseen", "_last_drafted", "_own_survival",
               "_verdict_limits", "_verdict_raw", "_max_depth", "_max_new", "_n_out", "correction", "_conf_scale_dev")


class RoundProfiler:
    """Mixin of `Engine`: `profile_rounds`."""

    def profile_rounds(self, repeats: int = 16, warmup: int = 2, save: bool = True) -> dict:
        """Time this engine's rounds at every bucket, speculative and plain (low
        quartile of `repeats` after `warmup` compiling / warming runs), over idle slots.
        The repeats go round-robin over the kinds, so that a machine's drift moves all
        of them alike (the gate reads their ratios). With lazy ingest the backlog flushes
        are timed too, at every compiled (lines, width): the gate adds the flush a drafted
        round would need to its predicted time, and the host work of a drafted step (module
        docstring). The scheduled policies then use them; with `save` they go to the profile
        file the engine's SPS came from. Returns {"spec": {B: seconds}, "plain": {B:
        seconds}, "flush": {(lines, width): seconds}, "host": seconds} ("flush" only with
        lazy ingest), which `Engine(..., rounds=...)` also takes."""
        if self.policy not in SCHEDULED or self.gamma == 0:
            raise DSparkError(f"round profiles serve the scheduled policies ({', '.join(SCHEDULED)}); "
                              f"this engine runs '{self.policy}'")
        if not self.idle:
            raise DSparkError("profile_rounds needs an idle engine")
        with self._mode(False):  # a dormant engine's drafter is held out of the state (engine_dormancy.py)
            return self._profile_rounds(repeats, warmup, save)

    def _profile_rounds(self, repeats: int, warmup: int, save: bool) -> dict:
        kinds = [("spec", b) for b in self.buckets] + [("plain", b) for b in self.plain_buckets]
        if self._state.log is not None:
            kinds += [("flush", (n, w)) for n in self.flush_lines for w in self.flush_widths]
        samples: dict[tuple, list[float]] = {k: [] for k in kinds}
        for i in range(max(1, warmup) + max(1, repeats)):
            for kind, size in kinds:
                t0 = self.clock()
                if kind == "flush":
                    self._run_flush(self._flush_rows(range(size[0])), size[1])
                    jax.block_until_ready(self._state.draft_cache)
                else:
                    jax.device_get(self._round(size, kind == "spec"))
                if i >= max(1, warmup):
                    samples[(kind, size)].append(self.clock() - t0)
        times: dict[str, dict] = {"spec": {}, "plain": {}}
        for (kind, size), got in samples.items():
            times.setdefault(kind, {})[size] = max(profile_sps.low_quartile(got), 1e-9)
        times["host"] = self._time_host_work(max(1, repeats))
        self._apply_costs(times)
        if save and self._profile_ref is not None:
            profile_sps.save_rounds(*self._profile_ref, self.policy, times)
        return times

    def _time_host_work(self, repeats: int) -> float:
        """Seconds of the host work a drafted step adds beyond its round: the low quartile
        of `_learn_survival`, `_learn_acceptance`, `_learn_correction` on a round where
        every slot drafted gamma tokens, plus what the verdict reached while a round runs
        (`foresee`) adds to that round: a full-budget round with the verdict, against one
        without (low quartiles; on an accelerator the device hides it, on the CPU host
        and device share the cores). The gate's state is put back afterwards."""
        saved = {name: copy.deepcopy(getattr(self, name)) for name in _GATE_STATE}
        s, g = self.slots, self.gamma
        occupied, idx = list(range(s)), np.arange(s)
        survival = np.cumprod(np.full((s, g), 0.8, np.float32), axis=1)
        info = types.SimpleNamespace(active=np.ones(s, bool), survival=survival, confidence=np.full((s, g), 0.8),
                                     depth=np.full(s, g), accepted=np.full(s, g // 2))
        learn, alone, overlapped = [], [], []
        try:
            self._max_depth[:], self._max_new[:], self._n_out[:] = g, self.max_len, 0
            for i in range(repeats + 1):
                t0 = self.clock()
                self._learn_survival(occupied, info)
                self._learn_acceptance(occupied, info)
                self._learn_correction(occupied, info)
                t1 = self.clock()
                jax.device_get(self._round(self.buckets[-1], True))
                t2 = self.clock()
                out = self._round(self.buckets[-1], True)
                self._verdicts(idx, self._depth_limits(idx, ahead=1))
                jax.device_get(out)
                if i:  # the first: warming
                    learn.append(t1 - t0)
                    alone.append(t2 - t1)
                    overlapped.append(self.clock() - t2)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        lq = profile_sps.low_quartile
        return lq(learn) + max(0.0, lq(overlapped) - lq(alone))
