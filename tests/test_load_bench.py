"""Load bench end to end on the tiny pair (CLI: table, JSON, plots) and the SPS profile
(measure, store by key, reuse, plot)."""

import json
import os

import numpy as np
import pytest

from dspark_jax import drafters, load_bench, profile_sps, target
from dspark_jax.engine import Engine
from serve import load_bench as load_bench_cli
from serve import profile_sps as profile_sps_cli
from tests.conftest import FIXTURES
from tests.helpers import OracleDrafter, make_block_drafter, write_block_drafter

TARGET = os.path.join(FIXTURES, "qwen3_tiny_untied")


@pytest.fixture(scope="module")
def pair():
    return target.load(TARGET)


def test_sps_profile_is_stored_reused_and_plotted(pair, tmp_path, monkeypatch):
    tcfg, tparams = pair
    path = str(tmp_path / "sps.json")
    sps, rec = profile_sps.load_or_profile(tcfg, tparams, slots=1, gamma=1, max_len=32, path=path,
                                           tap_layers=(0,), warmup=1, repeats=2)
    assert sorted(int(b) for b in rec["table"]) == [1, 2] and sps.shape == (3,) and np.all(sps > 0)
    key = profile_sps.profile_key(tcfg, slots=1, gamma=1, max_len=32, tap_layers=(0,))
    assert key["backend"] == "cpu" and key["model"]["hidden_size"] == tcfg.hidden_size
    monkeypatch.setattr(profile_sps, "measure", lambda *a, **k: pytest.fail("profiled again"))
    again, _ = profile_sps.load_or_profile(tcfg, tparams, slots=1, gamma=1, max_len=32, path=path,
                                           tap_layers=(0,))
    np.testing.assert_array_equal(again, sps)
    # an engine starting with a matching profile reuses it
    engine = Engine(tcfg, tparams, OracleDrafter(1, tcfg.vocab_size), None, slots=1, max_len=32,
                    policy="production", sps_file=path)
    np.testing.assert_array_equal(engine.sps, sps)
    assert os.path.getsize(profile_sps.plot(rec, str(tmp_path / "sps.png"))) > 0
    np.testing.assert_allclose(profile_sps.interpolate({2: 10.0, 4: 5.0}, 5),
                               [10, 10, 10, 1 / 0.15, 5, 5], rtol=1e-6)
    # a noisy bump (B=2 slower than B=4 and 8) is pooled away: step time never falls with B
    np.testing.assert_allclose(profile_sps.monotone([3.0, 5.5, 5.4, 5.3]), [3.0, 5.4, 5.4, 5.4])
    np.testing.assert_allclose(profile_sps.monotone([1.0, 2.0, 4.0]), [1.0, 2.0, 4.0])
    curve = profile_sps.interpolate({1: 1 / 3.0, 2: 1 / 5.5, 4: 1 / 5.4, 8: 1 / 5.3}, 8)
    assert np.all(np.diff(1.0 / curve[1:]) >= -1e-6)


def test_load_bench_cli_end_to_end(pair, tmp_path, capsys):
    tcfg, tparams = pair
    drafter, dparams = make_block_drafter(tcfg, block_size=3)
    draft = write_block_drafter(tmp_path / "draft", TARGET, tparams, drafter, dparams)
    # a stored SPS curve matching this engine is reused (no profiling at start-up)
    sps_file = str(tmp_path / "sps.json")
    key = profile_sps.profile_key(tcfg, slots=2, gamma=3, max_len=32, tap_layers=drafter.tap_layers,
                                  drafter=drafters.load(draft, tcfg)[0])
    profile_sps.save(sps_file, key, {8: 50.0}, 8, draft_seconds=0.001)
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
    none = [r for r in data["rows"] if r["policy"] == "none"]
    assert all(r["tau"] == 1.0 and r["mean_verified"] <= 2 for r in none)
    assert (out / "results.md").read_text().startswith("### Load benchmark")
    for name in ("throughput_vs_per_user.png", "budget_vs_concurrency.png"):
        assert (out / name).stat().st_size > 0
    assert len(json.loads(open(sps_file).read())["profiles"]) == 1


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
        load_bench.write([_row("production", c, prod), _row("none", c, none)], settings, str(tmp_path / f"c{c}"),
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
