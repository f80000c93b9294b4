"""What the engine's steps took against what the gate predicted (a mixin of `Engine`).

The round profile (engine_profile.py) times rounds over idle slots, back to back, in the
process that measured it. Steps in a run cost more or less than that, and drafted ones
not alike with plain ones: a drafted step among plain ones finds the drafter's weights
out of the caches, it flushes a backlog and folds the round into the gate; a profile
stored by another process moves with that process (10-20% on the 2-core CPU). Replayed
at one slot on the CPU demo (production variant, a stored profile), plain steps took 0.80
of their prediction and drafted steps 1.20: the rounds the gate drafted because they
paid made 0.461 tokens/ms against plain steps' 0.475.

Every step without prompt work is set against the time the gate predicted for it
(`_observe_step`; a drafted step: its round at the bucket chosen, the drafting pass, the
flush it ran and a drafted step's host work). `spec_cost_factor`, the realized ratio of
drafted to plain steps, scales the gate's predicted speculative costs. It is a
calibration, fixed once taken: `calibrate_step_costs` takes it from the steps seen so
far, and an engine taking up another's `gate_memory` (a restarted server; the load
bench's timed runs after their warm-up run) takes it from that engine's steps. Fixed, the
gate's verdicts do not depend on the run's own timing, so repeated runs decide alike
(`learn_step_costs` instead follows the steps live, every step).
"""

from __future__ import annotations

import collections

import numpy as np

STEP_WINDOW = 64  # the latest drafted steps the factor reads (their median)
PLAIN_WINDOW = 32  # the latest plain steps at a row count a drafted step's ratio is set against
# drafted steps' worth of a factor of 1 in the calibrated factor: a warm-up that drafted a
# few rounds only moves it a little
CALIBRATION_PRIOR = 4.0
FACTOR_RANGE = (0.5, 4.0)
HICCUP = 4.0  # a step over this many times its prediction is a hiccup (a compile, a collection)


class StepCosts:
    """Mixin of `Engine`: the steps' realized costs and the factor the gate reads. Expects
    the gate's `gated`, `sps`, `plain_sps`, `draft_time`, `_host_time`, `_flush_cost`."""

    def _init_step_costs(self) -> None:
        # the latest drafted steps' seconds / predicted seconds, over the same ratio of the
        # latest plain steps' at their row count (per row count: `_plain_ratio`)
        self._drafted_ratio: collections.deque = collections.deque(maxlen=STEP_WINDOW)
        self._plain_ratio = [collections.deque(maxlen=PLAIN_WINDOW) for _ in range(self.slots + 1)]
        self._cost_factor = 1.0  # the calibrated factor (`calibrate_step_costs`)
        self._live_factor: float | None = None  # the realized factor of the ratios now (None: not yet computed)
        self._flushed: tuple | None = None  # the (lines, width) the round's flush ran at (`_flush`)

    @property
    def spec_cost_factor(self) -> float:
        """How much dearer drafted steps run than the gate predicts, relative to plain
        steps: the calibrated factor (1 until calibrated), or with `learn_step_costs` the
        factor of the steps seen so far."""
        if not self.learn_step_costs:
            return self._cost_factor
        if self._live_factor is None:  # read by every verdict's key: computed once per drafted step
            self._live_factor = self.realized_cost_factor()
        return self._live_factor

    def realized_cost_factor(self, drafted_ratio=None) -> float:
        """The median over the latest drafted steps of their seconds / predicted seconds,
        each over the median of that ratio over the latest plain steps at its row count
        (a run's drain, one row, runs at another ratio than a full batch; medians, as a
        step's time has a long tail), shrunk towards 1 by CALIBRATION_PRIOR drafted
        steps' worth of it and clipped to FACTOR_RANGE; 1 before any. drafted_ratio:
        another engine's ratios (from its `gate_memory`), else this engine's."""
        ratios = self._drafted_ratio if drafted_ratio is None else drafted_ratio
        if not len(ratios):
            return 1.0
        w = len(ratios) / (len(ratios) + CALIBRATION_PRIOR)
        return float(np.clip(1.0 + w * (float(np.median(ratios)) - 1.0), *FACTOR_RANGE))

    def calibrate_step_costs(self, drafted_ratio=None) -> float:
        """Fix the factor the gate reads at the realized one (`realized_cost_factor`, of
        `drafted_ratio` when given) and return it; the gate decides afresh on it."""
        self._cost_factor = self.realized_cost_factor(drafted_ratio)
        self._verdict_key = self._foreseen = None
        self._look_memo = {}
        return self._cost_factor

    def _step_cost_memory(self) -> dict:
        """The ratios, for `gate_memory` (copies)."""
        return {"drafted_ratio": list(self._drafted_ratio), "plain_ratio": [list(d) for d in self._plain_ratio]}

    def _recall_step_costs(self, memory: dict) -> None:
        """Take up another engine's ratios (its `gate_memory`) and calibrate on them."""
        self._drafted_ratio = collections.deque(memory["drafted_ratio"], maxlen=STEP_WINDOW)
        self._live_factor = None
        theirs = list(memory["plain_ratio"])[:self.slots + 1]  # per row count, up to this engine's slots
        self._plain_ratio = [collections.deque(d, maxlen=PLAIN_WINDOW)
                             for d in theirs + [()] * (self.slots + 1 - len(theirs))]
        self.calibrate_step_costs()

    def _predicted_step(self, draft: bool, budget: int, rows: int) -> float:
        """The seconds the gate predicts for a step (before its factor): a plain round
        over `rows` slots, or a speculative round at `budget` with the drafting pass, the
        flush the round ran and a drafted step's host work; 0 when it has no rate."""
        rate = self.sps[budget] if draft else self.plain_sps[rows]
        if not rate > 0:
            return 0.0
        if not draft:
            return float(1.0 / rate)
        flush = self._flush_cost.get(self._flushed, 0.0) if self._flushed is not None else 0.0
        return float(1.0 / rate) + self.draft_time + flush + self._host_time

    def _observe_step(self, draft: bool, budget: int, rows: int, seconds: float) -> None:
        """A step's wall time (one without prompt work) over its prediction joins the
        latest plain steps' at its row count, or over their median the latest drafted
        steps' (hiccups left out)."""
        if not self.gated or not seconds > 0:
            return
        predicted = self._predicted_step(draft, budget, rows)
        if not predicted > 0 or seconds > HICCUP * predicted:
            return
        ratio, plain = seconds / predicted, self._plain_ratio[rows]
        if not draft:
            plain.append(ratio)
        elif plain:
            self._drafted_ratio.append(ratio / float(np.median(plain)))
            self._live_factor = None
