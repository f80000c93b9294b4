"""End to end: held-out evaluation and STS calibration CLIs on a tiny random target/drafter pair."""

import json
import os

import numpy as np
import pytest

from dspark_jax import calibration as cal
from dspark_jax import drafters, target
from dspark_jax.drafters.folders import STS_FILE
from dspark_jax.errors import DSparkError
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter, write_block_drafter
from train import calibrate, data, evaluate, evaluation

TARGET = os.path.join(FIXTURES, "qwen3_tiny_untied")
CHATS = [("math", "what is two plus two", "four"), ("code", "print hello", "print('hello')"),
         ("math", "three times three", "nine"), ("code", "a loop", "for i in x: pass"),
         ("chat", "hi there", "hello friend")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    jsonl = root / "val.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}], "domain": d}) + "\n"
                             for d, q, a in CHATS))
    data.build(name="tiny", sources={"validation": [str(jsonl)]}, tokenizer_dir=TARGET, data_dir=str(root / "data"))
    tcfg, tparams = target.load(TARGET)
    drafter, dparams = make_block_drafter(tcfg)
    folder = write_block_drafter(root / "drafter", TARGET, tparams, drafter, dparams)
    common = ["--target", TARGET, "--draft", folder, "--data-dir", str(root / "data"), "--dataset", "tiny",
              "--split", "validation", "--max-new-tokens", "8", "--batch-size", "8", "--ignore-eos",
              "--temperature", "1"]   # sampling: random pairs then accept some drafts
    return root, folder, common, tcfg


def test_evaluate_then_calibrate_writes_loadable_sts(setup, capsys):
    root, folder, common, tcfg = setup
    out = root / "eval_out"
    evaluate.main(common + ["--out", str(out)])
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["domains"]) == {"math", "code", "chat"}
    assert rep["gamma"] == 4 and rep["sts_temperatures"] is None and rep["run"]["examples"] == 5
    every = rep["all"]
    assert every["prompts"] == 5 and every["tokens"] == 5 * 8 and every["rounds"] >= 2 * 5
    assert 1.0 <= every["tau"] <= 5.0
    # every round verifies position 1 but a request's last, when it has room for one token only
    assert len(every["conditional_acceptance"]) == 4
    assert every["rounds"] - every["prompts"] <= every["conditional_counts"][0] <= every["rounds"]
    conf = every["confidence"]
    assert set(conf) == {"raw"} and len(conf["raw"]["prefix"]) == 4
    assert conf["raw"]["prefix"][0]["n"] == every["conditional_counts"][0]
    assert set(conf["raw"]["prefix_pooled"]) == {"n", "mean_conf", "observed", "ece", "auc", "brier"}
    assert sum(g["prompts"] for g in rep["domains"].values()) == 5
    assert (out / "reliability.png").stat().st_size > 0 and (out / "acceptance.png").stat().st_size > 0
    assert "tau" in capsys.readouterr().out

    calibrate.main(common + ["--out", str(root / "cal_out")])
    sts = json.loads(open(os.path.join(folder, STS_FILE)).read())
    assert len(sts["temperatures"]) == 4 and all(t > 0 for t in sts["temperatures"])
    report = json.loads((root / "cal_out" / "sts_report.json").read_text())
    assert report["before_temperatures"] == [1.0] * 4
    assert report["fit"]["rounds"] == every["rounds"]
    assert report["fit"]["after"]["prefix_pooled"]["ece"] <= report["fit"]["before"]["prefix_pooled"]["ece"] + 1e-12
    assert (root / "cal_out" / "sts_reliability.png").stat().st_size > 0
    assert "ECE before" in capsys.readouterr().out

    drafter, _ = drafters.load(folder, tcfg)
    assert drafter.sts_temperatures == pytest.approx(tuple(sts["temperatures"]))


def test_calibrate_refuses_bad_inputs(setup, capsys):
    root, folder, common, _ = setup
    with pytest.raises(SystemExit) as e:
        calibrate.main(common + ["--split", "test"])
    assert e.value.code == 2 and "no split 'test'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(common + ["--temperature", "-1"])
    assert e.value.code == 2 and "temperature" in capsys.readouterr().err
    ro = evaluation.Rollouts(gamma=2, domains=["a"], tokens=np.array([3]), rounds_per_prompt=np.array([1]),
                             prompt=np.array([0]), confidences=np.zeros((1, 2)), accepted=np.array([1]),
                             depth=np.array([2]), temperatures=None, with_confidence=False)
    with pytest.raises(DSparkError, match="no confidence head"):
        evaluation.calibrate(ro)


def test_calibrate_library_recovers_logits_under_loaded_sts():
    # traced confidences carry loaded temperatures; refitting starts from the raw logits
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (400, 3))
    loaded = np.array([2.0, 0.5, 1.0])
    accepted = rng.integers(0, 4, 400)
    ro = evaluation.Rollouts(gamma=3, domains=["a", "b"], tokens=np.array([100, 100]),
                             rounds_per_prompt=np.array([200, 200]), prompt=np.repeat([0, 1], 200),
                             confidences=np.round(cal.apply_sts(z, loaded), 6), accepted=accepted,
                             depth=np.full(400, 3), temperatures=loaded, with_confidence=True)
    np.testing.assert_allclose(ro.logits(), z, atol=0.05)  # 6-decimal traces
    temps, rep = evaluation.calibrate(ro, holdout_fraction=0.5)
    assert rep["before_temperatures"] == loaded.tolist() and rep["holdout"]["prompts"] == 1
    assert rep["fit"]["rounds"] == rep["holdout"]["rounds"] == 200
    fit = np.isin(ro.prompt, np.sort(np.random.default_rng(0).permutation(2)[1:]))
    np.testing.assert_allclose(temps, cal.fit_sts(ro.logits()[fit], accepted[fit], np.full(200, 3)))
    report = evaluation.report(ro)
    assert set(report["all"]["confidence"]) == {"raw", "sts"}
    assert report["domains"]["a"]["rounds"] == 200
