"""The drafting gate's next verdict, reached while the device runs a round (a mixin of
`Engine`, with engine_costs.py).

A verdict (`RoundCostModel._verdicts`) reads only facts fixed before its round, and most
of them are fixed a round earlier: so the host reaches it while the round before is on
the device, where its work overlaps the device's, and `should_draft` takes it up
(`_take_foreseen`) when it is for the batch the round then serves.

- After a round drafted because it paid (`foresee`, drafted=True): the verdict reads the
  estimates of the rounds before that one (its own survival is not back yet) and the
  room left after it commits a token per slot. On the H200 demo a verdict took a third
  of a 2 ms round. Probes and looks are not foreseen: the verdict after them reads what
  they found.
- After a plain round that changes the batch (drafted=False): a plain round teaches the
  gate nothing, and every active slot commits one token, so the next batch is known
  before the round ends: the slots whose last token this is leave (`_n_out` reaches
  `_max_new`), the slots whose prompt this round's chunk completes join, and the
  verdict on that batch is exactly the one `should_draft` would reach (the estimates a
  round on, the room a token shorter). A request that stops on a stop id, or a batch
  a prefill pass joins, is another batch: the verdict is then reached afresh. Where
  plain rounds win (the CPU demo's closed loop at 4 slots), a request leaves or joins
  every fourth round; the verdicts before the round fell from 0.15 to 0.02 ms a step
  (0.2 ms a step moved into the round), a change below that machine's noise in
  throughput (at 2 slots 0.938 of plain decoding's, 0.934 without it: 8 interleaved
  runs each, docs/load_bench_cpu/gate_ab.py). On a GPU the round runs while the host
  works.

The looks of the foreseen verdicts read the past requests' estimates as they are before
the round: a request that finishes in it joins them (`_remember_request`) for later
verdicts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class Foresight:
    """Mixin of `Engine`: `foresee` and `_take_foreseen`. Expects the gate's `_verdicts`,
    `_gate_key`, `_verdict_key`, `_plain_streak`, `_probe_gap` and the engine's host
    mirrors (`_slot_req`, `_n_out`, `_max_new`)."""

    def foresee(self, occupied: Sequence[int], drafted: bool, plan: Sequence[tuple] = ()) -> None:
        """While the device runs the round just dispatched over `occupied` (drafted: it
        drafts; plan: its prompt chunks, (slot, start, n)), reach the next round's verdict
        where that pays (see the module docstring)."""
        self._foreseen = None
        if not self.gated:
            return
        if drafted:  # the same batch, on the estimates before this round
            if not self._paid_round:
                return
            nxt, key, committed, rounds_on = list(occupied), self._gate_key(occupied, 0), 1, 0
        else:  # the batch after this round, on the estimates a round on
            streak = self._plain_streak + 1
            if streak >= self._probe_gap:
                return  # the next round is a probe: it reaches no verdict
            staying = [s for s in occupied if self._n_out[s] + 1 < self._max_new[s]]
            started = [s for s, at, n in plan if at + n == len(self._slot_req[s].prompt)]
            nxt = sorted(staying + started)
            key = self._gate_key(nxt, streak)
            if not nxt or key == self._verdict_key:
                return  # nothing decodes, or the standing verdict (not to draft) stands
            committed, rounds_on = np.isin(nxt, staying).astype(np.int64), 1  # a joining slot commits nothing
        idx = np.asarray(nxt)
        limits = self._depth_limits(idx, ahead=committed)
        self._foreseen = (key, limits, self._verdicts(idx, limits, rounds_on))  # rounds_on: `ahead`

    def _take_foreseen(self, occupied: Sequence[int], key: tuple) -> bool:
        """Make the foreseen verdict the standing one if it is for these slots, or if it
        is a verdict to draft and some slot it chose is still seated: it then stands for
        one round across departures, seats and rooms that shrank faster than foreseen
        (the slots that joined wait for that round's own foresight, which is on the batch
        as it is). At 8 slots a request leaves or joins nearly every other round, and
        recomputing there cost the H200 demo about 1 ms a round. Returns whether it did."""
        foreseen, self._foreseen = self._foreseen, None
        if foreseen is None:
            return False
        seen_key, limits, (pays, look, chosen, raw) = foreseen
        if seen_key != key:
            seated, then = set(key[0]), dict(seen_key[0])  # (slot, request) pairs; slot -> request
            chosen = chosen[[(int(s), then[int(s)]) in seated for s in chosen]]
            if not (pays and seen_key[1:] == key[1:] and len(chosen)):
                return False
        self._verdict_key, self._verdict_limits, self._verdict = key, limits, (pays, look, chosen)
        self._verdict_raw[[s for s, _ in seen_key[0]]] = raw  # what the round's tally reads (`_learn_acceptance`)
        return True
