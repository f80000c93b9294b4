"""Host-side driver: prefill, then speculation rounds until every request is finished.

The device work per round is one call of the jitted `spec_round`; the host reads back
the small per-round summary (for metrics, traces and streaming) between rounds, never
inside one.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import speculate, target
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams


@dataclasses.dataclass
class Completion:
    index: int
    token_ids: list[int]
    rounds: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0          # wall time from the start until this request finished
    steady_tokens: int = 0        # tokens committed after the first round
    steady_seconds: float = 0.0   # and the time they took (compilation and prefill excluded)
    trace: list[dict] = dataclasses.field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens committed per speculation round (bonus included); the first token,
        sampled by prefill, is not part of any round."""
        return (len(self.token_ids) - 1) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Steady-state decoding rate: tokens committed after the first round over the time
        they took (the first round and prefill carry one-off compilation). Falls back to the
        whole run when there was at most one round."""
        if self.steady_seconds > 0 and self.steady_tokens > 0:
            return self.steady_tokens / self.steady_seconds
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def cache_length(prompt_len: int, max_new_tokens: int, gamma: int, multiple: int = 64) -> int:
    """Slots per request: prompt + output + one round of overshoot, rounded up so that
    nearby request sizes share one compiled program."""
    need = prompt_len + max_new_tokens + gamma + 2
    return -(-need // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]]):
    width = max(len(p) for p in prompts)
    width = -(-width // 16) * 16
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def validate_request(prompt: Sequence[int], vocab_size: int, max_new_tokens: int, index: int = 0) -> None:
    if len(prompt) == 0:
        raise DSparkError(f"prompt {index} is empty")
    if max_new_tokens < 1:
        raise DSparkError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
    if bad:
        raise DSparkError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _fill_tokens(comps: list[Completion], state, counts) -> None:
    out = np.asarray(jax.device_get(state.out))
    for c in comps:
        c.token_ids = out[c.index, :counts[c.index]].tolist()


def generate(tcfg, tparams, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams, seeds: Sequence[int], stop_ids: Sequence[int] = (),
             drafter=None, dparams=None, gamma: int | None = None, verify_depth: int | None = None,
             depth_fn: Callable | None = None, trace: bool = False,
             on_round: Callable[[list[Completion]], None] | None = None,
             max_len: int | None = None) -> list[Completion]:
    """Generate for a batch of prompts; returns one Completion per prompt.

    Verification depth per round: `depth_fn(info_so_far) -> [B]` if given, else the fixed
    `verify_depth` (default gamma). With `drafter=None` this is plain decoding.
    """
    if drafter is None:
        gamma = 0
    elif gamma is None:
        gamma = drafter.gamma
    elif gamma != drafter.gamma:
        raise DSparkError(f"gamma {gamma} does not match the drafter's gamma {drafter.gamma}")
    b = len(prompts)
    for i, p in enumerate(prompts):
        validate_request(p, tcfg.vocab_size, max_new_tokens, i)
    verify_depth = gamma if verify_depth is None else verify_depth
    if not 0 <= verify_depth <= gamma:
        raise DSparkError(f"verify depth must be in [0, gamma={gamma}]; got {verify_depth}")
    max_len = max_len or cache_length(max(len(p) for p in prompts), max_new_tokens, gamma)
    if max_len > tcfg.max_position_embeddings:
        raise DSparkError(f"prompt + max_new_tokens needs {max_len} positions; the model has "
                          f"{tcfg.max_position_embeddings}")
    tokens, lengths = pad_prompts(prompts)
    stops = np.full((b, max(1, len(stop_ids))), -1, np.int32)
    stops[:, :len(stop_ids)] = list(stop_ids)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    cache = target.init_cache(tcfg, b, max_len)
    dcache = drafter.init_cache(b, max_len) if drafter is not None else None

    t0 = time.perf_counter()
    state = speculate.start(tcfg, drafter, tparams, dparams, tokens, lengths, cache, dcache, keys,
                            sampling, jnp.full((b,), max_new_tokens, jnp.int32), jnp.asarray(stops),
                            max_new_cap=max_new_tokens)
    comps = [Completion(i, [], accepted_per_position=[0] * gamma) for i in range(b)]
    n_out, done = jax.device_get((state.n_out, state.done))
    counts = np.asarray(n_out).copy()  # tokens each request holds so far (host side)
    for c in comps:
        c.seconds = time.perf_counter() - t0
    fixed = jnp.full((b,), verify_depth, jnp.int32)
    for _ in range(max_new_tokens + 1):
        if done.all():
            break
        depth = fixed if depth_fn is None else depth_fn(state)
        state, info = speculate.spec_round(tcfg, drafter, gamma, tparams, dparams, state, depth)
        # per round only the small summary comes back; the output buffer only when streaming
        info, n_out, done = jax.device_get((info, state.n_out, state.done))
        now = time.perf_counter() - t0
        for c in comps:
            i = c.index
            if not info.active[i]:
                continue
            c.rounds += 1
            for k in range(int(info.accepted[i])):
                c.accepted_per_position[k] += 1
            if c.rounds > 1:  # the first round carries compilation: measure from its end
                c.steady_tokens += int(n_out[i]) - int(counts[i])
                c.steady_seconds += now - c.seconds
            counts[i] = n_out[i]
            c.seconds = now
            if trace:
                c.trace.append({"draft_tokens": info.draft[i].tolist(),
                                "confidences": [round(float(x), 6) for x in info.confidence[i]],
                                "verify_depth": int(info.depth[i]), "accepted": int(info.accepted[i])})
        if on_round is not None:
            _fill_tokens(comps, state, counts)
            on_round(comps)
    _fill_tokens(comps, state, counts)
    return comps
