"""The gate's step-cost factor (engine_step_costs.py): what drafted steps took against
their prediction, over what plain steps at the same row count took against theirs;
calibrated once (`calibrate_step_costs`, or from another engine's `gate_memory`), or
followed live with `learn_step_costs`."""

import numpy as np
import pytest

from dspark_jax.engine import Engine
from dspark_jax.engine_step_costs import CALIBRATION_PRIOR, FACTOR_RANGE
from tests.test_engine import ADAPTIVE, MAX_LEN, SLOTS, SPS, pair, run_staggered, slot_oracle
from tests.test_engine_costs import _gate_engine, _rounds

assert pair  # a fixture, used by name

ROUNDS = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3, 1: 0.8e-3}}


def _shrunk(raw: float, n: int) -> float:
    return 1.0 + n / (n + CALIBRATION_PRIOR) * (raw - 1.0)


def test_factor_sets_drafted_steps_against_plain_steps_at_their_row_count(pair):
    """Plain steps at 2 rows ran 1.2x their prediction, at 1 row 3x; drafted steps at 2
    rows 3.6x: the realized factor is 3 (shrunk towards 1 by the steps seen), and the
    1-row plain steps do not enter it. Drafted steps before any plain step at their row
    count, and hiccups, are left out. Uncalibrated, the gate reads 1; calibrated, the
    factor, and a round that paid on the profile no longer does."""
    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, ROUNDS, [0.9, 0.8, 0.7])
    assert engine.should_draft([0, 1])
    spec, plain2, plain1 = 1 / engine.sps[ADAPTIVE[-1]], 1 / engine.plain_sps[2], 1 / engine.plain_sps[1]
    engine._observe_step(True, ADAPTIVE[-1], 2, 3.6 * spec)  # no plain step at 2 rows yet: left out
    assert engine.realized_cost_factor() == 1.0
    for _ in range(5):
        engine._observe_step(False, 2, 2, 1.2 * plain2)
        engine._observe_step(False, 1, 1, 3.0 * plain1)
    for n in range(1, 7):
        engine._observe_step(True, ADAPTIVE[-1], 2, 3.6 * spec)
        assert engine.realized_cost_factor() == pytest.approx(_shrunk(3.0, n))
    engine._observe_step(True, ADAPTIVE[-1], 2, 100 * spec)  # a hiccup (a compile): left out
    assert engine.realized_cost_factor() == pytest.approx(_shrunk(3.0, 6))
    assert engine.spec_cost_factor == 1.0 and engine.should_draft([0, 1])  # not calibrated: not read
    assert engine.calibrate_step_costs() == pytest.approx(_shrunk(3.0, 6))
    assert engine.spec_cost_factor == pytest.approx(_shrunk(3.0, 6))
    assert not engine.should_draft([0, 1])  # the verdict was reached afresh on it
    engine._observe_step(False, 2, 2, 0.1 * plain2)  # later steps do not move a calibrated factor
    assert engine.spec_cost_factor == pytest.approx(_shrunk(3.0, 6))
    for _ in range(200):
        engine._observe_step(False, 2, 2, 0.5 * plain2)
        engine._observe_step(True, ADAPTIVE[-1], 2, 3.9 * spec)
    assert engine.realized_cost_factor() == FACTOR_RANGE[1]  # 7.8: clipped


def test_predicted_drafted_step_counts_its_flush_and_host_work(pair):
    """A drafted step's prediction is its round at the chosen bucket, the drafting pass,
    the flush it ran (at the (lines, width) `_flush` ran) and a drafted step's host
    work; a plain step's, its round over the rows."""
    tcfg, tparams, ref = pair
    rounds = {**ROUNDS, "flush": {(SLOTS, 4): 0.25e-3, (SLOTS, MAX_LEN): 3e-3}, "host": 0.1e-3}
    engine = _gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7])
    engine._flushed = None
    assert engine._predicted_step(True, ADAPTIVE[-1], 2) == pytest.approx(2e-3 + 0.1e-3)
    engine._flushed = (SLOTS, MAX_LEN)
    assert engine._predicted_step(True, ADAPTIVE[-1], 2) == pytest.approx(2e-3 + 3e-3 + 0.1e-3)
    assert engine._predicted_step(False, 2, 2) == pytest.approx(1e-3)


def test_steps_of_a_run_calibrate_the_next_engine(pair):
    """A staggered run with a clock where plain rounds take 1.5x their prediction and
    drafted ones 3x (speculative rounds 20x dearer: plain rounds and probes): only steps
    without prompt work are observed, each at its ratio; output stays greedy. The run's
    own gate reads no factor (not calibrated); an engine taking up its gate memory reads
    the realized one, and `learn_step_costs` follows it live."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    now = [0.0]

    def make(**kw):
        engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                        buckets=ADAPTIVE, probe_every=2, rounds=_rounds(20.0, 1.0), clock=lambda: now[0], **kw)
        run_round = engine._round

        def timed_round(budget, draft, admission=None, greedy=None):
            rows = sum(r is not None and s not in engine._prefilling for s, r in enumerate(engine._slot_req))
            now[0] += (3.0 if draft else 1.5) * engine._predicted_step(draft, budget, rows)
            return run_round(budget, draft, admission, greedy)

        engine._round = timed_round
        return engine

    engine = make()
    observed = []
    observe = engine._observe_step
    engine._observe_step = lambda *a: observed.append(a) or observe(*a)
    results = run_staggered(engine)
    assert [r.token_ids for r in results] == ref
    drafted = [a for a in observed if a[0]]
    assert drafted and len(observed) < engine.metrics.rounds  # rounds with prompt work are not observed
    plain = [x for d in engine._plain_ratio for x in d]
    assert plain and np.allclose(plain, 1.5)
    assert 0 < len(engine._drafted_ratio) <= len(drafted) and np.allclose(engine._drafted_ratio, 2.0)
    assert engine.spec_cost_factor == 1.0
    factor = _shrunk(2.0, len(engine._drafted_ratio))
    assert engine.realized_cost_factor() == pytest.approx(factor)
    memory = engine.gate_memory()
    nxt = make()
    nxt.recall_gate(memory)
    assert nxt.spec_cost_factor == pytest.approx(factor)
    live = make(learn_step_costs=True)
    live.recall_gate(memory)
    assert live.spec_cost_factor == pytest.approx(factor)  # read before its next steps: they must move it
    live._observe_step(False, 2, 2, 1.0 / live.plain_sps[2])
    live._observe_step(True, ADAPTIVE[-1], 2, 1.0 / live.sps[ADAPTIVE[-1]])  # 1x against the plain steps' median 1.5
    assert live.spec_cost_factor == pytest.approx(_shrunk(float(np.median(list(memory["drafted_ratio"]) + [2 / 3])),
                                                          len(memory["drafted_ratio"]) + 1))
