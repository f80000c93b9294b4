"""Per-request results and engine-wide metrics (readable while the engine runs)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np

from dspark_jax.errors import DSparkError

TokenCallback = Callable[[int, list, bool], None]  # (request id, new token ids, finished)


@dataclasses.dataclass
class RequestResult:
    request_id: int
    prompt_len: int
    max_new_tokens: int
    token_ids: list = dataclasses.field(default_factory=list)
    error: str | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop id), "length" (max_new_tokens), "cancelled", "error"
    rounds: int = 0
    accepted_per_position: list = dataclasses.field(default_factory=list)
    verified_per_round: list = dataclasses.field(default_factory=list)  # 1 + depth each round
    trace: list = dataclasses.field(default_factory=list)  # per round, with Engine(trace=True)
    submitted_at: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def tau(self) -> float:
        """Tokens committed per round (bonus included; the prefill's token not counted)."""
        return (len(self.token_ids) - 1) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Per-user decoding speed: tokens over the time from admission to the last token."""
        if self.admitted_at is None or self.finished_at is None or self.finished_at <= self.admitted_at:
            return 0.0
        return len(self.token_ids) / (self.finished_at - self.admitted_at)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(tau=round(self.tau, 4), tokens_per_second=round(self.tokens_per_second, 3))
        return d


@dataclasses.dataclass
class EngineMetrics:
    rounds: int = 0
    tokens: int = 0           # tokens streamed so far (all requests)
    verified: int = 0         # sum over rounds of B (verified tokens)
    budget: int = 0           # sum over rounds of the compiled bucket N_b
    active: int = 0           # sum over rounds of active rows
    plain_rounds: int = 0     # rounds run without drafting (row counts where drafting does not pay)
    drafts: int = 0           # sum over drafting rounds of active rows (each proposed gamma tokens)
    prefill_chunks: int = 0   # prompt chunks that rode along in rounds (chunked prefill)
    prefills: int = 0         # prefill passes
    # calls of each compiled program: ("round", budget, draft, chunk line, greedy, count) or
    # ("prefill", width, budget, greedy) -> calls dispatched
    programs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # the device work of those calls (what a device-time replay multiplies): (key, rows) ->
    # calls, where each round that ran (the device skips a round with no row decoding)
    # counts 1 / (the call's rounds) with the rows decoding in it, and a prefill call
    # counts 1 with the rows it prefilled
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    started_at: float | None = None
    last_at: float | None = None

    def count_call(self, key: tuple) -> None:
        self.programs[key] += 1

    def count_work(self, key: tuple, rows: int, share: float = 1.0) -> None:
        if share > 0:
            self.calls[key, rows] += share

    @property
    def seconds(self) -> float:
        return (self.last_at - self.started_at) if self.started_at is not None and self.last_at else 0.0

    @property
    def throughput(self) -> float:
        """Aggregate tokens/s from the first step to the latest one."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_verified(self) -> float:
        return self.verified / self.rounds if self.rounds else 0.0

    @property
    def mean_budget(self) -> float:
        return self.budget / self.rounds if self.rounds else 0.0

    @property
    def mean_active(self) -> float:
        return self.active / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "tokens": self.tokens, "seconds": round(self.seconds, 4),
                "throughput": round(self.throughput, 3), "mean_verified": round(self.mean_verified, 3),
                "mean_budget": round(self.mean_budget, 3), "mean_active": round(self.mean_active, 3),
                "plain_rounds": self.plain_rounds, "drafts": self.drafts, "prefill_chunks": self.prefill_chunks, "prefills": self.prefills}


@dataclasses.dataclass
class PendingRequest:
    result: RequestResult
    prompt: list
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_ids: tuple
    max_depth: int
    on_tokens: TokenCallback | None


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def as_int(x, name: str) -> int:
    if not is_int(x):
        raise DSparkError(f"{name} must be an integer; got {x!r}")
    return int(x)


def validate_prompt(prompt, vocab_size: int, max_new_tokens: int, index: int = 0) -> None:
    if len(prompt) == 0:
        raise DSparkError(f"prompt {index} is empty")
    if max_new_tokens < 1:
        raise DSparkError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
    if bad:
        raise DSparkError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
