"""The drafting gate's look at new requests (engine_look.py) and the keys of its
verdicts: a look is weighed from the finished requests' estimates, a repeated look
reuses its draws, and a verdict is reached again when the seated requests change, not
when a request is seated for prefilling."""

import numpy as np

from dspark_jax import scheduler
from tests.test_engine import GAMMA, PROMPTS, pair
from tests.test_engine_costs import _gate_engine, _rounds

assert pair  # a fixture, used by name


def test_gate_looks_at_new_requests_that_could_pay(pair):
    """When plain rounds win on what is known, a new request (never drafted for) gets a
    drafted round when what it may find is worth the look: the seconds per token
    speculation would save were it like the finished requests (their quantiles), times
    the tokens made while it runs, against the look's cost. Plain rounds: 2 tokens in 1
    ms (2000 tok/s); a speculative round: 2.5 ms. A new request as good as the good
    past ones (all drafts survive) makes it 5.1 tokens: 2040 tok/s, a saving of ~1e-5 s
    a token; a look at the past requests' mean costs ~0.5 ms more than plain rounds
    making its tokens. So a request with 19 tokens left gets no look, one with 199 does;
    and none when its prompt's flush is dear."""
    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.1, 0.0, 0.0])

    def verdict(**at_slot1):
        for name, value in at_slot1.items():
            getattr(engine, name)[1] = value
        engine._verdict_key = None
        return engine.should_draft([0, 1])

    assert not verdict()  # nothing remembered: no look
    engine._remember([np.array([0.1, 0.0, 0.0])] * 3 + [np.array([1.0, 1.0, 1.0])] * 5)
    assert engine._past_quantiles().shape == (8, GAMMA)
    assert not verdict(_max_new=200)  # both slots were drafted for: nothing to look at
    assert not verdict(_recent=0.0, _max_new=20)  # slot 1 is new, with 19 tokens left: not worth it
    assert verdict(_max_new=200) and engine._verdict[:2] == (False, True)  # 199 left: a look
    assert 1 in engine._chosen  # the look drafts for the new request
    engine._flush_cost = {(n, w): 0.05 for n in engine.flush_lines for w in engine.flush_widths}
    assert not verdict(_lag=20)  # its prompt's flush is dear
    engine._flush_cost = {}
    engine._remember([np.array([0.1, 0.0, 0.0])] * 8, clear=True)  # the past requests were poor: nothing to find
    assert not verdict()


def test_a_repeated_look_reuses_its_draws(pair, monkeypatch):
    """Where every verdict weighs a look at the same new requests (plain rounds winning,
    nothing drafted), the look's draws are reused: the same verdicts, with the draws
    searched once; the tokens left still count, and new past estimates are searched
    afresh."""
    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.1, 0.0, 0.0])
    engine._remember([np.array([0.1, 0.0, 0.0])] * 3 + [np.array([1.0, 1.0, 1.0])] * 5)
    engine._recent[1], engine._max_new[1] = 0.0, 200
    calls = []
    search = scheduler.best_rounds
    monkeypatch.setattr(scheduler, "best_rounds", lambda *a, **k: calls.append(1) or search(*a, **k))

    def verdict():
        engine._verdict_key = None
        return engine.should_draft([0, 1]), engine._verdict[1]

    first = verdict()
    searched = len(calls)
    assert first == (True, True) and searched >= 1  # a look
    assert verdict() == first and verdict() == first
    assert len(calls) == searched + 2  # (the verdict's own best round, 1 a time): the draws were reused
    engine._max_new[1] = 20  # 19 tokens left: no longer worth a look, from the same draws
    assert verdict() == (False, False) and len(calls) == searched + 3
    engine._max_new[1] = 200
    engine._remember([np.array([0.1, 0.0, 0.0])] * 8, clear=True)  # poor past requests: searched afresh
    assert verdict() == (False, False) and len(calls) > searched + 4


def test_verdicts_are_keyed_by_the_seated_requests(pair):
    """A request seated for chunked prefill is not in the batch the gate decides on: the
    standing verdict stays. A request seated where another left (a prefill pass, the
    same slots) is a new batch: the verdict is reached again."""
    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.1, 0.0, 0.0])
    calls = []
    verdicts = engine._verdicts
    engine._verdicts = lambda *a: calls.append(1) or verdicts(*a)
    for p in PROMPTS[:2]:
        engine.submit(p, max_new_tokens=8)
    engine.step()  # both seated by a prefill pass
    assert engine._plain_streak == 1 and len(calls) == 1
    engine._seat(1, engine._slot_req[1], 0.0)  # the same request re-seated: nothing new
    assert not engine.should_draft([0, 1]) and len(calls) == 1
    old = engine._slot_req[1]
    engine.submit(PROMPTS[2], max_new_tokens=8)
    new = engine._waiting.popleft()
    engine._seat(1, new, 0.0)  # another request in slot 1
    assert not engine.should_draft([0, 1]) and len(calls) == 2
    assert not engine.should_draft([0, 1]) and len(calls) == 2  # it stands
    engine._slot_req[1] = old
    assert not engine.should_draft([0]) and len(calls) == 3
    engine._prefilling.append(1)  # seated for prefilling: not in the batch
    engine._seat(1, new, 0.0)
    assert not engine.should_draft([0]) and len(calls) == 3
