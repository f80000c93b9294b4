"""The continuous-batching engine: packed verification == dense verification; at
temperature 0 every request's output equals plain greedy decoding whatever the arrival
and departure timing, the policy and the drafter; the engine drafts only at the row
counts where the profile says drafting pays; bad requests fail alone; the production
variant's capacity comes from survival two rounds old (in the unit and in the engine's
per-round depths)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import drafters, generation, scheduler, target
from dspark_jax.engine import SCHEDULED, Engine
from dspark_jax.engine import policies
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from tests.helpers import OracleDrafter, make_block_drafter, write_block_drafter

# the second token of every prompt is unique: SlotOracle recognises its request by it
PROMPTS = [[5, 101, 7, 8, 9], [10, 102], [12, 103, 14, 15, 16, 17, 18, 19, 20], [40, 104],
           [41, 105, 43], [7, 106, 9, 9, 9, 9]]
NEW = [12, 7, 10, 3, 9, 1]
SLOTS, MAX_LEN, GAMMA = 2, 32, 3
FULL = SLOTS * (GAMMA + 1)
ADAPTIVE = (2, FULL)  # the production engines' buckets
SPS = 100.0 / (1.0 + 0.15 * np.arange(FULL + 1))  # decreasing steps/s
ACCEPTANCE = [0.5, 0.3, 0.1]  # a drafter's mean survival per position (drafting_by_row_count)


TARGET = os.path.join(FIXTURES, "qwen3_tiny_untied")


@pytest.fixture(scope="module")
def pair():
    tcfg, tparams = target.load(TARGET)
    ref = target.greedy_decode(tcfg, tparams, PROMPTS, max(NEW), max_len=MAX_LEN)
    return tcfg, tparams, [r[:n] for r, n in zip(ref, NEW)]


def random_block_drafter(tcfg, tparams, folder):
    """A random DSpark drafter written and loaded like a real one (test_load_bench builds
    the same one, so the two files share compiled programs)."""
    drafter, dparams = make_block_drafter(tcfg, block_size=GAMMA)
    return drafters.load(write_block_drafter(folder, TARGET, tparams, drafter, dparams), tcfg)


@dataclasses.dataclass(frozen=True)
class SlotOracle(OracleDrafter):
    """OracleDrafter for an engine, where slots change hands: each request is recognised
    by its prompt's second token at admission and drafts that request's reference
    continuation (wrong where `corrupt` says), with confidences from a random table."""

    def init_cache(self, batch, max_len):
        return {"len": jnp.zeros((batch,), jnp.int32), "row": jnp.zeros((batch,), jnp.int32)}

    def ingest(self, dparams, tparams, dcache, feats, next_tokens, start, count):
        new = (start == 0) & (count > 0)
        row = jnp.where(new, dparams["row_of"][next_tokens[:, 0]], dcache["row"])
        return {"len": jnp.where(count > 0, start + count, dcache["len"]), "row": row}

    def propose(self, dparams, tparams, dcache, anchor, start, sampling, keys):
        rows = dcache["row"]
        mine = {"ref": dparams["ref"][rows], "corrupt": dparams["corrupt"][rows]}
        tok, q, _ = super().propose(mine, tparams, dcache, anchor, start, sampling, keys)
        pos = jnp.clip(start[:, None] + 1 + jnp.arange(self.gamma)[None, :], 0, dparams["ref"].shape[1] - 1)
        return tok, q, jnp.take_along_axis(dparams["conf"][rows], pos, axis=1)


def slot_oracle(tcfg, ref, corrupt_rate=0.25, seed=0):
    toks = np.zeros((len(PROMPTS), MAX_LEN + GAMMA + 2), np.int32)
    for i, (p, r) in enumerate(zip(PROMPTS, ref)):
        toks[i, :len(p + r)] = p + r
    rng = np.random.default_rng(seed)
    row_of = np.zeros(tcfg.vocab_size, np.int32)
    row_of[[p[1] for p in PROMPTS]] = np.arange(len(PROMPTS))
    params = {"ref": jnp.asarray(toks), "corrupt": jnp.asarray(rng.random(toks.shape) < corrupt_rate),
              "conf": jnp.asarray(rng.uniform(0.3, 1.0, toks.shape), jnp.float32), "row_of": jnp.asarray(row_of)}
    return SlotOracle(GAMMA, tcfg.vocab_size), params


def run_staggered(engine, streamed=None):
    """Requests arrive at different steps (more of them than slots)."""
    arrivals = {0: [0, 1, 2], 1: [3], 3: [4, 5]}
    ids, step = {}, 0
    while step <= max(arrivals) or not engine.idle:
        for i in arrivals.get(step, []):
            cb = None if streamed is None else (lambda rid, toks, fin: streamed.setdefault(rid, []).extend(toks))
            ids[i] = engine.submit(PROMPTS[i], max_new_tokens=NEW[i], seed=i, on_tokens=cb)
        engine.step()
        step += 1
    return [engine.result(ids[i]) for i in range(len(PROMPTS))]


# ------------------------------------------------------------------ packed verification

@pytest.mark.parametrize("query_block", [None, 4])
def test_packed_equals_dense(pair, query_block):
    tcfg, tparams, _ = pair
    rng = np.random.default_rng(0)
    s, w, budget = 3, 4, 8
    for case in range(2):
        cache = target.init_cache(tcfg, s, MAX_LEN)
        plen = rng.integers(1, 9, s).astype(np.int32)
        pre = rng.integers(4, tcfg.vocab_size, (s, 16)).astype(np.int32)
        _, cache, _ = target.prefill(tcfg, tparams, jnp.asarray(pre), jnp.asarray(plen), cache)
        q_lens = rng.integers(0, w + 1, s).astype(np.int32)
        q_lens[rng.integers(s)] = w if case == 0 else 0  # a full row, an empty row
        while q_lens.sum() > budget:
            q_lens[np.argmax(q_lens)] -= 1
        tokens = rng.integers(4, tcfg.vocab_size, (s, w)).astype(np.int32)
        dense_cache = jax.tree.map(jnp.copy, cache)
        want, dense_cache, want_taps = target.step(tcfg, tparams, jnp.asarray(tokens), jnp.asarray(q_lens),
                                                   dense_cache, (0, 1))
        valid = np.arange(w)[None] < q_lens[:, None]
        idx = np.flatnonzero(valid)
        rows, cols = idx // w, idx % w
        pad = budget - len(idx)
        got, cache, got_taps = target.step_packed(
            tcfg, tparams, jnp.asarray(np.pad(tokens.reshape(-1)[idx], (0, pad))), jnp.asarray(np.pad(rows, (0, pad))),
            jnp.asarray(np.pad(plen[rows] + cols, (0, pad), constant_values=MAX_LEN)),
            jnp.asarray(np.pad(np.ones(len(idx), bool), (0, pad))), cache, (0, 1), query_block=query_block)
        n = len(idx)
        np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(want)[rows, cols], atol=1e-5, rtol=1e-5)
        for a, b in zip(got_taps, want_taps):
            np.testing.assert_allclose(np.asarray(a)[:n], np.asarray(b)[rows, cols], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(cache.lengths, plen)  # the caller commits
        for r in range(s):
            m = plen[r] + q_lens[r]
            np.testing.assert_allclose(np.asarray(cache.k)[:, r, :m], np.asarray(dense_cache.k)[:, r, :m], atol=1e-6)
            np.testing.assert_allclose(np.asarray(cache.v)[:, r, :m], np.asarray(dense_cache.v)[:, r, :m], atol=1e-6)


# ------------------------------------------------------------------ greedy equality

@pytest.mark.parametrize("policy", ["none", "fixed", "mtp1", "threshold", "algorithm1", "production"])
def test_engine_oracle_equals_greedy(pair, policy):
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    # several buckets where the budget adapts (2 <= slots: per-token attention; 4, 8: per
    # row); one bucket elsewhere, to keep compiles few
    buckets = {"none": (SLOTS,), "algorithm1": (4, FULL), "production": ADAPTIVE}.get(policy, (FULL,))
    depth = 1 if policy == "mtp1" else None
    policy = "fixed" if policy == "mtp1" else policy
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
                    threshold=0.6, buckets=buckets, depth=depth)
    streamed = {}
    results = run_staggered(engine, streamed)
    for res, want in zip(results, ref):
        assert res.error is None and res.finished
        assert res.token_ids == want, (policy, res.request_id)
        assert streamed[res.request_id] == want
        assert all(a >= b for a, b in zip(res.accepted_per_position, res.accepted_per_position[1:]))
        assert res.rounds == len(res.verified_per_round)
    taus = [r.tau for r in results if r.rounds]
    if policy == "none":
        assert taus == [1.0] * len(taus) and engine.metrics.mean_verified <= SLOTS
    else:
        assert max(taus) > 1.5  # real acceptances happened
    assert engine.metrics.tokens == sum(NEW) and engine.metrics.throughput > 0


def test_profiled_survival_ends_at_stop_ids(pair):
    """The profile's survival counts only the rounds a served request runs: its completion
    ends at a stop id. The oracle drafts the reference exactly (no corruption) and knows
    nothing past it, so rounds past the reference's end would pull position 1 below 1."""
    from serve.sps_profile import measure_acceptance

    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref, corrupt_rate=0.0)
    longer = target.greedy_decode(tcfg, tparams, [PROMPTS[0]], NEW[0] + 1, max_len=MAX_LEN)[0]
    kw = dict(slots=1, max_len=MAX_LEN, max_new_tokens=16)
    stopped = measure_acceptance(tcfg, tparams, drafter, dparams, [PROMPTS[0]], stop_ids=(longer[NEW[0]],), **kw)
    ran_on = measure_acceptance(tcfg, tparams, drafter, dparams, [PROMPTS[0]], **kw)
    assert stopped[0] == 1.0 and ran_on[0] < 1.0


def test_profiled_round_times_resist_slow_spells(pair, monkeypatch):
    """Each round program keeps its fastest of the interleaved trials (a one-off slow call
    is dropped), and a bucket timed slower than a larger one in every trial takes the
    larger's time: slow spells of the machine cannot make a round look dearer."""
    from serve.sps_profile import measure_rounds

    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    calls = []

    def fake_seconds(self, key, repeats=8, trials=3, rows=None):
        calls.append(key)
        t = key[1] * (2.0 if key[2] else 1.0)  # dearer with the bucket and with drafting
        if key[2] and key[1] == 2:
            t *= 10.0  # slow in every trial
        return t * (50.0 if len(calls) == 3 else 1.0)

    monkeypatch.setattr(Engine, "program_seconds", fake_seconds)
    got = measure_rounds(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production",
                         buckets=ADAPTIVE, repeats=2, trials=3)
    assert (SLOTS, ADAPTIVE) == (2, (2, 8))
    assert got == {"spec": {2: 16.0, 8: 16.0}, "plain": {2: 2.0}}
    assert len(calls) == 3 * 3  # three programs, three trials each


@pytest.mark.parametrize("draft_time", [0.006, 0.02])
def test_drafting_by_row_count_equals_greedy(pair, draft_time):
    """With the drafter's mean survival and a drafting cost, the engine drafts only at the
    row counts where the profile says drafting pays (0.006: one row, not two; 0.02: at
    none, so it serves without its drafter and says so); the output stays greedy."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=ADAPTIVE, draft_time=draft_time, acceptance=ACCEPTANCE)
    pays = [scheduler.speculation_pays(np.repeat(np.asarray(ACCEPTANCE, np.float64)[None], r, axis=0), SPS,
                                       draft_time=draft_time)[0] for r in range(1, SLOTS + 1)]
    results = run_staggered(engine)
    assert [r.token_ids for r in results] == ref
    m = engine.metrics
    if draft_time == 0.006:
        assert pays == [True, False] and list(engine.costs.drafts_at[1:]) == pays and engine.notice is None
        assert 0 < m.plain_rounds < m.rounds, m.as_dict()
        assert sum(sum(r.accepted_per_position) for r in results) > 0  # the one-row rounds drafted
    else:  # plain decoding: no drafter, no drafting pass
        assert pays == [False, False] and "drafter" in engine.notice
        assert engine.drafter is None and engine.gamma == 0
        assert m.plain_rounds == m.rounds > 0, m.as_dict()
        assert all(r.tau == 1.0 for r in results if r.rounds)
        assert all(k[2] is False for k in m.programs if k[0] == "round"), m.programs


def test_drafting_table_and_refusals(pair):
    """Without a survival estimate every row count drafts; MTP-1 (fixed, depth 1) drafts
    one token; bad costs and a scheduled policy without a profile are refused."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=ADAPTIVE, draft_time=0.02)
    assert engine.costs.drafts_at[1:].all() and engine.notice is None
    fixed = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed", depth=1,
                   draft_time=0.02, acceptance=ACCEPTANCE, buckets=(FULL,))
    assert fixed.costs.drafts_at[1:].all() and fixed.gamma == 1 and fixed.drafter.gamma == 1  # MTP-1
    with pytest.raises(DSparkError, match="draft_time"):
        Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
               draft_time=-1.0)
    for policy in SCHEDULED:
        with pytest.raises(DSparkError, match="SPS"):
            Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy)
    with pytest.raises(DSparkError, match="depth"):
        Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed", depth=GAMMA + 1)


@pytest.mark.parametrize("policy", ["production"] + [pytest.param(p, marks=pytest.mark.slow) for p in
                                                    ("fixed", "threshold", "algorithm1")])
def test_engine_block_drafter_equals_greedy(pair, policy, tmp_path):
    tcfg, tparams, ref = pair
    drafter, dparams = random_block_drafter(tcfg, tparams, tmp_path / "draft")
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS,
                    buckets=(FULL,))
    assert [r.token_ids for r in run_staggered(engine)] == ref


def test_bad_requests_fail_alone(pair):
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="fixed", sps=SPS,
                    buckets=(FULL,))
    good = [engine.submit(PROMPTS[0], NEW[0])]
    bad = {"empty": engine.submit([], 4), "overlong": engine.submit(PROMPTS[1], MAX_LEN),
           "temperature": engine.submit(PROMPTS[1], 4, temperature=-1.0),
           "top-p": engine.submit(PROMPTS[1], 4, top_p=1.5), "vocabulary": engine.submit([5, tcfg.vocab_size], 4)}
    good.append(engine.submit(PROMPTS[2], NEW[2]))
    sampled = engine.submit(PROMPTS[3], 8, temperature=1.0, top_k=40, top_p=0.9, seed=3)  # beside greedy ones
    results = engine.run_until_done()
    assert results[sampled].error is None and len(results[sampled].token_ids) == 8
    assert results[sampled].finish_reason == "length"
    assert all(0 <= t < tcfg.vocab_size for t in results[sampled].token_ids)
    for word, rid in bad.items():
        err = results[rid].error
        assert err and "\n" not in err and results[rid].token_ids == [], (word, err)
        assert results[rid].finished and results[rid].finish_reason == "error"
    assert "empty" in results[bad["empty"]].error and "vocabulary" in results[bad["vocabulary"]].error
    assert [results[g].token_ids for g in good] == [ref[0], ref[2]]
    assert all(results[g].finish_reason == "length" for g in good)


def test_malformed_fields_fail_alone(pair):
    """Wrongly typed fields, bad seeds, stop ids and depths are refused one request at a
    time (finished at once, the callback told), never raised into the caller."""
    tcfg, tparams, ref = pair
    engine = Engine(tcfg, tparams, slots=SLOTS, max_len=MAX_LEN, policy="none", max_stop_ids=2)
    told = []
    bad = [engine.submit(PROMPTS[0], 4.5), engine.submit(PROMPTS[0], 0), engine.submit(PROMPTS[0], 4, seed=-1),
           engine.submit(PROMPTS[0], 4, stop_ids=[1, 2, 3]), engine.submit(PROMPTS[0], 4, stop_ids=[tcfg.vocab_size]),
           engine.submit(PROMPTS[0], 4, max_depth=-1), engine.submit(["a"], 4), engine.submit(None, 4),
           engine.submit(PROMPTS[0], 4, top_k=1.5, on_tokens=lambda *a: told.append(a))]
    good = engine.submit(PROMPTS[1], NEW[1])
    for rid in bad:
        res = engine.result(rid)
        assert res.finished and res.finish_reason == "error" and res.error and "\n" not in res.error, rid
    assert told == [(bad[-1], [], True)]
    assert engine.run_until_done()[good].token_ids == ref[1]


# ------------------------------------------------------------------ scheduling units

def test_production_capacity_uses_stale_survival():
    s, g, budget = 3, 3, 12
    active = jnp.array([True, True, False])
    current = jnp.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.1], [0.9, 0.9, 0.9]], jnp.float32)
    stale = jnp.stack([jnp.array([[0.5, 0.1, 0.0], [0.2, 0.0, 0.0], [1.0, 1.0, 1.0]]),  # two rounds ago
                       jnp.ones((s, g))]).astype(jnp.float32)  # last round: must NOT be used
    sched = policies.Schedule(sps=jnp.asarray(100.0 / (1.0 + 0.2 * np.arange(budget + 1)), jnp.float32),
                              threshold=jnp.float32(0.5), draft_time=jnp.float32(0.0),
                              prior=jnp.zeros((g,), jnp.float32), live=jnp.ones((s,), bool))
    max_depth = jnp.full((s,), g, jnp.int32)
    depth, survival, k = policies.schedule_depths("production", budget, current, stale, sched, active, max_depth)
    want_k = scheduler.global_capacity_jnp(stale[0], sched.sps, active)
    assert int(k) == int(want_k) != int(scheduler.global_capacity_jnp(stale[1], sched.sps, active))
    surv = np.cumprod(np.asarray(current), axis=1) * np.asarray(active)[:, None]
    np.testing.assert_allclose(survival, surv, rtol=1e-6)
    np.testing.assert_array_equal(depth, scheduler.top_k_depths_jnp(jnp.asarray(surv), want_k, active))
    # the budget caps K (and every policy's depths)
    depth, _, k = policies.schedule_depths("production", 3, current, stale, sched, active, max_depth)
    assert int(k) <= 1 and int(jnp.sum(jnp.where(active, 1 + depth, 0))) <= 3
    capped = policies.cap_depths(jnp.array([3, 3, 3]), active, 5, g)
    np.testing.assert_array_equal(capped, [2, 1, 0])  # position-major: both firsts, then one second
    # a row without history (just admitted) counts with the prior, never with zeros
    fresh = stale.at[0, 1].set(0.0)
    prior = jnp.array([0.9, 0.8, 0.7], jnp.float32)
    est = policies.stale_estimate(fresh[0], prior, jnp.broadcast_to(active[:, None], (s, g)))
    np.testing.assert_allclose(est, [[0.5, 0.1, 0.0], [0.9, 0.8, 0.7], [0, 0, 0]], rtol=1e-6)
    with_prior = sched.replace(prior=prior)
    _, _, k_prior = policies.schedule_depths("production", budget, current, fresh, with_prior, active, max_depth)
    _, _, k_zero = policies.schedule_depths("production", budget, current, fresh, sched, active, max_depth)
    assert int(k_prior) == int(scheduler.global_capacity_jnp(est, sched.sps, active)) > int(k_zero)


def _production_depths(trace, max_new, sps, lag_rounds):
    """The verify depth production picks for a lone request in each traced round when
    its capacity K reads the survival of `lag_rounds` drafted rounds earlier (zeros, so
    K = 0, for a row with none yet: no acceptance prior), recomputed from the traced
    confidences; the room left (max_new - n_out - 1) bounds both survival and depth."""
    n_out, survival, depths = 1, [], []
    for rnd_ in trace:
        limit = max(0, min(GAMMA, max_new - n_out - 1))
        surv = np.cumprod(rnd_["confidences"]) * (np.arange(GAMMA) < limit)
        est = survival[-lag_rounds] if len(survival) >= lag_rounds else np.zeros(GAMMA)
        rows = np.zeros((SLOTS, GAMMA), np.float32)
        rows[0] = est
        k = int(scheduler.global_capacity_jnp(jnp.asarray(rows), jnp.asarray(sps, jnp.float32),
                                              jnp.asarray([True] + [False] * (SLOTS - 1))))
        depths.append(min(k, limit, FULL - 1))
        survival.append(surv)
        n_out += rnd_["accepted"] + 1
    return depths


def test_engine_production_depths_follow_survival_two_rounds_old(pair):
    """Through the engine (lag 1): a lone request's verify depth each round is the top-K
    cut with K from its survival two rounds earlier; the first two rounds of each request
    have no history (a request seated in a slot its predecessor left starts afresh)."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, policy="production", sps=SPS,
                    buckets=(FULL,), trace=True)
    for i in (0, 2):  # one after the other, both in slot 0
        rid = engine.submit(PROMPTS[i], NEW[i])
        engine.run_until_done()
        res = engine.result(rid)
        assert res.token_ids == ref[i] and len(res.trace) == res.rounds > 3
        got = [r["verify_depth"] for r in res.trace]
        assert got[:2] == [0, 0]
        assert got == _production_depths(res.trace, NEW[i], SPS, 2), (i, got)
        assert got != _production_depths(res.trace, NEW[i], SPS, 1)  # the newest survival would differ
    assert max(r.tau for r in engine.results.values()) > 1.2


# ------------------------------------------------------------------ Eagle3 and refusals

def _eagle3(tcfg):
    from dspark_jax.drafters.eagle3 import Eagle3Config, Eagle3Drafter

    cfg = Eagle3Config(arch=tcfg.replace(num_hidden_layers=1), target_layer_ids=(0, 1))
    return Eagle3Drafter(cfg=cfg, tcfg=tcfg, gamma=GAMMA)


def test_policies_needing_confidences_refuse_drafters_without(pair):
    tcfg, tparams, _ = pair
    for policy in ("production", "algorithm1", "threshold"):
        with pytest.raises(DSparkError, match="confidence"):
            Engine(tcfg, tparams, _eagle3(tcfg), None, slots=SLOTS, max_len=MAX_LEN, policy=policy, sps=SPS)
    with pytest.raises(DSparkError, match="unknown policy"):
        Engine(tcfg, tparams, None, None, policy="fastest")
    with pytest.raises(DSparkError, match="needs a drafter"):
        Engine(tcfg, tparams, None, None, policy="fixed")


@pytest.mark.slow
def test_engine_eagle3_equals_greedy(pair):
    """Eagle-3 (no `ingest_lines`: prompt chunks reach it on an [S, C] grid) under the
    fixed policy, synchronous (lag 0): greedy output."""
    from dspark_jax.drafters.eagle3 import init_eagle3_params

    tcfg, tparams, ref = pair
    drafter = _eagle3(tcfg)
    dparams = init_eagle3_params(drafter, jax.random.key(7))
    dparams["embed_tokens"] = {"embedding": jnp.asarray(tparams["embed_tokens"]["embedding"])}
    dparams["lm_head"] = {"kernel": jnp.asarray(tparams["lm_head"]["kernel"])}
    engine = Engine(tcfg, tparams, drafter, dparams, slots=SLOTS, max_len=MAX_LEN, buckets=(FULL,), lag=0)
    assert engine.policy == "fixed" and engine.prefill_chunk > 0
    results = run_staggered(engine)
    assert [r.token_ids for r in results] == ref
    assert engine.metrics.prefill_chunks > 0


def test_batch_generate_schedules_over_the_profile_buckets(pair, monkeypatch):
    """generation.generate with a scheduled policy and a profile runs the profile's budget
    buckets (1, 2, 4, 8 for two rows), not one full bucket; the output stays greedy."""
    tcfg, tparams, ref = pair
    drafter, dparams = slot_oracle(tcfg, ref)
    engines = []
    monkeypatch.setattr(generation, "Engine", lambda *a, **k: engines.append(Engine(*a, **k)) or engines[-1])
    costs = {"sps": SPS, "draft_time": 0.0, "acceptance": [0.4, 0.05, 0.01]}   # one draft a row pays best
    comps = generation.generate(tcfg, tparams, [PROMPTS[0], PROMPTS[2]], max_new_tokens=9,
                                sampling=SamplingParams.make(2), seeds=[0, 1], drafter=drafter, dparams=dparams,
                                policy="production", costs=costs)
    assert [c.token_ids for c in comps] == [ref[0][:9], ref[2][:9]]
    budgets = {k[1] for k in engines[0].metrics.programs if k[0] == "round"}
    assert min(budgets) < 2 * (GAMMA + 1), budgets   # rounds ran in buckets smaller than the full one
