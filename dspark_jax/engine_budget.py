"""The round's token bucket (a mixin of `Engine`), chosen on the host before the round
from facts fixed before it: the active slots, the room each has left, the survival of
earlier rounds. It never reads the round's drafts, so every policy's depths stay
lossless whatever bucket it picks (slot_round.py).

The production variant's capacity K reads the survival of the round before last (the
paper's "two steps earlier"), so the host can search it while the device still runs the
round before: `foresee_budget`, called while a drafted round runs, searches the next
round's capacity on the survival that round will read, and `choose_budget` takes it up
when the batch and the slots drafted for are the ones foreseen. Replayed on the CPU with
the H200 demo's round profile at 8 slots, the search cost 0.3 ms a step on the host's
critical path (the H200's rounds there took 4.7 ms, host-bound)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dspark_jax import scheduler


class BudgetChoice:
    """Mixin of `Engine`: `choose_budget`, `foresee_budget` and `_bucket`. Expects the
    engine's policy, gamma, buckets, sps, draft_time, slots, `_drafting`, `_stale_host`,
    `_last_round` and the gate's `_foreseen` verdict and `_batch_key` (engine_costs.py)."""

    _foreseen_capacity: tuple | None = None  # (batch key, slots drafted for, K) from `foresee_budget`

    def choose_budget(self, occupied: Sequence[int]) -> int:
        """The round's token bucket, from facts fixed before the round (never its drafts)."""
        n = len(occupied)
        if self.gamma == 0 or self.policy == "none":
            return self._bucket(n)
        idx = np.asarray(occupied)
        drafting = self._drafting[idx]
        limit = np.where(drafting, self._depth_limits(idx), 0)
        need = n + int(limit.sum())  # every active row at its depth limit
        if self.policy == "production":
            # the device computes K from the same stale survival (global_capacity_jnp) and caps
            # it at the bucket, so a float32-vs-float64 tie broken differently only costs room
            k = self._take_foreseen_capacity(occupied, drafting)
            if k is None:
                k = self._capacity(idx, self._stale_host[0], limit)
            need = min(need, n + k)
        elif self.policy in ("algorithm1", "threshold") and self.adaptive_budget and self._last_round:
            prev_n, prev_b = self._last_round
            if prev_n:
                need = min(need, max(n + 1, 2 * (n + (prev_b - prev_n) * n // prev_n)))
        return self._bucket(need)

    def foresee_budget(self, occupied: Sequence[int]) -> None:
        """While a drafted round runs, the production variant's capacity for the next
        round: on the survival the next round reads (this round's stale row 1, which
        becomes row 0 once it ends), for the slots the next round drafts for (the gate's
        foreseen verdict; ungated: all), with the room one token shorter than now. A
        round commits at least a token a slot, so the room it assumes is at least the
        room the next round has; `choose_budget` still caps the need at the real room."""
        self._foreseen_capacity = None
        if self.policy != "production" or self.gamma == 0:
            return
        idx = np.asarray(occupied)
        drafting = np.ones(len(idx), bool)
        if self.gated:
            if self._foreseen is None:
                return
            pays, _, chosen, _ = self._foreseen[2]
            if not pays:
                return
            if len(chosen) < len(idx):  # what `_prepare_round` does with the verdict
                drafting = np.isin(idx, chosen)
        limit = np.where(drafting, self._depth_limits(idx, ahead=1), 0)
        k = self._capacity(idx, self._stale_host[1], limit)
        self._foreseen_capacity = (self._batch_key(occupied), drafting, k)

    def _take_foreseen_capacity(self, occupied: Sequence[int], drafting: np.ndarray) -> int | None:
        """The foreseen capacity if it is for this batch (the same requests in the same
        slots) and these slots drafted for; else None. Used once."""
        foreseen, self._foreseen_capacity = self._foreseen_capacity, None
        if foreseen is None:
            return None
        key, seen_drafting, k = foreseen
        if key != self._batch_key(occupied) or not np.array_equal(seen_drafting, drafting):
            return None
        return k

    def _capacity(self, idx: np.ndarray, stale: np.ndarray, limit: np.ndarray) -> int:
        """The production variant's capacity K over rows `idx` from `stale` survival [S, G]
        (rows with none yet read the running mean, which then reaches the device: the
        device's capacity reads the same), each row cut at its depth limit."""
        stale = stale[idx].astype(np.float64)
        known = stale.max(axis=1, keepdims=True) > 0
        self._sync_prior(known)
        stale = np.where(known, stale, self._prior_or_zeros()[None, :])
        stale *= np.arange(self.gamma)[None, :] < limit[:, None]
        return scheduler.global_capacity(stale, self.sps, draft_time=self.draft_time)

    def _bucket(self, need: int) -> int:
        for b in self.buckets:
            if b >= need:
                return b
        return self.buckets[-1]
