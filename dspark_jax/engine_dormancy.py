"""Dormancy (a mixin of `Engine`): a scheduled engine whose drafting has not paid for
what it costs the plain rounds stops carrying the drafter, for a while.

A scheduled engine keeps, in every round drafted or not, what drafting needs: the feature
log (lazy ingest) or the drafter's ingest of each round's positions, and the gate's host
work. On the CPU demo that cost a plain step 3-6% at one slot (the log's part: 1.5-2% of
the round), and where drafting never pays (the CPU demo at every load measured) the gate's
plain rounds ran that much below plain decoding. Dormant, the engine runs plain
decoding's own compiled programs: the drafter's cache and the log leave the state (held
on the side), no taps are read, no gate is asked.

The verdict rests on realized times only (no cost model). Every step without prompt work
is timed. Awake, a plain step is worth one plain step, and a drafted step that commits N
tokens over b rows is worth N / b plain steps at its row count. Every `dormancy_window`
such steps (counted while every seated request is logged), the engine sets the window's
worth, in seconds of dormant plain steps at each step's row count (the median of the
latest timed there; of awake plain steps until dormant ones have been timed), against
the window's time: the balance of drafting's savings and the drafter's carrying cost.
Unless staying awake paid (a balance above 1, by DORMANCY_MARGIN), the engine goes
dormant for `span` rounds; the span doubles with each dormant verdict in a row, from
DORMANT_SPAN up to DORMANT_CAP windows, and falls back when a window finds staying awake
paid. A row count with no timed
plain step is timed by running its next step plain (a gate that always drafts leaves
none). When the span is over the engine wakes at the next admission, so that the new
request is logged from its first token.

Requests seated while dormant, or when dormancy began, are not logged: the drafter lacks
their positions, so no round drafts for them (their depth limit is 0) until they leave.
Dormant or awake, a plain round is every depth at 0: lossless.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import slot_round
from dspark_jax.engine_costs import SCHEDULED

DORMANCY_WINDOW = 64  # awake steps without prompt work per verdict
# staying awake must have paid by this much: closer calls are the noise of step times (at 8
# slots on the CPU demo, windows' balances ran 0.95-1.05 and the drafter's measured share of
# a plain step -0.10 to +0.13, from one window to the next), and a close call lost to
# dormancy costs at most that much
DORMANCY_MARGIN = 0.05
DORMANT_SPAN = 4      # a first dormant verdict's span, in windows of rounds
DORMANT_CAP = 64      # the longest span, in windows (dormant verdicts in a row double it)
TIMED_STEPS = 32      # the latest plain steps per row count a median reads


class Dormancy:
    """Mixin of `Engine`: the dormant mode, its verdicts and its switch. Expects the
    engine's state, stale survival, slots, `_slot_req`, `_max_depth`, `_waiting`, `_lag`
    and the gate's `gated`, `_verdict_key` and `_foreseen`."""

    def _init_dormancy(self, enabled: bool | None, window: int) -> None:
        """enabled: None (on for the scheduled policies whose gate is on), True or False."""
        self._dormancy = enabled
        self.dormancy_window = int(window)
        self._held: tuple | None = None  # (drafter cache, feature log) while dormant
        # what plain decoding's engine passes its rounds (shapes and types alike): a dormant
        # round is its compiled program, not one more
        self._bare_stale = jnp.zeros((2, self.slots, 0), jnp.float32)
        self._bare_schedule = slot_round.Schedule(
            sps=jnp.asarray(np.ones(self.slots + 1, np.float32)),
            max_depth=jax.device_put(np.zeros(self.slots, np.int32)), threshold=self._threshold_dev,
            draft_time=jnp.asarray(0.0, jnp.float32), prior=jnp.zeros((0,), jnp.float32))
        self._unlogged = np.zeros(self.slots, bool)  # per slot: the drafter lacks some of its positions
        self._dormant_left = 0  # dormant rounds before the engine may wake
        self._span = DORMANT_SPAN  # the next dormant verdict's span, in windows
        self._busy = [collections.deque(maxlen=TIMED_STEPS) for _ in range(self.slots + 1)]  # awake plain steps
        self._quiet = [collections.deque(maxlen=TIMED_STEPS) for _ in range(self.slots + 1)]  # dormant steps
        self._reset_window()

    @property
    def dormancy(self) -> bool:
        """Whether the engine may go dormant: a scheduled policy's, when asked for, or by
        default when its gate is on."""
        if self.policy not in SCHEDULED or self.gamma == 0:
            return False
        return self.gated if self._dormancy is None else bool(self._dormancy)

    @property
    def dormant(self) -> bool:
        return self._held is not None

    def _reset_window(self) -> None:
        self._window: list[tuple[int, float, float]] = []  # per step: (rows, worth in plain steps, seconds)
        self._baseline_rows: set[int] = set()  # row counts whose next step runs plain (`_dormancy_verdict`)

    # ------------------------------------------------ the switch

    def _set_dormant(self, dormant: bool) -> None:
        """Move the drafter's cache and the log out of the state (dormant) or back. Every
        seated request is then unlogged; the stale survival restarts."""
        if dormant == self.dormant:
            return
        if dormant:
            self._held = (self._state.draft_cache, self._state.log)
            self._state = self._state.replace(draft_cache=None, log=None)
            self._unlogged[:] = True
            self._max_depth[:] = 0
            self._lag[:] = 0
        else:
            cache, log = self._held
            self._held = None
            self._state = self._state.replace(draft_cache=cache, log=log)
        self._stale = jnp.zeros_like(self._stale)
        self._stale_host[:] = 0.0
        self._verdict_key = self._foreseen = None

    @contextlib.contextmanager
    def _mode(self, dormant: bool):
        """Run the block in the given mode (warmup, profiling), then go back."""
        was = self.dormant
        self._set_dormant(dormant)
        try:
            yield
        finally:
            self._set_dormant(was)

    def _maybe_wake(self) -> None:
        """Before admission: wake when the span is over and a waiting request has a slot."""
        if self.dormant and self._dormant_left <= 0 and self._waiting and any(r is None for r in self._slot_req):
            self._set_dormant(False)
            self._reset_window()

    # ------------------------------------------------ the verdict

    def _observe_dormancy(self, draft: bool, occupied: Sequence[int], active: int, tokens: int,
                          seconds: float | None) -> None:
        """After every step: a dormant one counts the span down. A step's time (None for
        one with prompt work; `tokens` committed over `active` rows) joins the timed plain
        steps and the window, and a full window reaches a verdict."""
        if self.dormant:
            self._dormant_left -= 1
            if seconds is not None and seconds > 0:
                self._quiet[len(occupied)].append(seconds)
            return
        if not self.dormancy or not seconds or not active or self._unlogged[list(occupied)].any():
            return
        rows = len(occupied)
        if not draft:
            self._busy[rows].append(seconds)
        self._window.append((rows, tokens / active if draft else 1.0, seconds))
        if len(self._window) >= self.dormancy_window:
            self._dormancy_verdict()

    def _baseline(self, rows: int) -> float | None:
        """A plain step's seconds at `rows` rows in the mode the engine would go to: the
        timed dormant steps' median, else the awake ones'; None when neither was timed."""
        for timed in (self._quiet[rows], self._busy[rows]):
            if timed:
                return float(np.median(timed))
        return None

    def dormancy_balance(self) -> float | None:
        """The window's worth in dormant plain steps over its time (steps at a row count
        with no timed plain step left out): above 1, staying awake paid; None when no
        step can be weighed."""
        worth = spent = 0.0
        for rows, steps, seconds in self._window:
            base = self._baseline(rows)
            if base is not None:
                worth, spent = worth + steps * base, spent + seconds
        return worth / spent if spent > 0 else None

    def _plain_wanted(self, occupied: Sequence[int]) -> bool:
        """Whether this step runs plain to time a baseline the window's verdict waits for."""
        return len(occupied) in self._baseline_rows

    def _dormancy_verdict(self) -> None:
        """Stay awake where the window's balance is above 1 + DORMANCY_MARGIN (or nothing
        could be weighed), else go dormant. A verdict waits (up to a second window) while
        a row count of the window has no timed plain step: the next step at it runs plain."""
        self._baseline_rows = {rows for rows, _, _ in self._window if self._baseline(rows) is None}
        if self._baseline_rows and len(self._window) < 2 * self.dormancy_window:
            return
        balance = self.dormancy_balance()
        self._reset_window()
        if balance is None or balance > 1.0 + DORMANCY_MARGIN:
            self._span = DORMANT_SPAN
            return
        self._set_dormant(True)
        self._dormant_left = self._span * self.dormancy_window
        self._span = min(2 * self._span, DORMANT_CAP)
        self.metrics.dormant_spans += 1

    # ------------------------------------------------ memory

    def _dormancy_memory(self) -> dict:
        """For `gate_memory`: the mode, the span left and the next, the timed steps."""
        return {"dormancy": {"dormant": self.dormant, "left": self._dormant_left, "span": self._span,
                             "busy": [list(d) for d in self._busy], "quiet": [list(d) for d in self._quiet]}}

    def _recall_dormancy(self, memory: dict) -> None:
        """Take up another engine's mode (a dormant one for the span it had left: it wakes
        at its first admission when none was left) and its timed steps, per row count up
        to this engine's slots."""
        got = memory.get("dormancy")
        if got is None or not self.dormancy:
            return
        pad = [()] * (self.slots + 1)
        self._busy = [collections.deque(d, maxlen=TIMED_STEPS) for d in (list(got["busy"]) + pad)[:self.slots + 1]]
        self._quiet = [collections.deque(d, maxlen=TIMED_STEPS) for d in (list(got["quiet"]) + pad)[:self.slots + 1]]
        self._span = int(got["span"])
        self._reset_window()
        self._set_dormant(bool(got["dormant"]))
        self._dormant_left = int(got["left"]) if got["dormant"] else 0
