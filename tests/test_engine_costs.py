"""The scheduled policies' cost model: the step curve the production variant reads (a
round at B costs its bucket), the plain round's own rate in the drafting gate, and
measured round times (Engine.profile_rounds): they reach the gate and the objective,
go to the profile file and come back from it, and the output stays greedy; the
per-slot smoothed survival the gate reads, its probes' back-off, its check of the
confidences against the acceptance seen (all slots and per slot) and of its own
estimates where it drafted because they paid (the verdict it reaches while a round
runs: test_engine_foresight.py), the relaxation of the estimates of slots it skips, the
production prior's transfers; and the plain rounds' deferred drafter ingest (the drafts
after it equal an engine that ingests every round)."""

import itertools
import json
import types

import jax
import numpy as np
import pytest

from dspark_jax import profile_sps, scheduler
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from tests.test_engine import (ADAPTIVE, FULL, GAMMA, MAX_LEN, SLOTS, SPS, pair, random_block_drafter,
                               run_staggered, slot_oracle)

assert pair  # a fixture, used by name


def test_step_curve_puts_production_capacity_on_a_bucket_edge():
    sps = 100.0 / (1.0 + 0.15 * np.arange(17))
    buckets = (2, 4, 8, 16)
    step = profile_sps.at_buckets(sps, buckets)
    np.testing.assert_allclose(step[[1, 2, 3, 4, 5, 8, 9, 16]], sps[[2, 2, 4, 4, 8, 8, 16, 16]], rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = int(rng.integers(1, 4))
        survival = np.cumprod(rng.uniform(0.2, 1.0, (rows, 5)), axis=1)
        k = scheduler.global_capacity(survival, step)
        assert rows + k in buckets or k == survival.size, (rows, k)
        # at the cost the engine really pays (its bucket's), the interpolated choice is never better
        k_smooth = scheduler.global_capacity(survival, sps)
        theta = [scheduler.throughput(survival, step, scheduler._top_k_depths(survival, kk)) for kk in (k, k_smooth)]
        assert theta[0] >= theta[1] - 1e-9


def test_gate_reads_the_plain_round_rate():
    survival = np.cumprod(np.full((2, 3), 0.6), axis=1)
    sps = np.full(9, 100.0)
    assert scheduler.speculation_pays(survival, sps, draft_time=0.0)[0]
    pays, spec, plain = scheduler.speculation_pays(survival, sps, draft_time=0.0, plain_sps=np.full(9, 300.0))
    assert not pays and plain == pytest.approx(600.0) and spec < plain


def _rounds(spec_ms: float, plain_ms: float) -> dict:
    return {"spec": {b: spec_ms / 1e3 for b in ADAPTIVE}, "plain": {2: plain_ms / 1e3}}


@pytest.mark.parametrize("policy", ["production", "algorithm1"])
def test_measured_round_times_drive_the_gate(pair, policy):
    """Speculative rounds measured 20x dearer than plain ones: the gate runs plain rounds
    except for its probes; measured equal: it always drafts. Greedy either way."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    plain_rounds = {}
    for name, rounds in (("dear", _rounds(20.0, 1.0)), ("cheap", _rounds(1.0, 1.0))):
        engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
                        buckets=ADAPTIVE, draft_time=0.5, probe_every=3, rounds=rounds)
        assert engine.gated and engine.draft_time == 0.0  # the measured rounds include drafting
        np.testing.assert_allclose(engine.plain_sps[1:], 1e3 / 1.0, rtol=1e-6)
        assert [r.token_ids for r in run_staggered(engine)] == ref
        plain_rounds[name] = (engine.metrics.plain_rounds, engine.metrics.rounds)
    dear, cheap = plain_rounds["dear"], plain_rounds["cheap"]
    assert cheap[0] == 0 and dear[0] >= dear[1] // 2, plain_rounds
    with pytest.raises(DSparkError, match="bucket"):
        Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
               buckets=ADAPTIVE, rounds={"spec": {2: 0.01}, "plain": {2: 0.01}})


def test_profile_rounds_is_stored_and_reused(pair, tmp_path):
    """An engine whose SPS profile comes from a file times its rounds at every bucket
    (and the host work of a drafted step, leaving the gate's state as it was), writes
    them next to the profile, and the next engine on that file schedules with them."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    path = str(tmp_path / "sps.json")
    key = profile_sps.profile_key(tcfg, slots=SLOTS, gamma=GAMMA, max_len=MAX_LEN,
                                  tap_layers=drafter.tap_layers, drafter=drafter)
    profile_sps.save(path, key, {b: float(SPS[b]) for b in ADAPTIVE}, FULL, draft_seconds=0.004)
    ticks = iter(np.arange(0.0, 1e5, 0.01))  # every clock reading 10 ms later: every round "takes" 10 ms

    def make(policy="production", **kw):
        return Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy,
                      sps_file=path, buckets=ADAPTIVE, **kw)

    first = make(clock=lambda: float(next(ticks)))
    assert first.rounds is None and first.draft_time == pytest.approx(0.004)  # the pass model
    times = first.profile_rounds(repeats=3, warmup=1)
    assert sorted(times["spec"]) == list(ADAPTIVE) and sorted(times["plain"]) == [2]
    assert sorted(times["flush"]) == [(n, w) for n in first.flush_lines for w in first.flush_widths]
    assert all(t == pytest.approx(0.01) for kind in ("spec", "plain", "flush") for t in times[kind].values())
    assert times["host"] == pytest.approx(0.01) and first._host_time == pytest.approx(0.01)
    assert first._prior is None and not first._recent.any() and not first._max_depth.any()  # put back
    assert first.rounds == times and first.draft_time == 0.0
    stored = json.load(open(path))["profiles"][profile_sps.digest(key)]["rounds"]["production"]
    assert stored["spec"] == {str(b): pytest.approx(0.01) for b in ADAPTIVE}
    text = profile_sps.markdown(json.load(open(path))["profiles"][profile_sps.digest(key)])
    assert "engine rounds (production)" in text and "host work per drafted step: 10.000 ms" in text

    second = make()
    assert second.rounds is not None and second.gated and second.draft_time == 0.0
    assert second.rounds["flush"] == pytest.approx(times["flush"])  # (lines, width) keys come back
    assert second._host_time == pytest.approx(0.01)
    np.testing.assert_allclose(second.sps[1:], 100.0, rtol=1e-5)  # 10 ms at every bucket
    assert [r.token_ids for r in run_staggered(second)] == ref
    assert make(policy="algorithm1").rounds is None  # stored per policy
    fixed = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed", buckets=(FULL,))
    with pytest.raises(DSparkError, match="scheduled policies"):
        fixed.profile_rounds()
    second.submit([1, 2, 3], 4)
    with pytest.raises(DSparkError, match="idle"):
        second.profile_rounds()


def test_gate_reads_each_slots_smoothed_survival(pair):
    """The gate's estimate is each slot's survival smoothed over its rounds (a slot's first
    drafted round is taken as is; before it, the running mean stands in), and positions
    past a slot's depth limit keep their value."""
    import types

    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                    buckets=ADAPTIVE, draft_time=0.004)
    engine._max_depth[:], engine._max_new[:], engine._n_out[:] = GAMMA, 20, 1

    def learn(survival, active=(True, True)):
        engine._learn_survival(range(SLOTS), types.SimpleNamespace(active=np.asarray(active),
                                                                    survival=np.asarray(survival, np.float32)))

    first = np.array([[0.9, 0.5, 0.2], [0.6, 0.3, 0.1]])
    learn(first)
    np.testing.assert_allclose(engine._recent, first, rtol=1e-6)  # no history, no mean yet: taken as is
    second = np.array([[0.1, 0.0, 0.0], [0.8, 0.8, 0.8]])
    engine._n_out[1] = 18  # one draft of room left: only slot 1's first position is live
    learn(second)
    np.testing.assert_allclose(engine._recent[0], 0.8 * first[0] + 0.2 * second[0], rtol=1e-6)
    np.testing.assert_allclose(engine._recent[1], [0.8 * 0.6 + 0.2 * 0.8, 0.3, 0.1], rtol=1e-6)
    engine._recent[1], engine._n_out[1] = 0.0, 1  # a newly seated slot: the running mean stands in
    prior = engine._prior.copy()
    est, fresh = engine._gate_estimates(np.array([0, 1]))
    np.testing.assert_allclose(est[1], prior, rtol=1e-6)  # acceptance ratio 1: nothing tallied yet
    assert fresh.tolist() == [False, True]
    learn(second, active=(False, True))
    np.testing.assert_allclose(engine._recent[1], second[1], rtol=1e-6)  # then its own first round
    np.testing.assert_allclose(engine._recent[0], 0.8 * first[0] + 0.2 * second[0], rtol=1e-6)  # not drafted


def _gate_engine(tcfg, tparams, ref, rounds, survival, margin=0.0):
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                    buckets=ADAPTIVE, probe_every=3, rounds=rounds, gate_margin=margin)
    engine._max_depth[:], engine._max_new[:], engine._n_out[:] = GAMMA, 20, 1
    engine._prior = np.asarray(survival, np.float64)
    engine._recent[:] = survival
    return engine


def test_gate_recomputes_only_a_verdict_the_shrinking_room_could_change(pair):
    """A verdict to draft is recomputed when a request's room left shrinks (here, to no
    draft at all: then it does not pay); a verdict not to draft stands while the room
    shrinks, since that only makes drafting pay less, until a seat, a departure or a
    drafted round."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3}}
    for survival, first in (([0.9, 0.8, 0.7], True), ([0.1, 0.0, 0.0], False)):
        engine = _gate_engine(tcfg, tparams, ref, rounds, survival)
        calls = []
        verdicts = engine._verdicts
        engine._verdicts = lambda *a, verdicts=verdicts, calls=calls: calls.append(1) or verdicts(*a)
        assert engine.should_draft([0, 1]) == first and engine.should_draft([0, 1]) == first
        assert len(calls) == 1  # cached
        engine._n_out[:] = engine._max_new - 2  # room for one draft
        assert engine.should_draft([0, 1]) == first and len(calls) == (2 if first else 1)
        engine._n_out[:] = engine._max_new - 1  # no room for a draft
        assert not engine.should_draft([0, 1]) and len(calls) == (3 if first else 1)
    engine._n_out[:] = 1
    assert not engine.should_draft([0, 1]) and len(calls) == 1  # (in a run, room grows only at a seat)
    engine.should_draft([0])
    assert len(calls) == 2  # a departure: recomputed
    engine._learn_acceptance([0], types.SimpleNamespace(
        active=np.ones(SLOTS, bool), depth=np.full(SLOTS, GAMMA), survival=np.full((SLOTS, GAMMA), 0.1),
        accepted=np.zeros(SLOTS)))
    engine.should_draft([0])
    assert len(calls) == 3  # a drafted round: recomputed


def test_gate_relaxes_the_estimates_of_slots_it_skips(pair):
    """The estimates of a slot not drafted for move towards the request's own mean
    survival (with OWN_MEAN_PRIOR rounds' worth of the running mean) by STALE_KEEP a
    round, so a verdict not to draft, reached on a bad stretch, is looked at again as the
    plain streak grows (at 2 and 8 rounds, not every round) and drafting resumes once the
    relaxed estimates pay: here the running mean pays (2 x 3.4 tokens in 2.5 ms against
    2 in 1 ms) and 0.05 a position does not. A request whose own rounds were all bad
    stays undrafted."""
    tcfg, tparams, ref = pair
    resumed = {}
    for own_rounds in (0, 10):
        engine = _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.9, 0.8, 0.7])
        engine._recent[:], engine._probe_gap = 0.05, 1000  # (no probes)
        engine._own_survival[:] = np.array([0.05 * own_rounds, own_rounds])[:, None, None]
        calls = []
        verdicts = engine._verdicts
        engine._verdicts = lambda *a, calls=calls, engine=engine: calls.append(engine._plain_streak) or verdicts(*a)
        assert not engine.should_draft([0, 1])
        est, _ = engine._gate_estimates(np.array([0, 1]))
        np.testing.assert_allclose(est[0], 0.05)  # drafted for last round: its own
        for streak in range(1, 12):
            engine.metrics.rounds += 1
            engine._plain_streak = streak
            if engine.should_draft([0, 1]):
                resumed[own_rounds] = streak
                break
        assert calls[:3] == [0, 2, 8]
        mean = (0.5 * own_rounds / 10 + 2 * np.array([0.9, 0.8, 0.7])) / (own_rounds + 2)
        est, _ = engine._gate_estimates(np.array([0, 1]))
        np.testing.assert_allclose(est[0], mean - (mean - 0.05) * 0.8 ** (streak - 1), rtol=1e-6)
    assert resumed == {0: 8}


def test_production_sends_its_prior_only_when_a_row_reads_it(pair):
    """The production variant's capacity reads the prior on device only for rows with
    no survival yet: the prior's device copy is refreshed when such a row drafts, not
    at every drafted round."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=ADAPTIVE)
    engine._max_depth[:], engine._max_new[:], engine._n_out[:] = GAMMA, 20, 1
    engine._set_prior(np.array([0.9, 0.8, 0.7]))
    engine._stale_host[0][:] = 0.5
    sent = engine._prior_dev
    engine.choose_budget([0, 1])
    assert engine._prior_dev is sent  # every row has survival of its own
    engine._stale_host[0][1] = 0.0  # a new request's row
    engine.choose_budget([0, 1])
    np.testing.assert_allclose(np.asarray(engine._prior_dev), [0.9, 0.8, 0.7], rtol=1e-6)
    sent = engine._prior_dev
    engine.choose_budget([0, 1])
    assert engine._prior_dev is sent  # unchanged since: not sent again


def test_gate_checks_its_own_estimates_where_it_drafted_because_they_paid(pair):
    """The gate tallies accepted drafts against its own estimates at the verified depths,
    over the rounds it drafted because they paid (not probes, not looks), and scales
    its estimates by that ratio: once its rounds keep finding nothing, it stops
    drafting, though the confidences (zero survival reported: no per-slot evidence)
    say nothing against them."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3}}
    engine = _gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7])
    nothing = types.SimpleNamespace(active=np.ones(SLOTS, bool), depth=np.full(SLOTS, GAMMA),
                                    survival=np.zeros((SLOTS, GAMMA)), accepted=np.zeros(SLOTS))
    engine._plain_streak = engine._probe_gap
    assert engine.should_draft([0, 1]) and not engine._paid_round  # a probe: not counted
    engine._learn_acceptance([0, 1], nothing)
    assert engine.gate_accuracy == 1.0
    engine._plain_streak = 0
    assert engine.should_draft([0, 1]) and engine._paid_round
    engine._learn_acceptance([0, 1], nothing)  # 2 x (0.9 + 0.8 + 0.7) drafts expected, none seen
    assert engine.gate_accuracy == pytest.approx(4 / (4.8 + 4))
    paid = 1
    while engine.should_draft([0, 1]):
        engine._learn_acceptance([0, 1], nothing)
        paid += 1
    assert 1 < paid < 10 and engine.gate_accuracy < 0.5
    np.testing.assert_allclose(engine.slot_acceptance_ratio(np.array([0, 1])), 1.0)  # the slots' own: unmoved


def test_gate_drafts_only_past_its_margin(pair):
    """A verdict to draft needs a speculative round predicted `gate_margin` faster than
    a plain one: here 2 x (1 + 0.9 + 0.8 + 0.7) tokens in 2.5 ms against 2 in 1 ms,
    1.36x, drafts at a 0.3 margin and not at 0.4."""
    tcfg, tparams, ref = pair
    for margin, drafts in ((0.0, True), (0.3, True), (0.4, False)):
        engine = _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.9, 0.8, 0.7], margin=margin)
        assert engine.should_draft([0, 1]) == drafts, margin
    with pytest.raises(DSparkError, match="gate_margin"):
        _gate_engine(tcfg, tparams, ref, _rounds(2.5, 1.0), [0.9, 0.8, 0.7], margin=1.0)


def test_gate_memory_carries_to_a_new_engine(pair):
    """What the gate learnt about the traffic (the running mean survival, the finished
    requests' estimates, its record, the probe wait) reaches another engine through
    gate_memory / recall_gate: a fresh engine drafts blind on its first round (nothing
    known); recalling a memory where drafting paid, it drafts because that pays, and
    recalling one where it did not (recall drops the cached verdict), it runs a plain
    round. A memory of another gamma is refused."""
    tcfg, tparams, ref = pair
    rounds = _rounds(2.5, 1.0)
    old = _gate_engine(tcfg, tparams, ref, rounds, [0.1, 0.0, 0.0])
    old._remember([np.array([0.1, 0.0, 0.0])] * 8)
    old._probe_gap = 24
    memory = old.gate_memory()
    drafter, dparams = slot_oracle(tcfg, ref)
    fresh = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="algorithm1", sps=SPS,
                   buckets=ADAPTIVE, probe_every=3, rounds=rounds)
    fresh._max_depth[:], fresh._max_new[:], fresh._n_out[:] = GAMMA, 20, 1  # two seated requests, never drafted for
    assert fresh.should_draft([0, 1])  # nothing known: it drafts to learn
    fresh.recall_gate(_gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7]).gate_memory())
    assert fresh.should_draft([0, 1]) and fresh._paid_round  # a memory where drafting paid: it pays here too
    fresh.recall_gate(memory)
    assert not fresh.should_draft([0, 1])
    np.testing.assert_allclose(fresh._prior, [0.1, 0.0, 0.0])
    assert fresh._probe_gap == 24 and len(fresh._past_estimates) == 8
    memory["prior"][:] = 0.5  # a copy: the engine's own stays
    np.testing.assert_allclose(fresh._prior, [0.1, 0.0, 0.0])
    with pytest.raises(DSparkError, match="gamma"):
        fresh.recall_gate(dict(memory, gamma=GAMMA + 1))


def _probe_streaks(engine, rounds: int) -> list[int]:
    """The plain streaks between the gate's drafted rounds over `rounds` rounds."""
    streaks, streak = [], 0
    for _ in range(rounds):
        if engine.should_draft([0, 1]):
            streaks.append(streak)
            streak = 0
        else:
            streak += 1
        engine._plain_streak = streak
    return streaks


def test_gate_backs_off_its_probes(pair):
    """While probes find speculation does not pay, the plain streak between them doubles
    up to 8 x probe_every where a probe costs little next to a plain round (1.2 ms
    against 1 ms), and further where it is dear (20 ms: up to the wait at which probes
    cost 1% of the time, 1900 rounds); a probe that finds it paying resets it."""
    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(1.2, 1.0), [0.1, 0.0, 0.0])
    assert engine.probe_cap == 24
    assert _probe_streaks(engine, 120)[:6] == [3, 6, 12, 24, 24, 24]
    engine = _gate_engine(tcfg, tparams, ref, _rounds(20.0, 1.0), [0.8, 0.6, 0.4])
    assert engine.probe_cap == 1900
    assert _probe_streaks(engine, 200)[:6] == [3, 6, 12, 24, 48, 96]
    engine._probe_gap, engine._plain_streak = 24, 0
    engine._apply_costs(_rounds(1.0, 1.0))  # speculation pays now
    assert engine.should_draft([0, 1]) and engine._probe_gap == 24  # not found by a probe: the wait stays
    engine._apply_costs(_rounds(20.0, 1.0))
    engine._plain_streak = 24
    assert engine.should_draft([0, 1])  # a probe
    engine._apply_costs(_rounds(1.0, 1.0))
    engine._plain_streak = 0
    assert engine.should_draft([0, 1]) and engine._probe_gap == 3  # it found speculation paying


def test_gate_checks_the_confidences_against_acceptance(pair):
    """Accepted drafts seen at a third of the survival's prediction scale the gate's
    estimate down: near break-even, it turns from drafting to plain rounds."""
    import types

    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(2.0, 1.0), [0.8, 0.6, 0.4])
    assert engine.acceptance_ratio == 1.0 and engine.should_draft([0, 1])
    info = types.SimpleNamespace(active=np.array([True, True]), depth=np.array([3, 1]), accepted=np.array([1, 0]),
                                 survival=np.array([[0.8, 0.6, 0.4], [0.9, 0.5, 0.2]], np.float32))
    engine._learn_acceptance([0, 1], info)  # predicted 0.8 + 0.6 + 0.4 + 0.9 = 2.7 accepted, seen 1
    assert engine.acceptance_ratio == pytest.approx(1 / 2.7, rel=1e-6)
    assert not engine.should_draft([0, 1])


def test_gate_scales_each_slot_by_its_own_acceptance(pair):
    """A slot whose drafts are all accepted and one whose drafts never are get acceptance
    ratios above and below the all-slot ratio, shrunk towards it by ACCEPTANCE_PRIOR
    predicted drafts: with the same survival, the gate expects more of the first."""
    import types

    from dspark_jax.engine_costs import ACCEPTANCE_PRIOR as k

    tcfg, tparams, ref = pair
    engine = _gate_engine(tcfg, tparams, ref, _rounds(2.0, 1.0), [0.8, 0.6, 0.4])
    info = types.SimpleNamespace(active=np.array([True, True]), depth=np.array([3, 3]), accepted=np.array([3, 0]),
                                 survival=np.array([[0.8, 0.6, 0.4], [0.8, 0.6, 0.4]], np.float32))
    engine._learn_acceptance([0, 1], info)  # each slot: 1.8 predicted; seen 3 and 0; all slots 3 / 3.6
    r = engine.acceptance_ratio
    assert r == pytest.approx(3 / 3.6)
    ratios = engine.slot_acceptance_ratio(np.array([0, 1]))
    np.testing.assert_allclose(ratios, [(3 + k * r) / (1.8 + k), (0 + k * r) / (1.8 + k)], rtol=1e-6)
    est, fresh = engine._gate_estimates(np.array([0, 1]))
    np.testing.assert_allclose(est, np.minimum(1.0, np.outer(ratios, [0.8, 0.6, 0.4])), rtol=1e-6)
    assert not fresh.any()
    engine._slot_acc[1] = 0.0  # slot 1 seated anew: the all-slot ratio stands in
    assert engine.slot_acceptance_ratio(np.array([1]))[0] == pytest.approx(r)


def test_gate_drafts_only_for_the_slots_worth_it(pair):
    """When speculation pays, the round drafts for the slots with a draft among the
    top-K candidates of the gate's estimates; the other slot gets depth limit 0, and
    its decode is plain decoding's. A probe drafts for every slot."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3}}
    engine = _gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7])
    engine._recent[1] = [0.05, 0.01, 0.0]  # a slot whose drafts barely survive
    assert engine.should_draft([0, 1]) and engine._verdict[0]
    np.testing.assert_array_equal(engine._chosen, [0])
    engine._prepare_round(True, [0, 1])
    np.testing.assert_array_equal(engine._drafting, [True, False])
    assert engine.choose_budget([0, 1]) == engine._bucket(2 + GAMMA)  # slot 1 verifies nothing
    np.testing.assert_array_equal(engine._schedule().max_depth, [GAMMA, 0])
    engine._prepare_round(False, [0, 1])  # a plain round: the limits are the slots' own again
    np.testing.assert_array_equal(engine._schedule().max_depth, [GAMMA, GAMMA])
    engine._plain_streak = engine._probe_gap
    assert engine.should_draft([0, 1]) and engine._chosen is None


def test_gate_counts_the_flush_a_drafted_round_needs(pair):
    """A drafted round first flushes the backlogs of the slots it drafts for: the gate
    adds that flush's measured time to the round's, so a round that pays when the
    drafter's cache is current does not with a long backlog to flush."""
    tcfg, tparams, ref = pair
    rounds = {"spec": {2: 1e-3, ADAPTIVE[-1]: 2e-3}, "plain": {2: 1e-3},
              "flush": {(n, w): 0.25e-3 * w for n in (SLOTS,) for w in (4, 16, MAX_LEN)}}
    engine = _gate_engine(tcfg, tparams, ref, rounds, [0.9, 0.8, 0.7])
    assert engine.flush_widths == (4, 16, MAX_LEN) and engine._flush_cost == rounds["flush"]
    assert engine._flush_seconds([0, 1]) == 0.0 and engine.should_draft([0, 1])  # current: pays
    engine._lag[0] = 3
    engine._verdict_key = None
    assert engine._flush_seconds([0, 1]) == pytest.approx(1e-3) and engine._flush_seconds([1]) == 0.0
    assert engine.should_draft([0, 1])  # 2 + 1 ms for ~6.8 tokens against 2 in 1 ms: still pays
    engine._lag[1] = 10
    engine._verdict_key = None
    assert engine._flush_seconds([0, 1]) == pytest.approx(4e-3)
    assert not engine.should_draft([0, 1])  # a 16-wide flush first: 6 ms for ~6.8 tokens


def test_lazy_ingest_drafts_what_eager_ingest_drafts(pair, tmp_path):
    """A gated engine's drafter ingests nothing at admission or in plain rounds: the
    positions wait in the feature log, and a slot's backlog is flushed just before a
    round drafts for it; slots a drafted round does not draft for get depth 0 and keep
    their backlog. Its drafts for the slots drafted for then equal those of an engine
    that ingests every round, through staggered arrivals, chunked admission and slots
    changing hands; an engine that skips the flush drafts differently. Greedy output
    throughout."""
    tcfg, tparams, ref = pair
    drafter, dparams = random_block_drafter(tcfg, tparams, tmp_path / "drafter")
    plan = ["all", "plain", "plain", "some", "plain", "all", "some", "plain", "plain", "plain", "plain", "plain"]

    def run(mode):
        engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production",
                        sps=SPS, buckets=ADAPTIVE, draft_time=0.004, probe_every=4, lazy_ingest=mode != "eager")
        assert engine.flush_widths == (4, 16, MAX_LEN) and engine.flush_lines == (1, 2)
        decisions = itertools.cycle(plan)

        def decide(occupied):
            kind = next(decisions)
            engine._chosen = np.asarray(occupied[-1:]) if kind == "some" else None
            return kind != "plain"

        engine.should_draft = decide
        flushes, run_flush = [], engine._run_flush
        engine._run_flush = lambda rows, width: flushes.append(width) or (mode != "dropped" and run_flush(rows, width))
        drafts, round_once = [], engine._round

        def logged(budget, draft, admission=None):
            info = round_once(budget, draft, admission)
            if draft:
                d, c, a, depth = jax.device_get((info.draft, info.confidence, info.active, info.depth))
                chosen = a & engine._drafting
                assert not depth[a & ~engine._drafting].any()  # not drafted for: nothing verified
                drafts.append((d[chosen], c[chosen]))
            return info

        engine._round = logged
        assert [r.token_ids for r in run_staggered(engine)] == ref
        return drafts, engine.metrics, flushes

    lazy, metrics, flushes = run("lazy")
    eager, _, none = run("eager")
    assert metrics.plain_rounds >= 8 and metrics.prefill_chunks > 0 and len(lazy) >= 5
    assert not none and max(flushes) > 4  # a prompt's backlog went in with a flush
    for (d, c), (d_ref, c_ref) in zip(lazy, eager, strict=True):
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)
    dropped, _, _ = run("dropped")
    assert any(not np.array_equal(d, d_ref) for (d, _), (d_ref, _) in zip(dropped, eager))
