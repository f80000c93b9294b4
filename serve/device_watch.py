"""When the device has nothing to run: a direct measure of host exposure.

`DeviceWatch(engine)` wraps the engine's two dispatch methods (`call_rounds`,
`call_prefill`) for the duration of a `with` block. Each dispatch is stamped on the host,
and a watcher thread waits for the calls' outputs in dispatch order and stamps when each
is ready. Calls run on the device one after another, so call i runs from
max(dispatched_i, ready_{i-1}) to ready_i, and the device is idle wherever the next call
had not been dispatched yet when the one before was ready: `idle_seconds`.

This counts the time the device waited for the host. It does not count the host slowing
the device down by sharing its cores (on a CPU backend, where XLA's threads and the host
thread share the machine); the replay measure (`load_points.host_exposed`) includes that.
"""

from __future__ import annotations

import queue
import threading
import time

import jax


class DeviceWatch:
    def __init__(self, engine, clock=time.perf_counter):
        self.engine, self.clock = engine, clock
        self.calls: list[tuple[float, float]] = []  # (dispatched, ready) per call, in dispatch order
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self.started = self.stopped = 0.0

    def __enter__(self) -> "DeviceWatch":
        e = self.engine
        self._saved = e.call_rounds, e.call_prefill
        e.call_rounds, e.call_prefill = self._stamped(e.call_rounds), self._stamped(e.call_prefill)
        self._thread.start()
        self.started = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = self.clock()
        self.engine.call_rounds, self.engine.call_prefill = self._saved
        self._queue.put(None)
        self._thread.join()

    def _stamped(self, call):
        def stamped(*args, **kwargs):
            at = self.clock()
            out = call(*args, **kwargs)
            self._queue.put((at, out))
            return out
        return stamped

    def _wait(self) -> None:
        while (item := self._queue.get()) is not None:
            at, out = item
            jax.block_until_ready(out)
            self.calls.append((at, self.clock()))

    @property
    def idle_seconds(self) -> float:
        """Time inside the block with no call dispatched and unfinished (before the first
        call and after the last included)."""
        idle, ready = 0.0, self.started
        for at, done in self.calls:
            idle += max(0.0, at - ready)
            ready = max(ready, done)
        return idle + max(0.0, self.stopped - ready)
