"""Load bench end to end on the tiny pair (CLI: table, JSON, plots) and the SPS profile
(measure, store by key, reuse, plot)."""

import json
import os

import numpy as np
import pytest

from dspark_jax import drafters, target
from dspark_jax.engine import Engine, profiles
from dspark_jax.engine.costs import stored_costs
from dspark_jax.errors import DSparkError
from serve import load_bench as load_bench_cli
from serve import load_points as load_bench
from serve import load_report
from serve import profile_sps as profile_sps_cli
from serve import sps_profile
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter, write_block_drafter

TARGET = os.path.join(FIXTURES, "qwen3_tiny_untied")


@pytest.fixture(scope="module")
def pair():
    return target.load(TARGET)


def test_profile_is_stored_reused_and_read_by_engines(pair, tmp_path, monkeypatch):
    tcfg, tparams = pair
    drafter, dparams = make_block_drafter(tcfg, block_size=1)
    path = str(tmp_path / "sps.json")
    rec = sps_profile.profile(tcfg, tparams, slots=1, gamma=1, max_len=32, path=path, drafter=drafter,
                              dparams=dparams, prompts=[[5, 6, 7], [8, 9]], warmup=1, repeats=2)
    assert sorted(int(b) for b in rec["table"]) == [1, 2] and rec["draft_seconds"] > 0
    assert len(rec["acceptance"]) == 1 and 0 <= rec["acceptance"][0] <= 1
    assert sorted(rec["rounds"]["spec"]) == ["1", "2"] and list(rec["rounds"]["plain"]) == ["1"]
    key = profiles.profile_key(tcfg, slots=1, gamma=1, max_len=32, tap_layers=drafter.tap_layers, drafter=drafter)
    assert key["backend"] == "cpu" and key["model"]["hidden_size"] == tcfg.hidden_size
    monkeypatch.setattr(sps_profile, "measure", lambda *a, **k: pytest.fail("profiled again"))
    again = sps_profile.profile(tcfg, tparams, slots=1, gamma=1, max_len=32, path=path, drafter=drafter,
                                dparams=dparams, prompts=[[5, 6, 7]])
    assert again == rec
    # an engine of that configuration reads it (any cache length will do when asked)
    costs = stored_costs(path, {**key, "max_len": 64}, (1, 2), any_length=True)
    assert stored_costs(path, {**key, "max_len": 64}, (1, 2)) is None
    assert costs["acceptance"] == rec["acceptance"] and costs["draft_time"] == rec["draft_seconds"]
    engine = Engine(tcfg, tparams, drafter, dparams, slots=1, max_len=32, policy="production",
                    **{**costs, "acceptance": None})  # (no survival to predict from: it drafts)
    want = profiles.interpolate({int(b): v for b, v in rec["table"].items()}, 2)  # (pooled when B=2 ran faster)
    np.testing.assert_allclose(engine.costs.sps, want, rtol=1e-5)
    assert os.path.getsize(sps_profile.plot(rec, str(tmp_path / "sps.png"))) > 0
    # a scheduled engine without a profile is a clear error, never a hidden measurement
    with pytest.raises(DSparkError, match="profile_sps"):
        Engine(tcfg, tparams, drafter, dparams, slots=1, max_len=32, policy="production")
    np.testing.assert_allclose(profiles.interpolate({2: 10.0, 4: 5.0}, 5),
                               [10, 10, 10, 1 / 0.15, 5, 5], rtol=1e-6)
    # a noisy bump (B=2 slower than B=4 and 8) is pooled away: step time never falls with B
    np.testing.assert_allclose(profiles.monotone([3.0, 5.5, 5.4, 5.3]), [3.0, 5.4, 5.4, 5.4])
    np.testing.assert_allclose(profiles.monotone([1.0, 2.0, 4.0]), [1.0, 2.0, 4.0])


def test_drafting_decided_per_row_count_from_the_profile():
    """Where no speculative round beats a plain one at R rows, rounds there are plain;
    where it pays nowhere, the engine says so."""
    from dspark_jax.engine.costs import RoundCosts

    sps = np.full(17, 100.0)  # a pass costs 10 ms at any budget: verifying is free, drafting is not
    pays = RoundCosts(slots=2, gamma=7, policy="production", sps=sps, draft_time=0.002, acceptance=[0.9] * 7)
    assert pays.drafts_at[1:].all()
    dear = RoundCosts(slots=2, gamma=7, policy="production", sps=sps, draft_time=0.05, acceptance=[0.3] * 7)
    assert not dear.drafts_at[1:].any() and not dear.pays_anywhere
    fixed = RoundCosts(slots=2, gamma=7, policy="fixed", sps=sps, draft_time=0.05, acceptance=[0.3] * 7)
    assert fixed.drafts_at.all()  # the fixed policies draft whatever the profile says
    rounds = {"spec": {16: 0.012}, "plain": {16: 0.010}}  # measured: a drafted round 20% dearer
    assert RoundCosts(slots=2, gamma=7, policy="production", sps=sps, acceptance=[0.5] * 7, buckets=(16,),
                      rounds=rounds).drafts_at[1:].all()
    assert not RoundCosts(slots=2, gamma=7, policy="production", sps=sps, acceptance=[0.1] + [0.0] * 6, buckets=(16,),
                          rounds=rounds).drafts_at[1:].any()


def test_load_bench_cli_end_to_end(pair, tmp_path, capsys):
    tcfg, tparams = pair
    drafter, dparams = make_block_drafter(tcfg, block_size=3)
    draft = write_block_drafter(tmp_path / "draft", TARGET, tparams, drafter, dparams)
    # a stored SPS curve matching this engine is reused (no profiling at start-up)
    sps_file = str(tmp_path / "sps.json")
    key = profiles.profile_key(tcfg, slots=2, gamma=3, max_len=32, tap_layers=drafter.tap_layers,
                               drafter=drafters.load(draft, tcfg)[0])
    profiles.save(sps_file, key, {"table": {8: 50.0}, "draft_seconds": 0.001, "acceptance": [0.9, 0.8, 0.7]})
    out = tmp_path / "out"
    load_bench_cli.main(["--target", TARGET, "--draft", draft, "--concurrency", "2", "--policy", "none",
                         "production", "--mode", "closed", "poisson", "--requests-per-client", "1",
                         "--prompt-len", "5", "--max-new-tokens", "6", "--max-len", "32", "--rate", "200",
                         "--buckets", "full", "--sps-file", sps_file,
                         "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "| closed | production variant | 2 |" in printed and "| poisson | no speculation | 2 |" in printed
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 4 and data["meta"]["gamma"] == 3
    for row in data["rows"]:
        assert row["requests"] == 2 and row["errors"] == 0 and row["tokens"] == 12 and row["throughput"] > 0
        assert row["mean_verified"] >= 1 and 0 <= row["plain_rounds"]
        assert row["device_seconds"] > 0 and row["host_exposed_frac"] < 1 and 0 <= row["device_idle_frac"] < 1
    none = [r for r in data["rows"] if r["policy"] == "none"]
    assert all(r["tau"] == 1.0 and r["mean_verified"] <= 2 for r in none)
    assert (out / "results.md").read_text().startswith("### Load benchmark")
    for name in ("throughput_vs_per_user.png", "budget_vs_concurrency.png"):
        assert (out / name).stat().st_size > 0
    assert len(json.loads(open(sps_file).read())["profiles"]) == 1


def test_device_watch_counts_the_gaps_between_calls():
    """A host that sleeps 50 ms before each of three calls leaves the device idle at least
    the first gap (no call exists yet; later gaps shrink only by the watcher's own delay
    in stamping a call ready); calls made after the block are not stamped."""
    import time

    import jax.numpy as jnp

    from serve.device_watch import DeviceWatch

    class Calls:
        def call_rounds(self, *args):
            return jnp.ones(4) + 1

        def call_prefill(self, *args):
            return jnp.zeros(2)

    engine = Calls()
    engine.call_rounds(), engine.call_prefill()  # compiled before the block
    with DeviceWatch(engine) as watch:
        for call in (engine.call_prefill, engine.call_rounds, engine.call_rounds):
            time.sleep(0.05)
            call()
    engine.call_rounds()
    wall = watch.stopped - watch.started
    assert len(watch.calls) == 3 and all(a <= b for a, b in watch.calls)
    assert all(a1 >= a0 for (a0, _), (a1, _) in zip(watch.calls, watch.calls[1:]))
    assert 0.05 <= watch.idle_seconds <= wall


def test_request_lengths_spread_is_seeded_and_bounded():
    fixed = load_bench.LoadSettings(max_new_tokens=32)
    assert list(load_bench.request_lengths(fixed, 5)) == [32] * 5
    spread = load_bench.LoadSettings(max_new_tokens=32, length_spread=0.5, prompt_len=10)
    a, b = load_bench.request_lengths(spread, 200), load_bench.request_lengths(spread, 200)
    np.testing.assert_array_equal(a, b)  # every policy serves the same requests
    assert a.min() >= 16 and a.max() <= 48 and len(set(a.tolist())) > 10
    assert spread.cache_len >= 10 + 48
    with pytest.raises(load_bench.DSparkError, match="spread"):
        load_bench.LoadSettings(length_spread=1.5)


def test_load_bench_rejects_bad_settings():
    with pytest.raises(Exception, match="unknown policy"):
        load_bench.LoadSettings(policies=("fastest",))
    with pytest.raises(Exception, match="concurrency"):
        load_bench.LoadSettings(concurrency=(0,))


def test_profile_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        profile_sps_cli.main(["--target", TARGET, "--slots", "0"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def _row(policy, c, tps):
    return load_bench.LoadRow(policy=policy, mode="closed", concurrency=c, requests=4, tokens=100, seconds=100 / tps,
                              throughput=tps, per_user=tps / c, mean_verified=c, mean_budget=c, tau=1.0, runs=2,
                              throughput_min=tps - 1, throughput_max=tps + 1, repeat_throughputs=(tps - 1, tps + 1))


def test_merge_joins_levels_run_apart(tmp_path, capsys):
    """Levels run in separate processes (a GPU lease, say) merge into one table and one
    pair of plots; the frontier is computed per level; a point found twice is refused."""
    for c, (none, prod) in {1: (100.0, 120.0), 4: (300.0, 290.0)}.items():
        settings = load_bench.LoadSettings(concurrency=(c,), policies=("none", "production"))
        load_report.write([_row("production", c, prod), _row("none", c, none)], settings, str(tmp_path / f"c{c}"),
                         {"title": "demo"})
    out = tmp_path / "all"
    load_bench_cli.main(["--merge", str(tmp_path / "c4"), str(tmp_path / "c1" / "results.json"),
                         "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "### Load benchmark: demo" in printed
    assert "| closed | 1 | production variant | 120.0 | no speculation | 100.0 | 1.200 |" in printed
    assert "| closed | 4 | production variant | 290.0 | no speculation | 300.0 | 0.967 |" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["concurrency"] == [1, 4]
    assert [(r["policy"], r["concurrency"]) for r in data["rows"]] == [
        ("none", 1), ("none", 4), ("production", 1), ("production", 4)]
    assert data["rows"][0]["repeat_throughputs"] == [99.0, 101.0]
    for name in ("throughput_vs_per_user.png", "budget_vs_concurrency.png"):
        assert (out / name).stat().st_size > 0
    for bad, message in (([str(tmp_path / "c1"), str(tmp_path / "c1")], "already in an earlier file"),
                         ([str(tmp_path / "nothing")], "no load-bench results")):
        with pytest.raises(SystemExit) as e:
            load_bench_cli.main(["--merge", *bad, "--out-dir", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_requests_end_at_stop_ids(pair):
    """With stop ids (the load bench's default with a prompt file), a request ends at its
    turn's end: here each prompt's first greedy token stops, so each request gets only it."""
    tcfg, tparams = pair
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    firsts = tuple(sorted({r[0] for r in target.greedy_decode(tcfg, tparams, prompts, 1, max_len=32)}))
    for stop_ids, tokens in (((), 12), (firsts, 2)):
        settings = load_bench.LoadSettings(concurrency=(2,), policies=("none",), requests_per_client=1,
                                           prompt_len=5, max_new_tokens=6, max_len=32, buckets="full",
                                           stop_ids=stop_ids, device_time=False)
        row, _ = load_bench.run_point(tcfg, tparams, None, None, "none", "closed", 2, settings, prompts)
        assert row.requests == 2 and row.tokens == tokens


def test_a_timed_run_that_compiled_is_run_again(pair, monkeypatch):
    """Compiling is not serving: a timed run on an engine that has not run its workload
    yet compiles, so the point runs it again and reports the run that compiled nothing;
    on the warmed engine one run is timed."""
    tcfg, tparams = pair
    settings = load_bench.LoadSettings(concurrency=(1,), policies=("none",), requests_per_client=1,
                                       prompt_len=5, max_new_tokens=4, max_len=29, buckets="full",
                                       device_time=False)  # a cache length no other test compiles
    prompts = [[5, 6, 7, 8]]
    engine = load_bench.make_engine(tcfg, tparams, None, None, "none", 1, settings)
    drives = []
    real = load_bench._drive
    monkeypatch.setattr(load_bench, "_drive", lambda *a, **k: drives.append(1) or real(*a, **k))
    row, engine = load_bench.run_point(tcfg, tparams, None, None, "none", "closed", 1, settings, prompts,
                                       engine=engine)
    assert len(drives) == 2 and row.tokens == 4
    load_bench.run_point(tcfg, tparams, None, None, "none", "closed", 1, settings, prompts, engine=engine)
    assert len(drives) == 3
