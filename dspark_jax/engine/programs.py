"""The engine's compiled programs as a set: which ones it can run, compiling them all
(warm-up), and timing one back to back (the device time a benchmark sets against wall
time). A program's key is what `EngineMetrics.programs` counts:
("round", budget, draft, chunk line, greedy, rounds per call) or ("prefill", width,
budget, greedy).

A program is timed over rows that take part, as in serving: a round over idle (done)
rows skips their cache reads and writes, so timing it over empty slots would understate
its device time."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import DSparkError


def prefill_width(longest: int, max_len: int) -> int:
    """The prefill pass's prompt width: a power of two >= the longest prompt (at least 16)."""
    return min(max(16, 1 << (max(longest, 1) - 1).bit_length()), max_len)


def prefill_budget(tokens: int, width: int, slots: int) -> int:
    """The packed prefill's token bucket: a power of two >= tokens (at least 16), at most
    the dense pass's slots x width."""
    return min(max(16, 1 << (max(tokens, 1) - 1).bit_length()), slots * width)


class Programs:
    """The engine's program set (reads the engine's costs and calls its programs)."""

    def __init__(self, engine):
        self.engine = engine

    def keys(self, prompt_lens: Sequence[int] = (1,), greedy: Sequence[bool] = (True, False)) -> list:
        e = self.engine
        c, out = e.costs, []
        rows = range(1, e.slots + 1)
        drafted = sorted({c.budget(n, np.full(n, e.gamma), None) for n in rows} | set(c.buckets)) \
            if e.gamma and c.pays_anywhere else []
        plain = sorted({c.bucket(n) for n in rows if not (e.gamma and c.drafts_at[n])})
        counts = sorted({1, e.rounds_per_call})
        chunks = (False, True) if e.prefill_chunk else (False,)
        for g in greedy:
            for draft, budgets in ((True, drafted), (False, plain)):
                out += [("round", b, draft, ch, g, k) for b in budgets for ch in chunks for k in counts
                        if not ch or k == 1]
            for n in sorted(set(prompt_lens)):
                width = prefill_width(n, e.max_len)
                out += [("prefill", width, b, g)
                        for b in sorted({prefill_budget(m, width, e.slots) for m in range(1, e.slots * width + 1)})]
        return out

    def warmup(self, prompt_lens: Sequence[int] = (1,), greedy: Sequence[bool] = (True, False)) -> None:
        e = self.engine
        if not e.idle:
            raise DSparkError("warmup needs an idle engine")
        for key in self.keys(prompt_lens, greedy):
            self.run(key)
        jax.block_until_ready(e._state.anchor)

    def seconds(self, key: tuple, repeats: int = 8, trials: int = 3, rows: int | None = None) -> float:
        e = self.engine
        if not e.idle:
            raise DSparkError("program_seconds needs an idle engine")
        n = self.rows(key) if rows is None else int(rows)
        if not 0 <= n <= e.slots:
            raise DSparkError(f"rows must be in [0, {e.slots}]; got {rows}")
        sched, times = e._sched, []
        for trial in range(max(trials, 1) + 1):  # the first trial is not kept: it warms the program
            self._take_part(n)
            t0 = time.perf_counter()
            for _ in range(repeats):
                self.run(key, n)
            jax.block_until_ready((e._state.anchor, e._stale))
            times.append((time.perf_counter() - t0) / repeats)
        # idle again: every row done (what the timed rows left in the caches is never read:
        # admission restarts a row's cache and its drafter's)
        e._state, e._sched = e._state.replace(done=jnp.ones_like(e._state.done)), sched
        return float(np.median(times[1:]))

    def rows(self, key: tuple) -> int:
        """Rows a program is timed over by default: as many as its token budget holds."""
        s = self.engine.slots
        return min(s, key[1]) if key[0] == "round" else min(s, max(1, key[2] // key[1]))

    def _take_part(self, n: int) -> None:
        """Rows 0..n-1 decode from position 0 and never finish; the others are done."""
        e = self.engine
        state = e._state
        part = np.arange(e.slots) < n
        e._state = state.replace(done=jnp.asarray(~part), n_out=jnp.zeros_like(state.n_out),
                                 max_new=jnp.full_like(state.max_new, 2**30),
                                 max_depth=jnp.full_like(state.max_depth, e.gamma),
                                 stop_ids=jnp.full_like(state.stop_ids, -1),
                                 cache=state.cache.replace(lengths=jnp.zeros_like(state.cache.lengths)))
        e._sched = e._sched.replace(live=jnp.asarray(part))

    def run(self, key: tuple, rows: int = 0) -> None:
        """One call of the program `key`: rows 0..rows-1 are prefilled (prompts as long as
        the budget holds) or decode; with rows 0 the (idle) engine's state is unchanged."""
        e = self.engine
        s = e.slots
        if key[0] == "prefill":
            _, width, budget, greedy = key
            part = np.arange(s) < rows
            length = max(1, min(width, budget // max(rows, 1)))
            e.call_prefill(part, np.ones((s, width), np.int32), np.full(s, length, np.int32),
                           np.zeros(s, np.uint32), budget, greedy)
            return
        _, budget, draft, chunk, greedy, count = key
        e.call_rounds(budget, draft, count, greedy, self._line(rows, greedy) if chunk else None)

    def _line(self, rows: int, greedy: bool):
        """A chunk line for a slot not decoding (row 0 when idle); with rows decoding, a
        full chunk, and the tables keep those rows decoding."""
        e = self.engine
        z = np.zeros(max(e.prefill_chunk, 1), np.int32)
        if not rows:
            return e.admission_line((0, z, z, 1, 0, False), greedy)
        a = e.admission_line((min(rows, e.slots - 1), z, z, len(z), 0, False), greedy)
        return a.replace(max_new=jnp.full_like(a.max_new, 2**30), max_depth=jnp.full_like(a.max_depth, e.gamma),
                         stop_ids=jnp.full_like(a.stop_ids, -1))
