"""The engine's compiled programs as a set: which ones it can run, compiling them all
(warm-up), and timing one back to back (the device time a benchmark sets against wall
time). A program's key is what `EngineMetrics.programs` counts:
("round", budget, draft, chunk line, greedy, rounds per call) or ("prefill", width,
budget, greedy)."""

from __future__ import annotations

import time
from typing import Sequence

import jax
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

    def seconds(self, key: tuple, repeats: int = 8, trials: int = 3) -> float:
        e = self.engine
        if not e.idle:
            raise DSparkError("program_seconds needs an idle engine")
        self.run(key)
        jax.block_until_ready(e._state.anchor)
        times = []
        for _ in range(max(trials, 1)):
            t0 = time.perf_counter()
            for _ in range(repeats):
                self.run(key)
            jax.block_until_ready((e._state.anchor, e._stale))
            times.append((time.perf_counter() - t0) / repeats)
        return float(np.median(times))

    def run(self, key: tuple) -> None:
        """One call of the program `key` over the (idle) engine's empty slots."""
        e = self.engine
        s = e.slots
        if key[0] == "prefill":
            _, width, budget, greedy = key
            e.call_prefill(np.zeros(s, bool), np.zeros((s, width), np.int32), np.ones(s, np.int32),
                           np.zeros(s, np.uint32), budget, greedy)
            return
        _, budget, draft, chunk, greedy, count = key
        z = np.zeros(max(e.prefill_chunk, 1), np.int32)
        admission = e.admission_line((0, z, z, 1, 0, False), greedy) if chunk else None
        e.call_rounds(budget, draft, count, greedy, admission)
