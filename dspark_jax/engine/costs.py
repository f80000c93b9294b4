"""What rounds cost, as the engine's scheduler sees it: the profile's tables, the budget
bucket of each round, and which row counts run speculative rounds at all.

- The scheduled policies' objective on the device is the pass model of the profile:
  Theta = tau* / (T_draft + 1 / SPS(B)) (scheduler.py).
- The bucket of a round is chosen by the host before the round, from what it has read
  back (the active rows it knows of, their room, and for production the capacity K from
  the survival of two rounds earlier): never from the round's own drafts, so every
  policy stays lossless whatever bucket it picks.
- Whether drafting pays at R active rows is decided once, at start-up, from the profile:
  the best speculative round predicted from the drafter's mean survival per position
  against a plain round over the same rows (the engine's measured round times when the
  profile has them, else the pass model). Rounds at row counts where it does not pay are
  plain (no drafting pass). A scheduled engine whose drafter pays at no row count runs
  without it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dspark_jax import scheduler
from dspark_jax.engine import profiles
from dspark_jax.errors import DSparkError


class RoundCosts:
    """The cost tables of one engine: buckets, SPS(B), the drafting time, the prior
    survival, and the row counts that draft."""

    def __init__(self, *, slots: int, gamma: int, policy: str, buckets: Sequence[int] | None = None,
                 sps=None, draft_time: float = 0.0, acceptance=None, rounds: dict | None = None):
        self.slots, self.gamma, self.policy = slots, gamma, policy
        full = slots * (1 + gamma)
        self.buckets = tuple(sorted({int(b) for b in (buckets or profiles.budget_buckets(slots, gamma))}))
        if self.buckets[0] < 1 or self.buckets[-1] < full:
            raise DSparkError(f"buckets must be >= 1 and reach slots x (1 + gamma) = {full}")
        if isinstance(sps, dict):
            sps = profiles.interpolate(sps, full)
        curve = np.ones(full + 1, np.float32) if sps is None else np.asarray(sps, np.float32).reshape(-1)
        if len(curve) < full + 1:  # a shorter table ends there (later budgets are never chosen)
            curve = np.concatenate([curve, np.zeros(full + 1 - len(curve), np.float32)])
        self.sps = curve[:full + 1]
        self.draft_time = float(draft_time)
        if not np.isfinite(self.draft_time) or self.draft_time < 0:
            raise DSparkError(f"draft_time must be >= 0 seconds; got {draft_time}")
        self.acceptance = None if acceptance is None else np.clip(np.asarray(acceptance, np.float64)[:gamma], 0, 1)
        self.rounds = rounds
        self.drafts_at = self._drafting_rows()

    def bucket(self, need: int) -> int:
        """The smallest bucket holding `need` tokens (the largest if none does)."""
        for b in self.buckets:
            if b >= need:
                return b
        return self.buckets[-1]

    @property
    def prior(self) -> np.ndarray:
        """[G] survival assumed for rows with no drafted round yet (production's capacity)."""
        if self.acceptance is None:
            return np.zeros(self.gamma, np.float32)
        return self.acceptance.astype(np.float32)

    @property
    def pays_anywhere(self) -> bool:
        return bool(self.drafts_at[1:].any())

    def budget(self, rows: int, limits: np.ndarray, stale: np.ndarray | None) -> int:
        """The bucket of a speculative round over `rows` active rows at most, with depth
        limits [rows] and (production) their last known survival [rows, G] (zeros: none)."""
        need = rows + int(np.sum(limits))
        if self.policy == "production" and stale is not None and self.gamma:
            known = stale.max(axis=1, keepdims=True) > 0
            est = np.where(known, stale, self.prior[None, :]) * (np.arange(self.gamma)[None, :] < limits[:, None])
            need = min(need, rows + scheduler.global_capacity(est, self.sps, draft_time=self.draft_time))
        return self.bucket(need)

    def _drafting_rows(self) -> np.ndarray:
        """bool [slots + 1]: at R active rows, whether a speculative round is predicted to
        beat a plain one (True everywhere for the unscheduled policies, or without a
        measured survival to predict from)."""
        out = np.ones(self.slots + 1, bool)
        if self.policy not in ("algorithm1", "production") or self.acceptance is None or not self.gamma:
            return out
        full = self.slots * (1 + self.gamma)
        if self.rounds:  # measured rounds: a step curve over the buckets, drafting included
            spec = {b: 1.0 / t for b, t in self.rounds["spec"].items() if t > 0}
            plain = {b: 1.0 / t for b, t in self.rounds["plain"].items() if t > 0}
            if spec and plain:
                spec_sps = profiles.at_buckets(profiles.interpolate(spec, full), self.buckets)
                plain_sps = profiles.at_buckets(profiles.interpolate(plain, full), self.buckets)
                for r in range(1, self.slots + 1):
                    est = np.repeat(self.acceptance[None, :], r, axis=0)
                    out[r] = scheduler.speculation_pays(est, spec_sps, draft_time=0.0, plain_sps=plain_sps)[0]
                return out
        for r in range(1, self.slots + 1):
            est = np.repeat(self.acceptance[None, :], r, axis=0)
            out[r] = scheduler.speculation_pays(est, self.sps, draft_time=self.draft_time)[0]
        return out


def stored_costs(path: str | None, key: dict, buckets: Sequence[int], any_length: bool = False) -> dict | None:
    """Engine keyword arguments {"sps", "draft_time", "acceptance", "rounds"} from the
    profile file's record for `key` (None when there is none). any_length: a record that
    differs only in cache length will do (the closest one)."""
    path = path or profiles.default_path()
    rec = profiles.lookup(path, key, buckets)
    if rec is None and any_length:
        near = [r for r in profiles.records(path) if {**r.get("key", {}), "max_len": key["max_len"]} == key
                and all(str(int(b)) in r.get("table", {}) for b in buckets)]
        rec = min(near, key=lambda r: abs(r["key"]["max_len"] - key["max_len"]), default=None)
    if rec is None:
        return None
    table = {int(b): float(v) for b, v in rec["table"].items()}
    return {"sps": profiles.interpolate(table, max(buckets)), "draft_time": float(rec.get("draft_seconds", 0.0)),
            "acceptance": rec.get("acceptance"), "rounds": profiles.round_times(rec)}
