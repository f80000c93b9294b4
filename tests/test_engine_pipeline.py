"""The engine's pipeline, by behaviour only: with rounds in flight (lag 1) and several
rounds per call, at temperature 0 every policy still reproduces plain greedy decoding
under staggered arrivals; stop ids and max_new_tokens are never overshot; a cancelled
request frees its slot (and pages) at once and streams nothing more; a warmed-up engine
compiles nothing while serving; requests submitted and cancelled from another thread
are served exactly."""

import threading
import time

import pytest

from dspark_jax import target
from dspark_jax.errors import DSparkError
from dspark_jax.engine import Engine
from dspark_jax.engine import round as rnd
from tests.test_engine import ADAPTIVE, FULL, MAX_LEN, PROMPTS, SLOTS, SPS, TARGET, slot_oracle

LONG = 22  # reference tokens per prompt (the longest prompt, 9 tokens, + 22 fits MAX_LEN = 32)
NEW = [12, 7, 10, 3, 9, 1]
ARRIVALS = {0: [0, 1, 2], 1: [3], 3: [4, 5]}  # step -> requests submitted before it (more than slots)
MODES = {"sync": dict(lag=0, rounds_per_call=1), "lag1": dict(lag=1, rounds_per_call=1),
         "lag1_x3": dict(lag=1, rounds_per_call=3)}
BUCKETS = {"none": (SLOTS,), "production": ADAPTIVE}  # else (FULL,): few programs to compile


@pytest.fixture(scope="module")
def setup():
    tcfg, tparams = target.load(TARGET)
    full = target.greedy_decode(tcfg, tparams, PROMPTS, LONG, max_len=MAX_LEN + 16)
    drafter, dparams = slot_oracle(tcfg, full)  # drafts the reference, 25% of drafts wrong
    return tcfg, tparams, full, drafter, dparams


def make(setup, policy="fixed", **kw):
    tcfg, tparams, _, drafter, dparams = setup
    kw.setdefault("buckets", BUCKETS.get(policy, (FULL,)))
    return Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS, **kw)


class Stream:
    """Records every on_tokens callback per request."""

    def __init__(self):
        self.calls = {}
        self.lock = threading.Lock()

    def __call__(self, rid, tokens, finished):
        with self.lock:
            self.calls.setdefault(rid, []).append((list(tokens), finished))

    def tokens(self, rid):
        return [t for toks, _ in self.calls.get(rid, []) for t in toks]

    def check(self, res):
        """Exactly one final callback, the last one, carrying no tokens; the streamed
        tokens are the result's."""
        calls = self.calls[res.request_id]
        assert [fin for _, fin in calls] == [False] * (len(calls) - 1) + [True], calls
        assert calls[-1][0] == [] and self.tokens(res.request_id) == res.token_ids


def staggered(engine, requests, arrivals=ARRIVALS, stream=None):
    """Submit requests[i] = (prompt, kwargs) before the step `arrivals` says; step until
    idle. Returns the results in request order."""
    ids, step = {}, 0
    while step <= max(arrivals) or not engine.idle:
        for i in arrivals.get(step, []):
            prompt, kw = requests[i]
            ids[i] = engine.submit(prompt, on_tokens=stream, **kw)
        engine.step()
        step += 1
        assert step < 500, "the engine does not finish"
    return [engine.result(ids[i]) for i in range(len(requests))]


# ------------------------------------------------------------------ greedy equality

@pytest.mark.parametrize("policy", ["none", "fixed", "threshold", "algorithm1", "production"])
def test_every_policy_and_pipeline_depth_equals_greedy(setup, policy):
    """Synchronous, one round in flight, and one in flight with three rounds per call:
    each request's output (and stream) is its greedy continuation, cut at its own
    max_new_tokens."""
    full = setup[2]
    requests = [(p, dict(max_new_tokens=n, seed=i)) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]
    for mode, kw in MODES.items():
        engine = make(setup, policy, threshold=0.6, **kw)
        stream = Stream()
        results = staggered(engine, requests, stream=stream)
        for res, want, n in zip(results, full, NEW):
            assert res.error is None and res.finish_reason == "length", (mode, res.request_id, res.error)
            assert res.token_ids == want[:n], (mode, res.request_id)
            stream.check(res)
        m = engine.metrics
        assert m.tokens == sum(NEW) and engine.idle, (mode, m.as_dict())
        counts = {k[-1] for k in m.programs if k[0] == "round"}
        if mode != "lag1_x3":
            assert counts == {1}, (mode, m.programs)
        elif policy == "none":  # one token a round: calls of 3 rounds run while no row may end in them
            assert counts == {1, 3}, (mode, m.programs)
        else:  # these requests are short against 3 rounds of gamma + 1 tokens: one round a call
            assert counts <= {1, 3}, (mode, m.programs)
        if policy != "none":
            assert max(r.tau for r in results if r.rounds) > 1.5, mode  # real acceptances happened


# ------------------------------------------------------------------ stop ids and max_new_tokens

def _first_new(seq, start):
    """An index k >= start whose token does not occur before k (stopping on it stops at k)."""
    return next(k for k in range(start, len(seq)) if seq[k] not in seq[:k])


@pytest.mark.parametrize("policy", ["fixed", "none"])
def test_stop_ids_and_lengths_are_never_overshot(setup, policy):
    """Lag 1 and three rounds per call: rounds run ahead of the host, yet no request
    streams a token past its stop id or its max_new_tokens."""
    full = setup[2]
    k0, k4 = _first_new(full[0], 5), _first_new(full[4], 3)
    late = _first_new(full[4], k4 + 1)
    absent = next(t for t in range(4, 512) if t not in full[5])
    requests = [
        (PROMPTS[0], dict(max_new_tokens=LONG, stop_ids=[full[0][k0]])),           # a stop mid-way
        (PROMPTS[1], dict(max_new_tokens=5)),                                       # length
        (PROMPTS[2], dict(max_new_tokens=LONG - 1, stop_ids=[full[2][0]])),         # stop on the first token
        (PROMPTS[3], dict(max_new_tokens=1)),                                       # length 1
        (PROMPTS[4], dict(max_new_tokens=LONG, stop_ids=[full[4][late], full[4][k4]])),  # the earlier stop wins
        (PROMPTS[5], dict(max_new_tokens=11, stop_ids=[absent])),                   # a stop id that never comes
        (PROMPTS[1], dict(max_new_tokens=2)),                                       # lengths ending mid-round
        (PROMPTS[3], dict(max_new_tokens=3)),
        (PROMPTS[0], dict(max_new_tokens=6)),
        (PROMPTS[5], dict(max_new_tokens=8, stop_ids=[full[5][0]])),                # first token, chunked admission
    ]
    want = [(full[0][:k0 + 1], "stop"), (full[1][:5], "length"), (full[2][:1], "stop"), (full[3][:1], "length"),
            (full[4][:k4 + 1], "stop"), (full[5][:11], "length"), (full[1][:2], "length"),
            (full[3][:3], "length"), (full[0][:6], "length"), (full[5][:1], "stop")]
    engine = make(setup, policy, lag=1, rounds_per_call=3)
    stream = Stream()
    results = staggered(engine, requests, arrivals={0: [0, 1, 2], 2: [3, 4, 5], 3: [6, 7, 8, 9]},
                        stream=stream)
    for i, (res, (tokens, reason)) in enumerate(zip(results, want)):
        assert (res.token_ids, res.finish_reason) == (tokens, reason), i
        assert len(res.token_ids) <= requests[i][1]["max_new_tokens"]
        stream.check(res)
    if policy == "none":  # (drafted rounds commit up to gamma + 1 tokens: these short requests take one a call)
        assert any(k[-1] == 3 for k in engine.metrics.programs if k[0] == "round")
    assert engine.metrics.tokens == sum(len(t) for t, _ in want)


@pytest.mark.parametrize("slots", [1, SLOTS])
def test_a_request_ended_by_its_first_token_leaves_alone(setup, slots):
    """A request ended by its first token (a stop id, or max_new_tokens 1) with no other
    row decoding: the rounds after it are skipped on the device, yet the host still
    learns that the row ended, retires it and goes idle; the next request is served. At
    one slot every call runs several rounds, and a request ending inside one skips the
    rest of it."""
    tcfg, tparams, full, drafter, dparams = setup
    engine = Engine(tcfg, tparams, drafter, dparams, slots=slots, max_len=MAX_LEN, policy="fixed",
                    buckets=(slots * (1 + drafter.gamma),), lag=1, rounds_per_call=3)
    for kw, reason in ((dict(max_new_tokens=1), "length"), (dict(max_new_tokens=9, stop_ids=[full[0][0]]), "stop")):
        rid = engine.submit(PROMPTS[0], **kw)
        engine.run_until_done(max_steps=20)
        assert engine.idle and (engine.result(rid).token_ids, engine.result(rid).finish_reason) == (full[0][:1],
                                                                                                    reason)
    rid = engine.submit(PROMPTS[1], max_new_tokens=LONG)
    engine.run_until_done(max_steps=60)
    assert engine.idle and engine.result(rid).token_ids == full[1]
    m = engine.metrics
    assert m.rounds < sum(k[-1] * n for k, n in m.programs.items() if k[0] == "round"), m.as_dict()
    if slots == 1:
        assert {k[-1] for k in m.programs if k[0] == "round"} == {3}, m.programs


# ------------------------------------------------------------------ cancellation

@pytest.mark.parametrize("paged", [False, True])
def test_cancel_frees_the_slot_at_once_and_streams_nothing_more(setup, paged):
    """A request cancelled while its next round is in flight: after the next step its slot
    (and its pages) are free, its result is finished as cancelled, and none of its tokens
    from the rounds in flight reach the stream. A request that waits for that slot (in
    paged mode: for its pages; the pool holds A and B only) takes it in that very step
    and decodes exactly greedy. Cancelling a waiting, a finished or an unknown request
    is harmless."""
    full = setup[2]
    # reservations (prompt + max_new + gamma + 1 tokens, pages of 4): A 29 -> 8, B 23 -> 6, C 16 -> 4
    kw = dict(paged=True, page_size=4, num_pages=8 + 6 + 1) if paged else {}
    engine = make(setup, "fixed", lag=1, **kw)
    stream = Stream()
    a = engine.submit(PROMPTS[0], LONG - 2, on_tokens=stream)
    b = engine.submit(PROMPTS[2], 10, on_tokens=stream)
    d = engine.submit(PROMPTS[1], 5, on_tokens=stream)  # waits: both slots taken
    engine.cancel(d)
    engine.step()
    assert engine.result(d).finish_reason == "cancelled" and stream.calls[d] == [([], True)]
    engine.step()
    assert 0 < len(engine.result(a).token_ids) < LONG - 2 and not engine.result(a).finished
    slot_a = next(s for s, r in enumerate(engine.table.req) if r is not None and r.result.request_id == a)
    engine.cancel(a)
    c = engine.submit(PROMPTS[4], 9, on_tokens=stream)
    seen = list(engine.result(a).token_ids)
    assert stream.tokens(a) == seen
    engine.step()
    res_a = engine.result(a)
    assert res_a.finished and res_a.finish_reason == "cancelled"
    assert all(r is None or r.result.request_id != a for r in engine.table.req)
    assert engine.table.req[slot_a] is not None and engine.table.req[slot_a].result.request_id == c
    if paged:
        alloc = engine.table.allocator
        alloc.check()
        assert a not in alloc and c in alloc
        assert alloc.num_used == sum(len(alloc.pages(r.result.request_id)) for r in engine.table.req if r is not None)
    engine.cancel(12345)  # unknown: ignored
    engine.run_until_done()
    engine.cancel(b)      # finished: ignored
    engine.step()
    assert res_a.token_ids == seen == full[0][:len(seen)]
    assert stream.calls[a][-1] == ([], True) and stream.tokens(a) == seen  # nothing after the cancel
    for rid, i, n in ((b, 2, 10), (c, 4, 9)):
        res = engine.result(rid)
        assert res.token_ids == full[i][:n] and res.finish_reason == "length", rid
        stream.check(res)
    assert engine.idle and not engine.table.occupied()
    if paged:
        assert engine.table.allocator.num_used == 0
    # a cancelled row stops computing at once, also with no request taking its slot: from
    # the round in flight at the cancel (both rows) on, every round has one active row
    e, f = engine.submit(PROMPTS[0], LONG - 2), engine.submit(PROMPTS[5], 12)
    engine.step()
    engine.step()
    engine.cancel(e)
    rounds, active = engine.metrics.rounds, engine.metrics.active
    engine.run_until_done()
    assert engine.result(e).finish_reason == "cancelled" and engine.result(f).token_ids == full[5][:12]
    assert engine.metrics.active - active <= engine.metrics.rounds - rounds + 1, engine.metrics.as_dict()


def test_cancel_during_chunked_prefill(setup):
    """A request cancelled while its prompt is half-way into the cache (chunks of 3, one
    in flight) streams nothing; the request that takes its slot restarts that row and
    decodes exactly greedy beside the one that kept decoding."""
    full = setup[2]
    engine = make(setup, "fixed", lag=1, prefill_chunk=3)
    stream = Stream()
    a = engine.submit(PROMPTS[0], LONG - 2, on_tokens=stream)
    engine.step()
    engine.step()
    b = engine.submit(PROMPTS[2], 10, on_tokens=stream)  # 9 prompt tokens: three chunks
    engine.step()
    engine.step()
    assert engine.metrics.prefill_chunks == 2 and engine.result(b).token_ids == []
    engine.cancel(b)
    c = engine.submit(PROMPTS[5], 9, on_tokens=stream)
    engine.step()
    assert engine.result(b).finish_reason == "cancelled"
    assert [r.result.request_id if r else None for r in engine.table.req] == [a, c]
    engine.run_until_done()
    assert stream.calls[b] == [([], True)] and engine.result(b).token_ids == []
    for rid, i, n in ((a, 0, LONG - 2), (c, 5, 9)):
        res = engine.result(rid)
        assert res.token_ids == full[i][:n] and res.finish_reason == "length", rid
        stream.check(res)


def test_slot_of_a_cancelled_decoding_request_waits_for_its_new_prompt(setup):
    """Two decoding requests cancelled at once, two new ones seated in their slots while a
    third keeps decoding: the second new prompt's first chunk waits a round behind the
    first's, and its row must not decode the cancelled request's state meanwhile: both
    new requests get exactly greedy, never more than max_new_tokens."""
    tcfg, tparams, full, drafter, dparams = setup
    engine = Engine(tcfg, tparams, drafter, dparams, slots=3, max_len=MAX_LEN, policy="fixed", prefill_chunk=4,
                    lag=1)
    a, b, c = (engine.submit(PROMPTS[i], LONG - 2) for i in (0, 1, 3))
    for _ in range(3):
        engine.step()
    engine.cancel(a)
    engine.cancel(c)
    d, f = engine.submit(PROMPTS[2], 8), engine.submit(PROMPTS[4], 8)
    engine.run_until_done()
    assert engine.result(a).finish_reason == engine.result(c).finish_reason == "cancelled"
    for rid, i, n in ((b, 1, LONG - 2), (d, 2, 8), (f, 4, 8)):
        assert engine.result(rid).token_ids == full[i][:n], rid


# ------------------------------------------------------------------ no compilation after warm-up

def test_warm_engine_compiles_nothing(setup):
    """After `warmup` for the prompt lengths it will see, a staggered greedy workload with
    chunked admission, one round in flight and three rounds per call runs only programs
    `program_keys` lists, all compiled already. (Three slots: shapes no other test of
    this module compiles.)"""
    tcfg, tparams, full, drafter, dparams = setup
    engine = Engine(tcfg, tparams, drafter, dparams, slots=3, max_len=MAX_LEN, policy="fixed", lag=1,
                    rounds_per_call=3, buckets=(3 * (drafter.gamma + 1),))
    lengths = sorted({len(p) for p in PROMPTS})
    engine.warmup(prompt_lens=lengths, greedy=(True,))
    assert engine.idle
    before = rnd.rounds._cache_size(), rnd.prefill._cache_size()
    requests = [(p, dict(max_new_tokens=n)) for p, n in zip(PROMPTS, NEW)]
    results = staggered(engine, requests, arrivals={0: [0, 1], 1: [2, 3], 2: [4], 5: [5]})
    assert (rnd.rounds._cache_size(), rnd.prefill._cache_size()) == before
    assert [r.token_ids for r in results] == [f[:n] for f, n in zip(full, NEW)]
    m = engine.metrics
    assert set(m.programs) <= set(engine.program_keys(lengths, greedy=(True,))), m.programs
    assert m.prefill_chunks > 0, m.programs
    # timing each program over the rows it ran with (what a benchmark's replay does)
    # compiles nothing and leaves the engine as it was: the workload again gives the same
    assert 0 < sum(m.calls.values()) <= sum(m.programs.values())
    assert {key for key, _ in m.calls} <= set(m.programs)
    for key, rows in m.calls:
        assert engine.program_seconds(key, repeats=2, trials=1, rows=rows) > 0
    with pytest.raises(DSparkError, match="rows must be in"):
        engine.program_seconds(next(iter(m.programs)), rows=4)
    again = staggered(engine, requests, arrivals={0: [0, 1, 2], 3: [3, 4, 5]})
    assert (rnd.rounds._cache_size(), rnd.prefill._cache_size()) == before
    assert [r.token_ids for r in again] == [f[:n] for f, n in zip(full, NEW)]


# ------------------------------------------------------------------ other threads

def test_submit_and_cancel_from_another_thread(setup):
    """A thread submits three requests with small sleeps (and submits and cancels a
    fourth) while the main thread steps: all three finish with their greedy output."""
    full = setup[2]
    engine = make(setup, "fixed", lag=1)
    stream = Stream()
    ids, errors = [], []

    def client():
        try:
            for i in (1, 2, 4):
                time.sleep(0.003)
                ids.append((i, engine.submit(PROMPTS[i], NEW[i], on_tokens=stream)))
            doomed = engine.submit(PROMPTS[3], MAX_LEN - len(PROMPTS[3]), on_tokens=stream)
            engine.cancel(doomed)
            ids.append((None, doomed))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    first = engine.submit(PROMPTS[0], LONG - 2, on_tokens=stream)  # the engine is busy when the client starts
    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 120
    while thread.is_alive() or not engine.idle:
        if not engine.step():
            time.sleep(0.001)
        assert time.monotonic() < deadline, "the engine does not finish"
    thread.join()
    assert not errors, errors
    assert len(ids) == 4
    for i, rid, n in [(0, first, LONG - 2)] + [(i, rid, NEW[i]) for i, rid in ids[:3]]:
        res = engine.result(rid)
        assert res.token_ids == full[i][:n] and res.finish_reason == "length", (i, res.error)
        stream.check(res)
    doomed = engine.result(ids[3][1])
    assert doomed.finish_reason == "cancelled" and len(doomed.token_ids) < MAX_LEN - len(PROMPTS[3])
    assert stream.tokens(doomed.request_id) == doomed.token_ids == full[3][:len(doomed.token_ids)]
