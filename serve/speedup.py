"""Plain vs speculative decoding throughput for one pair: the numbers behind `serve.bench`
(and the speed table of `train.demo.report`). Benchmark code, so it lives in `serve/`, outside
the `dspark_jax` library.

Each configuration runs once untimed (compilation) and then `repeats` timed times;
plain and speculative runs alternate inside one process so machine noise hits both,
and the report is their ratio.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

import numpy as np

from dspark_jax import generation
from dspark_jax.sampling import SamplingParams


@dataclasses.dataclass
class BenchRow:
    batch: int
    plain_tps: float
    spec_tps: float
    tau: float
    rounds: int
    tokens: int = 0          # tokens of one run, all prompts (at temperature 0 plain and speculative agree)

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps if self.plain_tps else 0.0


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, low: int = 4) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, length).tolist() for _ in range(n)]


def _run(tcfg, tparams, prompts, max_new, temperature, stop_ids, drafter, dparams, gamma, verify_depth,
         schedule=None):
    t0 = time.perf_counter()
    policy, costs = schedule or (None, None)
    comps = generation.generate(tcfg, tparams, prompts, max_new_tokens=max_new,
                                sampling=SamplingParams.make(len(prompts), temperature),
                                seeds=range(len(prompts)), stop_ids=stop_ids, drafter=drafter, dparams=dparams,
                                gamma=gamma, verify_depth=verify_depth, policy=policy, costs=costs)
    secs = time.perf_counter() - t0
    return sum(len(c.token_ids) for c in comps) / secs, comps


def compare(tcfg, tparams, drafter, dparams, prompts: Sequence[Sequence[int]], *, batch: int,
            max_new_tokens: int, temperature: float = 0.0, repeats: int = 2,
            verify_depth: int | None = None, progress=None, stop_ids: Sequence[int] = (),
            schedule: tuple | None = None) -> BenchRow:
    """Tokens/s of plain and speculative decoding on the first `batch` prompts (a request
    ends at one of `stop_ids` or after max_new_tokens). schedule: (policy, profile costs)
    of the speculative runs (default: fixed depth)."""
    batch_prompts = [list(prompts[i % len(prompts)]) for i in range(batch)]
    gamma = drafter.gamma
    args = (tcfg, tparams, batch_prompts, max_new_tokens, temperature, tuple(stop_ids))
    _run(*args, None, None, 0, None)  # compile both programs first
    _run(*args, drafter, dparams, gamma, verify_depth, schedule)
    plain, fast, comps = [], [], None
    for _ in range(repeats):
        plain.append(_run(*args, None, None, 0, None)[0])
        tps, comps = _run(*args, drafter, dparams, gamma, verify_depth, schedule)
        fast.append(tps)
        if progress is not None:
            progress()
    rounds = sum(c.rounds for c in comps)
    tau = sum(len(c.token_ids) - 1 for c in comps) / rounds if rounds else 0.0
    return BenchRow(batch, statistics.median(plain), statistics.median(fast), tau, rounds,
                    sum(len(c.token_ids) for c in comps))


def markdown(rows: list[BenchRow], title: str) -> str:
    lines = [f"### {title}", "", "| batch | plain tok/s | speculative tok/s | speedup | tau |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.batch} | {r.plain_tps:.1f} | {r.spec_tps:.1f} | {r.speedup:.2f}x | {r.tau:.2f} |")
    return "\n".join(lines)
