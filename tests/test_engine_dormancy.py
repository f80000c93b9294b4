"""Dormancy (engine_dormancy.py): a scheduled engine whose drafting did not save what
carrying the drafter costs goes dormant (plain decoding's programs, no drafter in the
state), wakes at an admission when its span is over, and never drafts for the requests
seated while it slept. Greedy output stays plain decoding's throughout."""

import pytest

from dspark_jax import slot_round, target
from dspark_jax.engine import Engine
from dspark_jax.engine_dormancy import DORMANT_CAP, DORMANT_SPAN
from dspark_jax.errors import DSparkError
from tests.test_engine import ADAPTIVE, MAX_LEN, NEW, PROMPTS, SLOTS, SPS, pair, slot_oracle
from tests.test_engine_costs import _rounds

assert pair  # a fixture, used by name

WINDOW = 3


def _timed_engine(tcfg, tparams, ref, drafted_ms: float, plain_ms: float = 1.0, dormant_ms: float = 0.9, **kw):
    """An algorithm1 engine whose profile says drafting pays (it drafts), on a clock where
    a drafted round takes `drafted_ms`, an awake plain round `plain_ms` and a dormant one
    `dormant_ms`."""
    drafter, dparams = slot_oracle(tcfg, ref, corrupt_rate=0.0)
    now = [0.0]
    kw = {"dormancy_window": WINDOW, **kw}
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                    buckets=ADAPTIVE, rounds=_rounds(0.5, 1.0), clock=lambda: now[0], **kw)
    run_round = engine._round

    def timed_round(budget, draft, admission=None, greedy=None):
        now[0] += 1e-3 * (drafted_ms if draft else dormant_ms if engine.dormant else plain_ms)
        return run_round(budget, draft, admission, greedy)

    engine._round = timed_round
    return engine


def _run_waves(engine, waves: int = 3):
    """Every prompt, `waves` times over, two waiting at a time: returns (request index,
    result, whether it was unlogged when first seen seated) per request."""
    order = [i for _ in range(waves) for i in range(len(PROMPTS))]
    ids, unlogged = [], {}
    while order or not engine.idle:
        while order and len(engine._waiting) < 2:
            i = order.pop(0)
            ids.append((i, engine.submit(PROMPTS[i], max_new_tokens=NEW[i] + 6)))
        engine.step()
        for s, req in enumerate(engine._slot_req):
            if req is not None and req.result.request_id not in unlogged:
                unlogged[req.result.request_id] = bool(engine._unlogged[s])
    return [(i, engine.result(rid), unlogged[rid]) for i, rid in ids]


@pytest.fixture(scope="module")
def longer_ref(pair):
    """Plain greedy decoding of every prompt, 6 tokens longer than test_engine's."""
    tcfg, tparams, _ = pair
    ref = target.greedy_decode(tcfg, tparams, PROMPTS, max(NEW) + 6, max_len=MAX_LEN)
    return [r[:n + 6] for r, n in zip(ref, NEW)]


@pytest.mark.parametrize("lazy_ingest", [True, False])
def test_drafting_that_does_not_pay_sends_the_engine_dormant_and_output_stays_greedy(pair, longer_ref, lazy_ingest):
    """Drafted rounds take 20 plain rounds' time: the engine goes dormant, wakes, goes
    dormant again for twice the span; every request's output is plain greedy decoding's;
    no request seated while dormant (or when dormancy began) is ever drafted for; a
    request seated awake after a wake-up is. With a feature log (lazy ingest, the CPU's
    default) or without (the drafter ingests every round, an accelerator's)."""
    (tcfg, tparams, _), ref = pair, longer_ref
    engine = _timed_engine(tcfg, tparams, ref, drafted_ms=20.0, lazy_ingest=lazy_ingest)
    assert (engine._state.log is not None) == lazy_ingest
    out = _run_waves(engine)
    for i, res, _ in out:
        assert res.error is None and res.token_ids == ref[i]
    m = engine.metrics
    assert m.dormant_spans >= 2 and 0 < m.dormant_rounds < m.rounds
    assert engine._span == min(DORMANT_SPAN * 2 ** m.dormant_spans, DORMANT_CAP)
    unlogged = [res for _, res, u in out if u]
    assert unlogged and all(v == 1 for res in unlogged for v in res.verified_per_round)
    woke = [res for _, res, u in out[len(PROMPTS):] if not u]
    assert any(v > 1 for res in woke for v in res.verified_per_round)


def test_drafting_that_pays_keeps_the_engine_awake(pair, longer_ref):
    """Drafted rounds as fast as plain ones (and committing more): never dormant, and
    `dormancy=False` never is whatever drafting costs."""
    (tcfg, tparams, _), ref = pair, longer_ref
    for engine in (_timed_engine(tcfg, tparams, ref, drafted_ms=1.0),
                   _timed_engine(tcfg, tparams, ref, drafted_ms=20.0, dormancy=False)):
        out = _run_waves(engine, waves=2)
        assert [res.token_ids for _, res, _ in out] == [ref[i] for i, _, _ in out]
        assert engine.metrics.dormant_spans == 0 and engine.metrics.dormant_rounds == 0


def test_verdict_sets_the_windows_worth_against_its_time(pair):
    """A window's verdict: its steps' worth in plain steps (a drafted step committing N
    tokens over b rows: N / b) at the dormant plain steps' median time (the awake ones'
    until dormant steps are timed), against its time; dormant unless above 1 by the
    margin (5%). Steps with
    an unlogged request seated do not count; a drafted step at a row count with no timed
    plain step holds the verdict until the next step there, which runs plain."""
    tcfg, tparams, ref = pair
    engine = _timed_engine(tcfg, tparams, ref, drafted_ms=1.0)
    rows = [0, 1]
    engine._observe_dormancy(True, rows, 2, 5, 2e-3)  # no plain step timed at 2 rows: the verdict waits
    engine._observe_dormancy(True, rows, 2, 5, 2e-3)
    engine._observe_dormancy(True, rows, 2, 5, 2e-3)
    assert not engine.dormant and len(engine._window) == WINDOW and engine._plain_wanted(rows)
    assert not engine._plain_wanted([0])
    engine._observe_dormancy(False, rows, 2, 2, 1e-3)  # (7.5 + 1) ms of worth in 7 ms: stays awake
    assert not engine.dormant and not engine._window and not engine._plain_wanted(rows)
    engine._observe_dormancy(True, rows, 2, 5, 2e-3)  # worth 2.5 plain steps in 2 ms
    assert engine.dormancy_balance() == pytest.approx(2.5 / 2)
    engine._observe_dormancy(True, rows, 2, 3, 2e-3)
    engine._observe_dormancy(False, rows, 2, 2, 1e-3)  # (2.5 + 1.5 + 1) ms in 5 ms: balance 1, dormant
    assert engine.dormant and engine.metrics.dormant_spans == 1
    assert engine._dormant_left == DORMANT_SPAN * WINDOW and engine._span == 2 * DORMANT_SPAN
    for _ in range(DORMANT_SPAN * WINDOW):
        engine._observe_dormancy(False, rows, 2, 2, 0.95e-3)
    assert engine._dormant_left == 0
    engine._set_dormant(False)
    engine._reset_window()
    assert engine._unlogged.all()  # seated when dormancy began
    engine._unlogged[0] = False
    engine._observe_dormancy(True, rows, 2, 8, 1e-3)  # an unlogged request is seated: left out
    assert not engine._window
    engine._unlogged[1] = False  # (new requests, seated awake)
    engine._observe_dormancy(False, rows, 2, 2, 1e-3)
    engine._observe_dormancy(False, rows, 2, 2, 1e-3)
    engine._observe_dormancy(True, rows, 2, 3, 1.4e-3)  # 3.5 x 0.95 ms of worth in 3.4 ms: 0.978
    assert engine.dormant and engine._span == 4 * DORMANT_SPAN
    for drafted, dormant, span in ((1.2e-3, True, 8 * DORMANT_SPAN),  # 3.325 ms in 3.2: 1.039, close: dormant
                                   (1.0e-3, False, DORMANT_SPAN)):  # 3.325 ms in 3 ms: 1.108, stays awake
        engine._set_dormant(False)
        engine._reset_window()
        engine._unlogged[:] = False
        engine._observe_dormancy(False, rows, 2, 2, 1e-3)
        engine._observe_dormancy(False, rows, 2, 2, 1e-3)
        engine._observe_dormancy(True, rows, 2, 3, drafted)
        assert engine.dormant == dormant and engine._span == span


def test_gate_memory_carries_dormancy(pair, longer_ref):
    """An engine taking up a dormant engine's memory starts dormant for the span it had
    left and knows its timed steps; a dormant engine's warmup and round profile run
    awake and leave it dormant; a dormant engine cannot draft; an engine without
    dormancy ignores that part of the memory. Only the scheduled policies go dormant."""
    (tcfg, tparams, _), ref = pair, longer_ref
    engine = _timed_engine(tcfg, tparams, ref, drafted_ms=1.0)
    for _ in range(2):
        engine._observe_dormancy(False, [0, 1], 2, 2, 1e-3)
    engine._observe_dormancy(True, [0, 1], 2, 2, 5e-3)  # worth 1 plain step in 5 ms
    assert engine.dormant
    memory = engine.gate_memory()
    nxt = _timed_engine(tcfg, tparams, ref, drafted_ms=1.0)
    nxt.recall_gate(memory)
    assert nxt.dormant and nxt._dormant_left == engine._dormant_left and nxt._span == engine._span
    assert [list(d) for d in nxt._busy] == [list(d) for d in engine._busy]
    nxt.warmup((5,), greedy=True)
    nxt.profile_rounds(repeats=1, warmup=1, save=False)
    assert nxt.dormant and nxt._state.log is None and nxt._state.draft_cache is None
    with pytest.raises(DSparkError, match="dormant"):
        nxt._round(ADAPTIVE[-1], True)
    with pytest.raises(DSparkError, match="dormancy_window"):
        _timed_engine(tcfg, tparams, ref, drafted_ms=1.0, dormancy_window=0)
    drafter, dparams = slot_oracle(tcfg, ref)
    assert not Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed",
                      dormancy=True).dormancy  # the fixed policies verify what they are told
    off = _timed_engine(tcfg, tparams, ref, drafted_ms=1.0, dormancy=False)
    off.recall_gate(memory)
    assert not off.dormant


def test_dormant_rounds_run_plain_decodings_compiled_programs(pair, longer_ref):
    """A dormant engine's rounds and prefill passes are plain decoding's engine's own
    compiled programs (the same arguments, shapes and types): they compile nothing new."""
    (tcfg, tparams, _), ref = pair, longer_ref
    plain = Engine(tcfg, tparams, None, None, slots=SLOTS, max_len=MAX_LEN, policy="none", sps=SPS, buckets=ADAPTIVE)
    plain.warmup((5,), greedy=True)
    compiled = slot_round.engine_round._cache_size(), slot_round.admit._cache_size()
    engine = _timed_engine(tcfg, tparams, ref, drafted_ms=1.0)
    engine._set_dormant(True)
    engine._warm(engine._prefill_passes((5,)), greedy=True)
    assert (slot_round.engine_round._cache_size(), slot_round.admit._cache_size()) == compiled
