"""Reading rounds back: the host's side of the pipeline, one round late.

`Streamer.consume` reads a dispatched call's summary (it waits for that call only; the
next one is already queued on the device), streams each request's new tokens, counts
them into its result, retires finished requests (their slot and pages free at once) and
keeps the survival the budget choice reads. A slot's tokens count only for the request
that held the slot when the call was dispatched and still holds it: a cancelled
request's tokens from rounds already in flight are dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dspark_jax.engine import round as rnd


@dataclasses.dataclass
class InFlight:
    """A dispatched call whose summary the host has not read yet."""

    summary: object            # packed summaries [count, S + 1, 4G + 7] (round.pack_summary) or None
    first: object              # first tokens [S] of a prefill pass dispatched with it, or None
    seated: list               # the request in each slot at dispatch
    prefilled: list            # slots the prefill pass admitted
    key: tuple                 # the rounds' program: ("round", budget, draft, chunk line, greedy, count)

    @property
    def budget(self) -> int:
        return self.key[1]

    @property
    def draft(self) -> bool:
        return self.key[2]


class Streamer:
    """The engine's read-back role (reads and updates the engine's table and results)."""

    def __init__(self, engine):
        self.engine = engine

    def consume(self, item) -> None:
        e = self.engine
        summary = np.asarray(item.summary)  # one transfer (the prefill's first tokens: a second)
        first = None if item.first is None else np.asarray(item.first)
        now = e.clock()
        t, g, m = e.table, e.gamma, e.metrics
        held = [r is not None and t.req[s] is r for s, r in enumerate(item.seated)]
        if first is not None:
            for s in item.prefilled:
                if held[s]:
                    self.emit(s, [int(first[s])], now)
        for packed in summary:
            ints, floats, totals = rnd.unpack_summary(packed, g)
            active = ints[:, 2 * g + 2].astype(bool)
            done = ints[:, 2 * g + 3].astype(bool)
            if totals[2]:  # else skipped on the device (no row decoded): only `done` to read
                m.count_work(item.key, int(active.sum()), 1 / len(summary))
                m.rounds += 1
                m.plain_rounds += not item.draft
                m.drafts += int(active.sum()) if item.draft else 0
                m.verified += int(totals[0])
                m.budget += item.budget
                m.active += int(active.sum())
                if item.draft:
                    e._stale_host[0] = e._stale_host[1]
                    e._stale_host[1] = floats[:, :g]
            for s in range(len(held)):
                if not held[s]:
                    continue
                if ints[s, 2 * g + 6] >= 0:  # the final prompt chunk ran: the first token
                    self.emit(s, [int(ints[s, 2 * g + 6])], now)
                if active[s]:
                    self._count_round(s, ints[s], floats[s], now)
                if done[s] and t.seen[s] > 0:  # (a row still taking its prompt is done too, and has seen nothing)
                    req = t.unseat(s)
                    e._pages_dirty = e.paged
                    last = req.result.token_ids[-1] if req.result.token_ids else None
                    self.finish(req, "stop" if last in req.stop_ids else "length", now)
                    held[s] = False
        m.last_at = now

    def _count_round(self, s: int, ints: np.ndarray, floats: np.ndarray, now: float) -> None:
        e = self.engine
        g = e.gamma
        res = e.table.req[s].result
        appended, depth, accepted = int(ints[2 * g + 1]), int(ints[2 * g + 4]), int(ints[2 * g + 5])
        res.rounds += 1
        res.verified_per_round.append(1 + depth)
        for k in range(accepted):
            res.accepted_per_position[k] += 1
        if e.trace:
            res.trace.append({"draft_tokens": ints[g + 1:2 * g + 1].tolist(),
                              "confidences": [round(float(x), 6) for x in floats[g:2 * g]],
                              "verify_depth": depth, "accepted": accepted})
        self.emit(s, ints[:appended].tolist(), now)

    def emit(self, s: int, tokens: list, now: float) -> None:
        e = self.engine
        req = e.table.req[s]
        if not tokens:
            return
        res = req.result
        if res.first_token_at is None:
            res.first_token_at = now
        res.token_ids.extend(tokens)
        e.table.seen[s] += len(tokens)
        e.metrics.tokens += len(tokens)
        if req.on_tokens is not None:
            req.on_tokens(res.request_id, list(tokens), False)

    def finish(self, req, reason: str, now: float) -> None:
        res = req.result
        res.finished, res.finished_at, res.finish_reason = True, now, reason
        if req.on_tokens is not None:
            req.on_tokens(res.request_id, [], True)
