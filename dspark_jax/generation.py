"""Batch generation: a thin layer over the engine (every prompt takes a slot at once).

`generate` builds an `Engine` with one slot per prompt, submits every prompt and runs it
to the end; it is what `serve.generate`, evaluation and data regeneration call. The
engine's policies, lossless rounds and one-round-in-flight pipeline apply unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from dspark_jax.engine import SCHEDULED, Engine, profiles
from dspark_jax.engine.results import validate_prompt
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams

validate_request = validate_prompt


@dataclasses.dataclass
class Completion:
    index: int
    token_ids: list[int]
    rounds: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0          # wall time from the start until this request finished
    steady_tokens: int = 0        # tokens after the first one
    steady_seconds: float = 0.0   # and the time they took (compilation and prefill excluded)
    trace: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def tau(self) -> float:
        """Mean tokens committed per speculation round (bonus included); the first token,
        sampled by prefill, is not part of any round."""
        return (len(self.token_ids) - 1) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Steady-state decoding rate: the tokens after the first over the time from the
        first to the last (the first carries one-off compilation); else the whole run."""
        if self.steady_seconds > 0 and self.steady_tokens > 0:
            return self.steady_tokens / self.steady_seconds
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def cache_length(prompt_len: int, max_new_tokens: int, gamma: int, multiple: int = 64) -> int:
    """Positions per request: prompt + output + one round of overshoot, rounded up so that
    nearby request sizes share one compiled program."""
    need = prompt_len + max_new_tokens + gamma + 2
    return -(-need // multiple) * multiple


def generate(tcfg, tparams, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams, seeds: Sequence[int], stop_ids: Sequence[int] = (),
             drafter=None, dparams=None, gamma: int | None = None, verify_depth: int | None = None,
             max_depths: Sequence[int] | None = None, policy: str | None = None, costs: dict | None = None,
             trace: bool = False, on_tokens: Callable[[int, list, bool], None] | None = None,
             max_len: int | None = None, mesh=None) -> list[Completion]:
    """Generate for a batch of prompts; returns one Completion per prompt, in order.

    policy: an engine policy (default "fixed" with a drafter, "none" without);
    verify_depth: the fixed policy's depth (default gamma); max_depths: a depth limit per
    prompt; costs: the scheduled policies' profile (`engine.costs.stored_costs`);
    on_tokens(index, new token ids, finished): streaming, per prompt. A scheduled policy
    runs the profile's budget buckets (it saves verification work only with the smaller
    ones); the others one bucket, the full budget.
    """
    if drafter is None:
        gamma = 0
    elif gamma is None:
        gamma = drafter.gamma
    elif gamma != drafter.gamma:
        raise DSparkError(f"gamma {gamma} does not match the drafter's gamma {drafter.gamma}")
    for i, p in enumerate(prompts):
        validate_prompt(p, tcfg.vocab_size, max_new_tokens, i)
    if verify_depth is not None and not 0 <= verify_depth <= gamma:
        raise DSparkError(f"verify depth must be in [0, gamma={gamma}]; got {verify_depth}")
    policy = policy or ("fixed" if drafter is not None else "none")
    max_len = max_len or cache_length(max(len(p) for p in prompts), max_new_tokens, gamma)
    if max_len > tcfg.max_position_embeddings:
        raise DSparkError(f"prompt + max_new_tokens needs {max_len} positions; the model has "
                          f"{tcfg.max_position_embeddings}")
    b = len(prompts)
    # one round per call, and unless a scheduler picks budgets one budget bucket: a batch run compiles
    # one round program (two with plain rounds), not one per bucket and count
    drafted = verify_depth if policy == "fixed" and verify_depth and verify_depth < gamma else gamma
    full = b * (1 + drafted)
    buckets = profiles.budget_buckets(b, gamma) if policy in SCHEDULED and costs else (full,)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=b, max_len=max_len, policy=policy, depth=verify_depth,
                    max_stop_ids=max(1, len(stop_ids)), trace=trace, mesh=mesh, prefill_chunk=0,
                    buckets=buckets,
                    rounds_per_call=1,
                    **(costs or {}))
    temp, top_k, top_p = (np.broadcast_to(np.asarray(x), (b,)) for x in
                          (sampling.temperature, sampling.top_k, sampling.top_p))
    ids = []
    for i, p in enumerate(prompts):
        callback = None if on_tokens is None else (lambda rid, toks, fin, i=i: on_tokens(i, toks, fin))
        ids.append(engine.submit(p, max_new_tokens=max_new_tokens, temperature=float(temp[i]), top_k=int(top_k[i]),
                                 top_p=float(top_p[i]), seed=int(seeds[i]) % 2**32, stop_ids=stop_ids,
                                 max_depth=None if max_depths is None else int(max_depths[i]), on_tokens=callback))
    started = engine.clock()
    engine.run_until_done()
    out = []
    for i, rid in enumerate(ids):
        r = engine.result(rid)
        if r.error is not None:
            raise DSparkError(r.error)
        steady = (r.finished_at - r.first_token_at) if r.first_token_at is not None else 0.0
        out.append(Completion(i, list(r.token_ids), rounds=r.rounds, accepted_per_position=r.accepted_per_position,
                              seconds=r.finished_at - started, steady_tokens=max(len(r.token_ids) - 1, 0),
                              steady_seconds=steady, trace=r.trace, finish_reason=r.finish_reason))
    return out
