"""The round's token bucket (engine_budget.py): the production variant searches the next
round's capacity while a drafted round runs (it reads the survival of the round before
last, known by then), and the next round takes it up only for the batch and the slots
drafted for that were foreseen; the engine's output stays greedy with it."""

import types

import numpy as np

from dspark_jax import scheduler
from dspark_jax.engine import Engine
from tests.test_engine import ADAPTIVE, GAMMA, MAX_LEN, PROMPTS, SLOTS, SPS, pair, run_staggered, slot_oracle

assert pair  # a fixture, used by name

HIGH = np.array([0.95, 0.9, 0.85])  # survival worth the full bucket at SPS
LOW = np.array([0.05, 0.02, 0.01])  # survival worth no draft at all


def _seated(tcfg, tparams, ref, **kw):
    """A production engine with two requests seated and one round run."""
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=ADAPTIVE, **kw)
    for p in PROMPTS[:SLOTS]:
        engine.submit(p, max_new_tokens=20)
    engine.step()
    assert engine._slot_req[0] is not None and engine._slot_req[1] is not None
    return engine


def _count_searches(monkeypatch) -> list:
    calls = []
    search = scheduler.global_capacity
    monkeypatch.setattr(scheduler, "global_capacity", lambda *a, **k: calls.append(1) or search(*a, **k))
    return calls


def _round_ends(engine, survival):
    """What a drafted round's end does to the facts the next budget reads."""
    engine._stale_host = np.stack([engine._stale_host[1], np.broadcast_to(survival, engine._stale_host[1].shape)])
    engine._n_out[:SLOTS] += 1


def test_production_searches_the_next_capacity_while_a_round_runs(pair, monkeypatch):
    """While round t runs, the capacity of round t+1 is searched on the survival of round
    t-1 (stale row 1 now, row 0 once round t ends); the next choice of budget takes it
    up without a search and picks the bucket a search then would. Reading row 0 instead
    would pick the smallest bucket here."""
    tcfg, tparams, ref = pair
    engine = _seated(tcfg, tparams, ref)
    assert not engine.gated  # every round drafts for every slot
    calls = _count_searches(monkeypatch)
    engine._stale_host[0][:] = LOW  # round t-2's survival: no longer read after round t
    engine._stale_host[1][:] = HIGH  # round t-1's
    engine._drafting[:] = True
    engine.foresee_budget([0, 1])
    assert len(calls) == 1
    _round_ends(engine, LOW)
    bucket = engine.choose_budget([0, 1])
    assert len(calls) == 1 and bucket == ADAPTIVE[-1]
    assert engine.choose_budget([0, 1]) == bucket and len(calls) == 2  # used once: searched now, the same bucket
    engine._stale_host[0][:] = LOW
    assert engine.choose_budget([0, 1]) == ADAPTIVE[0] and len(calls) == 3


def test_foreseen_capacity_is_only_for_the_batch_and_slots_foreseen(pair, monkeypatch):
    """A departure, a request seated in a slot another left, or a verdict drafting for
    other slots than foreseen: the capacity is searched afresh. The gated engine foresees
    for the slots its foreseen verdict drafts for, and not after a verdict not to draft."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {b: 1e-3 for b in ADAPTIVE}, "plain": {2: 1e-3}}
    engine = _seated(tcfg, tparams, ref, rounds=rounds)
    assert engine.gated
    calls = _count_searches(monkeypatch)
    engine._stale_host[:] = HIGH
    engine._drafting[:] = True
    raw = np.zeros((SLOTS, GAMMA))
    engine._foreseen = ((0, 1), None, (True, False, np.array([0, 1]), raw))
    engine.foresee_budget([0, 1])
    engine.choose_budget([1])  # a departure
    assert len(calls) == 2
    engine.foresee_budget([0, 1])
    engine._slot_req[1] = types.SimpleNamespace(result=types.SimpleNamespace(request_id=99))  # another request
    engine.choose_budget([0, 1])
    assert len(calls) == 4
    engine._slot_req[1] = None
    engine = _seated(tcfg, tparams, ref, rounds=rounds)
    engine._stale_host[:] = HIGH
    engine._foreseen = ((0, 1), None, (True, False, np.array([1]), raw))  # drafts for slot 1 only
    calls.clear()
    engine.foresee_budget([0, 1])
    engine._drafting[:] = [False, True]
    engine.choose_budget([0, 1])
    assert len(calls) == 1  # taken up
    engine.foresee_budget([0, 1])
    engine._drafting[:] = True
    engine.choose_budget([0, 1])
    assert len(calls) == 3  # the round drafts for both: searched afresh
    engine._foreseen = ((0, 1), None, (False, False, np.array([], np.int64), raw))
    engine.foresee_budget([0, 1])
    assert engine._foreseen_capacity is None and len(calls) == 3


def test_production_engine_with_foreseen_budgets_stays_greedy(pair, monkeypatch):
    """A whole staggered run: most drafted rounds take up a foreseen capacity, and the
    output equals plain greedy decoding for every request."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=ADAPTIVE)
    taken = []
    take = engine._take_foreseen_capacity

    def counted(*a):
        k = take(*a)
        taken.append(k is not None)
        return k
    engine._take_foreseen_capacity = counted
    results = run_staggered(engine)
    assert [r.token_ids for r in results] == ref
    assert sum(taken) > len(taken) / 2, taken
