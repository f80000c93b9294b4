"""The profiler's settings: what `python -m serve.profile` measures when flags leave it open."""

from __future__ import annotations

import dataclasses

from dspark_jax.errors import DSparkError
from serve.profiling.device import MIN_TIMED_S

DEFAULT_BATCHES = (1, 8, 64, 256)
DEFAULT_CONTEXTS = (512, 4096, 32768)
QUICK_BATCHES = (1, 8)
QUICK_CONTEXTS = (512,)


@dataclasses.dataclass
class Settings:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    gamma: int
    q_lens: tuple[int, ...]           # verification query lengths (1 .. 1 + gamma)
    prefill_lens: tuple[int, ...]
    prefill_batch: int = 1
    sps_slots: tuple[int, ...] = ()   # () = the largest batch measured at the first context
    sps_budgets: tuple[int, ...] = ()  # () = powers of two up to slots x (1 + gamma)
    warmup: int = 2
    repeats: int = 10
    quick: bool = False
    time_budget_s: float | None = None
    memory_fraction: float = 0.85     # of the free memory a measurement may plan to use
    min_timed_s: float = MIN_TIMED_S  # fast calls repeat until this much time is timed


def resolve_settings(*, gamma: int, batches=None, contexts=None, q_lens=None, prefill_lens=None,
                     quick: bool = False, warmup=None, repeats=None, sps_slots=None, sps_budgets=None,
                     time_budget_s=None, max_positions: int | None = None) -> Settings:
    """Fill what the flags left out from the full or `--quick` defaults, and check it."""
    if gamma < 1:
        raise DSparkError(f"--gamma must be >= 1; got {gamma}")
    batches = tuple(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES))
    contexts = tuple(contexts or (QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS))
    if q_lens is None:
        q_lens = sorted({1, 2, 1 + (gamma + 1) // 2, 1 + gamma}) if quick else range(1, gamma + 2)
    q_lens = tuple(sorted(set(int(q) for q in q_lens)))
    for name, vals, lo in (("--batch", batches, 1), ("--context", contexts, 2), ("--q-len", q_lens, 1)):
        if not vals or any(v < lo for v in vals):
            raise DSparkError(f"{name} values must be >= {lo}; got {list(vals)}")
    if max(q_lens) > 1 + gamma:
        raise DSparkError(f"--q-len {max(q_lens)} is above 1 + gamma = {1 + gamma}")
    if max_positions is not None:
        too_long = [c for c in contexts if c > max_positions]
        if too_long:
            raise DSparkError(f"--context {too_long} exceeds the model's {max_positions} positions")
    for name, vals in (("--sps-slots", sps_slots or ()), ("--sps-budgets", sps_budgets or ()),
                       ("--prefill-len", prefill_lens or ())):
        if any(v < 1 for v in vals):
            raise DSparkError(f"{name} values must be >= 1; got {list(vals)}")
    if prefill_lens is None:
        prefill_lens = (min(min(contexts), 128),) if quick else tuple(c for c in contexts if c <= 8192) or \
            (min(contexts),)
    return Settings(batches=tuple(sorted(set(batches))), contexts=tuple(sorted(set(contexts))), gamma=gamma,
                    q_lens=q_lens, prefill_lens=tuple(sorted(set(prefill_lens))),
                    sps_slots=tuple(sps_slots or ()), sps_budgets=tuple(sps_budgets or ()),
                    warmup=warmup if warmup is not None else (1 if quick else 2),
                    repeats=repeats if repeats is not None else (3 if quick else 10),
                    quick=quick, time_budget_s=time_budget_s, min_timed_s=0.2 if quick else MIN_TIMED_S)


def default_budgets(slots: int, gamma: int, quick: bool) -> tuple[int, ...]:
    """SPS token budgets for `slots` rows: powers of two below slots x (1 + gamma) and that full budget
    (with `quick`: 1, slots and the full budget)."""
    full = slots * (1 + gamma)
    if quick:
        return tuple(sorted({1, slots, full}))
    out, b = [], 1
    while b < full:
        out.append(b)
        b *= 2
    return tuple(out) + (full,)


def sps_plan(s: Settings) -> list[tuple[int, int]]:
    """The (slots, budget) pairs the SPS(B) sweep measures."""
    out = []
    for n in s.sps_slots or (max(s.batches),):
        out += [(n, b) for b in s.sps_budgets or default_budgets(n, s.gamma, s.quick)]
    return out
