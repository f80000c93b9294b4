"""The demo report's markdown from synthetic numbers (no model): the before rows, the
per-domain speed rows, the drafters table and the load-bench section or its pointer."""

import json
import types

import pytest

from dspark_jax.errors import DSparkError
from train.demo import report
from train.demo.report_tables import DOMAINS, KINDS, pooled_speed

TAU = {"0": 2.0, "1": 3.0}


def synthetic():
    results = {t: {k: {"domains": {d: {"tau": v + 0.1 * i} for i, d in enumerate(DOMAINS)}} for k in KINDS}
               for t, v in TAU.items()}
    metrics = {"prefix": [{"ece": 0.05, "auc": 0.7}], "prefix_pooled": {"ece": 0.05, "auc": 0.7}}
    speed = [{"batch": 1, "prompts": d, "n_prompts": 8, "plain_tokens_per_second_per_user": 100.0,
              "dspark_tokens_per_second_per_user": 150.0, "speedup": 1.5, "tau": 2.5} for d in DOMAINS]
    speed += [{"batch": 1, "prompts": "all three", "policy": "production", "n_prompts": 24,
               "plain_tokens_per_second_per_user": 100.0,
               "dspark_tokens_per_second_per_user": 140.0, "speedup": 1.4, "tau": 2.4},
              {"batch": 8, "prompts": "mixed", "n_prompts": 24, "plain_tokens_per_second_per_user": 40.0,
               "dspark_tokens_per_second_per_user": 30.0, "speedup": 0.75, "tau": 2.2}]
    rep = {"machine": {"platform": "test", "cpus": 2}, "prompts_per_domain": 8, "max_new_tokens": 16, "gamma": 7,
           "calibration": {"sts_temperatures": [1.0], "before": metrics, "after": metrics},
           "speed_repeats": 2, "speed": speed, "target": {"params": 10_000_000},
           "drafters": {k: {"params": 1_500_000, "file_mb": 4.0} for k in KINDS}}
    recipe = {"vocab": 2048, "target": {"num_hidden_layers": 8, "hidden_size": 384},
              "drafters": {"dspark": {"steps": 1000, "flops_per_step": 2e12}, "dflash": {"steps": 900},
                           "eagle3": {"steps": 800, "flops_per_step": None}},
              "compute_rule": "Each drafter trains on the same compute."}
    before = {"pair": {"target_params": 3.67e6, "layers": 4, "hidden": 256, "note": "drafters float32",
                       "speed_prompts": {"1": "1 math prompt"}},
              "tau": {"0": {k: {d: 1.5 for d in DOMAINS} for k in KINDS}},
              "speed": [{"batch": 1, "plain_tokens_per_second": 133.0, "dspark_tokens_per_second": 169.0,
                         "speedup": 1.27, "tau": 2.86},
                        {"batch": 8, "plain_tokens_per_second": 336.0, "dspark_tokens_per_second": 153.6,
                         "speedup": 0.46, "tau": 2.38}]}
    return rep, results, recipe, before


def bench_dir(tmp_path):
    rows = [{"mode": "closed", "policy": p, "concurrency": c, "throughput": tps * c, "per_user": tps, "tau": tau}
            for c in (1, 8) for p, tps, tau in (("none", 100.0, 1.0), ("fixed", 80.0, 2.0),
                                                ("production", 110.0, 1.5))]
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"settings": {"concurrency": [1, 8], "repeats": 3},
                                                     "meta": {"title": "tiny"}, "rows": rows}))
    (folder / "throughput_vs_per_user.png").write_bytes(b"")
    return folder


def test_markdown_holds_before_speed_drafters_and_load_bench(tmp_path):
    rep, results, recipe, before = synthetic()
    (tmp_path / "out").mkdir()
    text = report.write_markdown(str(tmp_path / "out" / "r.md"), rep, results, recipe=recipe, before=before,
                                 load_bench=str(bench_dir(tmp_path)))
    assert (tmp_path / "out" / "r.md").read_text() == text
    assert "| 0 | before: dspark | 1.50 | 1.50 | 1.50 | 1.50 |" in text
    assert "| 1 | before: 1 math prompt | fixed gamma | 133.0 | 169.0 | 1.27x | 2.86 |" in text
    assert "| 8 | before: old pair | fixed gamma | 42.0 | 19.2 | 0.46x | 2.38 |" in text
    for d in DOMAINS:
        assert f"| 1 | {d} (8) | fixed gamma | 100.0 | 150.0 | 1.50x | 2.50 |" in text
    assert "| 1 | all three (24) | production | 100.0 | 140.0 | 1.40x | 2.40 |" in text
    assert "| 8 | mixed (24) | fixed gamma | 40.0 | 30.0 | 0.75x | 2.20 |" in text
    assert "| dspark | 1.50 M | 15.0% | 4.0 | 1000 | 2.00 |" in text
    assert "| dflash | 1.50 M | 15.0% | 4.0 | 900 | n/a |" in text
    assert "Each drafter trains on the same compute." in text and "10.00 M parameters" in text
    assert "| closed | production | 8 | 110.0 | 880.0 | 1.50 |" in text
    assert "| closed | 8 | production | 880.0 | fixed | 640.0 | 1.38 | 800.0 | 1.10 |" in text
    assert "](../bench/throughput_vs_per_user.png)" in text and "budget_vs_concurrency" not in text
    assert "python -m serve.load_bench --concurrency 1 8 --repeats 3" in text and f"--out-dir {tmp_path}" in text


def test_missing_load_bench_is_one_line_and_old_recipe_reads(tmp_path):
    rep, results, _, _ = synthetic()
    text = report.write_markdown(str(tmp_path / "r.md"), rep, results, recipe={"drafter_steps": 300},
                                 before={}, load_bench=str(tmp_path / "none"))
    section = text.split("## The engine under load (Figures 7 and 8)\n\n")[1].strip()
    assert "\n" not in section and section.startswith("No load bench at") and "python -m serve.load_bench" in section
    assert "before" not in text and "| eagle3 | 1.50 M | 15.0% | 4.0 | 300 | n/a |" in text


def test_bad_results_json_is_one_error_and_speed_pools_seconds(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"rows": [{"policy": "none"}]}))
    rep, results, recipe, before = synthetic()
    with pytest.raises(DSparkError, match="not a load-bench results.json"):
        report.write_markdown(str(tmp_path / "r.md"), rep, results, recipe=recipe, before=before,
                              load_bench=str(tmp_path))
    rows = [types.SimpleNamespace(batch=1, plain_tps=100.0, spec_tps=200.0, tau=2.0, rounds=10, tokens=20),
            types.SimpleNamespace(batch=1, plain_tps=50.0, spec_tps=100.0, tau=4.0, rounds=30, tokens=40)]
    got = pooled_speed(1, "math", rows)   # 60 tokens in 20 / 100 + 40 / 50 seconds
    assert got["plain_tokens_per_second_per_user"] == pytest.approx(60 / (20 / 100 + 40 / 50))
    assert got["speedup"] == pytest.approx(2.0) and got["tau"] == pytest.approx(3.5) and got["n_prompts"] == 2
