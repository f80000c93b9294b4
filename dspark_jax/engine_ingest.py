"""Lazy ingest (a mixin of `Engine`): with a feature log (speculate.FeatureLog) the
drafter ingests nothing in plain rounds or at admission; a slot's backlog of target
features is flushed into the drafter's cache just before a round drafts for it, so
requests the drafting gate never drafts for never cost the drafter anything. The
scheduled policies' default on the CPU (`Engine(lazy_ingest=...)`); a flush is one more
launch, which an accelerator's rounds, costing their launches, cannot spare."""

from __future__ import annotations

import itertools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dspark_jax import slot_round, speculate


class LazyIngest:
    """Mixin of `Engine`: the flush's compiled shapes, its plan and its run, and the
    choice of the slots a round drafts for. Expects the engine's slots, max_len, drafter,
    state, `_lag` (positions each slot's drafter cache lacks) and the gate's `_chosen`."""

    def _init_ingest(self, lazy: bool) -> None:
        """With `lazy` the state gets a feature log and the drafter ingests a slot's
        positions only when a round drafts for it; otherwise every round ingests its
        committed positions."""
        self._lag = np.zeros(self.slots, np.int64)  # positions each slot's drafter cache lacks
        if lazy and self.gamma > 0:
            feats = len(self.drafter.tap_layers) * self.tcfg.hidden_size
            self._state = self._state.replace(log=speculate.FeatureLog.init(
                self.slots, self.max_len, feats, self.tcfg.jnp_dtype))

    def _warm_flushes(self) -> None:
        """Compile the flush at every (lines, width) it runs at (nothing without a log)."""
        if self._state.log is not None:
            for lines, width in itertools.product(self.flush_lines, self.flush_widths):
                self._run_flush(np.full(lines, self.slots, np.int32), width)

    @property
    def flush_widths(self) -> tuple[int, ...]:
        """The compiled widths of a backlog flush: powers of 4 from 4, up to max_len."""
        widths, w = [], 4
        while w < self.max_len:
            widths.append(w)
            w *= 4
        return tuple(widths) + (self.max_len,)

    @property
    def flush_lines(self) -> tuple[int, ...]:
        """The compiled line counts of a backlog flush: powers of two up to the slots
        (drafters with `ingest_lines`), else the slots."""
        if not hasattr(self.drafter, "ingest_lines"):
            return (self.slots,)
        return tuple(sorted({min(1 << k, self.slots) for k in range(self.slots.bit_length() + 1)}))

    def _prepare_round(self, draft: bool, occupied: Sequence[int]) -> list[int]:
        """Before each round: a round that drafts drafts for the slots the gate chose
        (else every slot), whose backlog the drafter ingests first; the other occupied
        slots get a depth limit of 0 for the round. Empty slots keep theirs (they draft
        nothing): the limits reach the device only when they change, and a request
        leaving or joining then changes nothing. Returns the occupied slots drafted for."""
        self._drafting[:] = True
        if draft and self._chosen is not None and len(self._chosen) < len(occupied):
            chosen = set(self._chosen.tolist())
            self._drafting[[s for s in occupied if s not in chosen]] = False
        self._drafting[[s for s in occupied if self._unlogged[s]]] = False  # (engine_dormancy.py)
        drafted = [s for s in occupied if self._drafting[s]] if draft else []
        self._flush(drafted)
        return drafted

    def _flush(self, slots: Sequence[int]) -> None:
        """The drafter ingests the backlog of `slots` in one call (lazy ingest)."""
        plan = self._flush_plan(slots)
        self._flushed = None if plan is None else (len(plan[1]), plan[2])  # what the step's cost model reads
        if plan is not None:
            lagging, rows, width = plan
            self._run_flush(rows, width)
            self._lag[lagging] = 0

    def _flush_plan(self, slots: Sequence[int]) -> tuple[list[int], np.ndarray, int] | None:
        """(the slots with a backlog, the flush's rows, its compiled width) of a round
        drafting for `slots`; None when there is nothing to flush."""
        lagging = [s for s in slots if self._lag[s] > 0]
        if self._state.log is None or not lagging:
            return None
        width = min(w for w in self.flush_widths if w >= self._lag[lagging].max())
        return lagging, self._flush_rows(lagging), width

    def _flush_rows(self, slots: Sequence[int]) -> np.ndarray:
        """The flush's line -> slot array (`slot_round.flush_log`), at a compiled size."""
        if not hasattr(self.drafter, "ingest_lines"):
            rows = np.full(self.slots, self.slots, np.int32)
            rows[list(slots)] = list(slots)
            return rows
        lines = min(n for n in self.flush_lines if n >= len(slots))
        rows = np.full(lines, self.slots, np.int32)
        rows[:len(slots)] = list(slots)
        return rows

    def _run_flush(self, rows: np.ndarray, width: int) -> None:
        self._state = slot_round.flush_log(self.drafter, self.tparams, self.dparams, self._state,
                                           jnp.asarray(rows), width)
