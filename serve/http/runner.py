"""The engine's own thread, and each HTTP request's view of its completions.

`EngineRunner` owns one engine. Its thread is the only one that warms the engine up and
steps it: it steps while anything is queued, seated or in flight and otherwise sleeps
on an event that `submit` and `cancel` set, so the event loop never waits on the
device. The engine calls `on_tokens` from that thread as it reads each round back; the
runner collects those calls during a step and hands them to the event loop in one
`call_soon_threadsafe` per step, then drops the finished results from `engine.results`.

A `Job` is one HTTP request: its completion choices (n per prompt), each an engine
request with its own `TextStream`. Events are applied on the event loop as they arrive:
text deltas accumulate until the handler takes them (`updates`), a stop string ends a
choice and cancels its engine request, and `close` cancels whatever is still running
(a client that went away). The queue is bounded: past `slots + max_queue` engine
requests not yet finished, `submit` answers 429.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from typing import Callable, Sequence

from serve.http.metrics import ServerMetrics
from serve.http.protocol import APIError
from serve.http.text import TextStream

log = logging.getLogger("serve.server")


@dataclasses.dataclass
class Choice:
    """One completion choice: an engine request and its text so far."""

    index: int
    rid: int
    prompt_tokens: int
    text: TextStream
    engine_done: bool = False      # the engine finished the request (any reason)
    finish_reason: str | None = None  # set when the choice ended: "stop", "length" or "error"
    error: str | None = None
    pending: str = ""              # text not yet taken by the handler


class Job:
    """An HTTP request's completion choices; every method runs on the event loop."""

    def __init__(self, runner: "EngineRunner", choices: list[Choice]):
        self.runner, self.choices = runner, choices
        self._changed = asyncio.Event()
        self.ended = asyncio.Event()
        self._ended_now: list[int] = []
        self.closed = False

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def apply(self, index: int, tokens: list, finished: bool, reason: str | None, error: str | None) -> None:
        """One engine event of choice `index`."""
        c = self.choices[index]
        c.engine_done = c.engine_done or finished
        if c.finish_reason is not None:
            return  # ended already (a stop string); its engine request is being cancelled
        if tokens:
            c.pending += c.text.add(tokens)
            if c.text.stopped:
                self._end(c, "stop")
                if not c.engine_done:
                    self.runner.cancel(c.rid)
        if finished and c.finish_reason is None:
            if reason == "error" or reason == "cancelled":
                c.error = error or "the request was cancelled by the server"
                self._end(c, "error")
            else:
                c.pending += c.text.finish()
                self._end(c, "stop" if reason == "stop" or c.text.stopped else "length")
        self._changed.set()

    def _end(self, c: Choice, reason: str) -> None:
        c.finish_reason = reason
        self._ended_now.append(c.index)
        self.runner.metrics.requests.labels(reason).inc()
        if self.done:
            self.ended.set()

    async def updates(self) -> list[tuple[int, str, str | None]]:
        """Wait for news; return (choice index, new text, finish reason or None) for each
        choice with new text or that has just ended."""
        await self._changed.wait()
        self._changed.clear()
        ended, self._ended_now = set(self._ended_now), []
        out = []
        for c in self.choices:
            if c.pending or c.index in ended:
                out.append((c.index, c.pending, c.finish_reason if c.index in ended else None))
                c.pending = ""
        return out

    def error(self) -> str | None:
        return next((c.error for c in self.choices if c.error), None)

    def completion_tokens(self) -> int:
        return sum(c.text.tokens for c in self.choices)

    def close(self) -> None:
        """The handler is done (or its client went away): cancel what still runs."""
        if self.closed:
            return
        self.closed = True
        for c in self.choices:
            if not c.engine_done:
                self.runner.cancel(c.rid)
                if c.finish_reason is None:
                    c.finish_reason = "cancelled"
                    self.runner.metrics.requests.labels("cancelled").inc()
        self.runner._jobs_open -= 1


class EngineRunner:
    """One engine stepped by its own thread; requests come from the event loop."""

    def __init__(self, engine, tokenizer, metrics: ServerMetrics, *, max_queue: int = 256,
                 warmup: Callable[[object], None] | None = None):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.capacity = engine.slots + max_queue
        self.warmup = warmup
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._choices: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice index); loop only
        self._open = 0          # engine requests submitted and not yet finished (loop only)
        self._jobs_open = 0     # HTTP requests being answered (loop only)
        self._events: collections.deque = collections.deque()  # engine thread -> loop
        self._submit_errors: dict[int, str] = {}
        self._last_at: dict[int, float] = {}  # engine thread: when each request's latest round came back
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ident: int | None = None  # the engine thread's
        self._seen = (0, 0)  # engine metrics (rounds, drafts) already exported

    # ------------------------------------------------------------------ event loop side

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def status(self) -> str:
        if self.failed:
            return f"failed: {self.failed}"
        if self.draining:
            return "draining"
        return "ok" if self.ready else "warming up"

    @property
    def busy(self) -> bool:
        """HTTP requests are still being answered."""
        return self._jobs_open > 0

    def submit(self, prompts: Sequence[Sequence[int]], n: int, *, max_new: Sequence[int], temperature: float,
               top_k: int, top_p: float, seeds: Sequence[int], stop_ids: Sequence[int],
               stops: Sequence[str]) -> Job:
        """Queue n choices per prompt (choice index = prompt index * n + sample); 503 while
        not ready or draining, 429 past the queue bound, 400 for more choices than it can
        ever hold or if the engine refuses one."""
        if self.status != "ok":
            raise APIError(503, f"the server is {self.status}", type="service_unavailable",
                           code="unavailable", headers={"Retry-After": "1"})
        count = len(prompts) * n
        if count > self.capacity:
            raise APIError(400, f"the request asks for {count} completions; this server holds at most "
                                f"{self.capacity} at once", param="n", code="invalid_value")
        if self._open + count > self.capacity:
            raise APIError(429, f"the request queue is full ({self._open} requests in flight, room for "
                                f"{self.capacity}); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        job = Job(self, [])
        self._jobs_open += 1
        try:
            for p, prompt in enumerate(prompts):
                for s in range(n):
                    i = p * n + s
                    rid = self.engine.submit(prompt, max_new_tokens=int(max_new[p]), temperature=temperature,
                                             top_k=top_k, top_p=top_p, seed=int(seeds[i]), stop_ids=stop_ids,
                                             on_tokens=self._on_tokens)
                    err = self._submit_errors.pop(rid, None)
                    if err is not None:
                        self.engine.forget(rid)
                        raise APIError(400, err, param="prompt", code="invalid_value")
                    job.choices.append(Choice(i, rid, len(prompt), TextStream(self.tokenizer, stops)))
                    self._choices[rid] = (job, i)
                    self._open += 1
                    self.metrics.prompt_tokens.inc(len(prompt))
        except BaseException:
            job.close()
            raise
        finally:
            self._wake.set()
        return job

    def cancel(self, rid: int) -> None:
        self.engine.cancel(rid)
        self._wake.set()

    def _deliver(self, batch: list) -> None:
        for rid, tokens, finished, reason, error in batch:
            entry = self._choices.get(rid)
            if finished and entry is not None:
                del self._choices[rid]
                self._open -= 1
            if entry is not None:
                entry[0].apply(entry[1], tokens, finished, reason, error)

    def _abort(self, message: str) -> None:
        """The engine failed: end every choice in flight with an error."""
        self._deliver([(rid, [], True, "error", message) for rid in list(self._choices)])

    # ------------------------------------------------------------------ engine thread

    def _main(self) -> None:
        self._ident = threading.get_ident()
        try:
            if self.warmup is not None:
                self.warmup(self.engine)
        except Exception as e:  # the server stays up to say so on /health
            log.exception("warm-up failed")
            self.failed = " ".join(f"{type(e).__name__}: {e}".split())
            return
        self.ready = True
        while not self._stop:
            self._wake.clear()
            if self.engine.idle:
                self._flush()
                self._wake.wait(0.25)
                continue
            try:
                self.engine.step()
            except Exception as e:
                log.exception("engine step failed")
                self.failed = " ".join(f"{type(e).__name__}: {e}".split())
                self._flush()
                self.loop.call_soon_threadsafe(self._abort, self.failed)
                return
            self._flush()

    def _on_tokens(self, rid: int, tokens: list, finished: bool) -> None:
        res = self.engine.results.get(rid)
        if threading.get_ident() != self._ident:  # refused inside submit (the caller's thread)
            self._submit_errors[rid] = (res.error if res is not None else None) or "the engine refused the request"
            return
        now = self.engine.clock()
        if tokens:
            last = self._last_at.get(rid)
            first = res.first_token_at - res.submitted_at if last is None and res.first_token_at else None
            self.metrics.tokens(len(tokens), first, None if last is None else now - last)
            self._last_at[rid] = now
        if finished:
            self._last_at.pop(rid, None)
            if res.finish_reason != "error":
                self.metrics.finished(res.finished_at - res.submitted_at if res.finished_at else None, res.rounds,
                                      res.verified_per_round, res.accepted_per_position)
        self._events.append((rid, list(tokens), finished, res.finish_reason, res.error))

    def _flush(self) -> None:
        """Hand this step's events to the loop; export the step's engine counters and gauges."""
        batch = []
        while self._events:
            batch.append(self._events.popleft())
        for rid, _, finished, _, _ in batch:
            if finished:
                self.engine.forget(rid)
        if batch:
            self.loop.call_soon_threadsafe(self._deliver, batch)
        e = self.engine
        m = e.metrics
        rounds, drafts = m.rounds - self._seen[0], m.drafts - self._seen[1]
        if rounds:
            self.metrics.step(rounds, drafts, e.gamma)
            self._seen = (m.rounds, m.drafts)
        self.metrics.running.set(e.running)
        self.metrics.waiting.set(e.waiting)
