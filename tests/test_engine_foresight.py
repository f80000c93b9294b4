"""The drafting gate's next verdict, reached while the device runs a round
(engine_foresight.py): after a round drafted because it paid, on the estimates before
it; after a plain round that changes the batch, exactly the verdict the next round
would reach, for the batch it will serve."""

import types

import numpy as np

from dspark_jax.engine import Engine
from tests.test_engine import ADAPTIVE, GAMMA, MAX_LEN, PROMPTS, SLOTS, SPS, pair, run_staggered, slot_oracle
from tests.test_engine_costs import _gate_engine, _rounds

assert pair  # a fixture, used by name


def test_gate_foresees_the_next_verdict_while_a_paid_round_runs(pair):
    """While a round drafted because it paid runs, the host reaches the next verdict
    (`foresee`, on the estimates before that round, with the room one token shorter);
    the next step takes it up without recomputing when the slots stay the same, with
    the estimates it read. A verdict to draft also stands across a departure (for the
    slots still seated); one not to draft is recomputed. Probes are not foreseen."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3}}
    engine = _gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7])
    calls = []
    verdicts = engine._verdicts
    engine._verdicts = lambda *a: calls.append(a[1].copy()) or verdicts(*a)
    assert engine.should_draft([0, 1]) and engine._paid_round and len(calls) == 1
    raw = engine._verdict_raw.copy()
    engine._verdict_raw[:] = 0.0  # the verdict's estimates, which the round in flight's tally reads
    engine.foresee([0, 1], True)
    assert len(calls) == 2 and calls[1].tolist() == [GAMMA, GAMMA]
    assert not engine._verdict_raw.any()  # untouched until taken up
    engine._recent[:] = [0.5, 0.4, 0.3]  # what the round in flight teaches: after the foreseen verdict
    engine._n_out[:] = engine._max_new - GAMMA - 2  # one token committed: the room foreseen
    engine._learn_acceptance([0, 1], types.SimpleNamespace(
        active=np.ones(SLOTS, bool), depth=np.full(SLOTS, GAMMA), survival=np.full((SLOTS, GAMMA), 0.9),
        accepted=np.full(SLOTS, GAMMA)))
    assert engine.should_draft([0, 1]) and len(calls) == 2  # taken up
    np.testing.assert_allclose(engine._verdict_raw, raw)  # the same estimates (the room still fits gamma)
    engine.foresee([0, 1], True)
    assert len(calls) == 3
    assert engine.should_draft([1]) and len(calls) == 3  # a departure: the verdict to draft stands
    assert engine._chosen.tolist() == [1]
    engine._recent[:], engine.gate_margin = 0.01, 0.5  # a batch where drafting does not pay
    engine.foresee([1], True)
    assert engine._foreseen[2][0] is False and len(calls) == 4
    assert not engine.should_draft([0, 1]) and len(calls) == 5  # a seat: the verdict not to draft is recomputed
    engine._plain_streak = engine._probe_gap
    assert engine.should_draft([0, 1]) and not engine._paid_round  # a probe
    engine.foresee([0, 1], True)
    assert engine._foreseen is None and len(calls) == 5


def test_gate_foresees_the_verdict_after_a_plain_round_that_changes_the_batch(pair):
    """A staggered run where plain rounds win (speculative rounds 2.5x dearer): after a
    plain round where a request leaves or a prompt completes, the next verdict is
    reached while the round runs, for the batch the next round serves, and is taken up
    without a verdict before that round; it equals the verdict reached afresh then
    (the estimates a round on, the room a token shorter, the joining slots' room as
    seated: requests of 3 new tokens join with their room below gamma). A plain round
    that changes nothing foresees nothing. Greedy throughout."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                    buckets=ADAPTIVE, rounds=_rounds(2.5, 1.0), probe_every=4)
    log = {"taken": 0, "joined": 0, "idle": 0}
    foresee, take, verdicts = engine.foresee, engine._take_foreseen, engine._verdicts
    state = {}

    def watched_foresee(occupied, drafted, plan=()):
        before = engine._verdict_key
        foresee(occupied, drafted, plan)
        state["plain"] = not drafted and engine._foreseen is not None
        state["version"], state["occupied"] = engine._past_version, list(occupied)
        if not drafted and engine._foreseen is None and engine._plain_streak + 1 < engine._probe_gap:
            log["idle"] += engine._gate_key(occupied, engine._plain_streak + 1) == before

    def checked_take(occupied, key):
        foreseen = engine._foreseen
        taken = take(occupied, key)
        if taken and state.pop("plain", False):
            assert foreseen[0] == key  # for this very batch
            log["taken"] += 1
            log["joined"] += not set(occupied) <= set(state["occupied"])  # a prompt completed in the round
            idx = np.asarray(occupied)
            limits = engine._depth_limits(idx)
            np.testing.assert_array_equal(foreseen[1], limits)
            pays, look, chosen, raw = verdicts(idx, limits)  # what this round would reach afresh
            np.testing.assert_allclose(foreseen[2][3], raw, rtol=1e-12)
            assert foreseen[2][0] == pays
            if state["version"] == engine._past_version:  # no request finished into the looks' past
                assert foreseen[2][1] == look and foreseen[2][2].tolist() == chosen.tolist()
        return taken

    engine.foresee, engine._take_foreseen = watched_foresee, checked_take
    results = run_staggered(engine)
    assert [r.token_ids for r in results] == ref
    new = [12, 7, 3, 3, 3, 1]  # requests that join with their room below gamma
    ids = [engine.submit(p, max_new_tokens=n) for p, n in zip(PROMPTS, new)]
    engine.run_until_done()
    assert [engine.result(i).token_ids for i in ids] == [r[:n] for r, n in zip(ref, new)]
    assert engine.metrics.plain_rounds > engine.metrics.rounds / 2
    assert log["taken"] >= 3 and log["joined"] >= 1 and log["idle"] >= 3, log
