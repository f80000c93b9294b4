"""The demo recipe's bookkeeping: a stage is skipped only when its artifact exists and was
made by the same settings from the same inputs."""

import json

from train.demo import recipe


def test_stages_rerun_when_settings_or_inputs_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "ARTIFACTS", str(tmp_path))
    args = recipe.parse_args(["--work", str(tmp_path / "work")])
    artifact = tmp_path / "target" / "model.safetensors"
    artifact.parent.mkdir()
    settings = {"model": {"hidden_size": 384}, "steps": 1200}
    assert not recipe.current(args, "target", settings, str(artifact))     # nothing made yet
    artifact.write_bytes(b"weights")
    assert not recipe.current(args, "target", settings, str(artifact))     # made, but not recorded
    recipe.record(args, "target", settings)
    assert recipe.current(args, "target", settings, str(artifact))
    assert not recipe.current(args, "target", dict(settings, steps=800), str(artifact))
    forced = recipe.parse_args(["--work", str(tmp_path / "work"), "--force"])
    assert not recipe.current(forced, "target", settings, str(artifact))
    assert "made by other settings; rebuilding" in capsys.readouterr().out

    # a downstream stage keys on its input's bytes
    before = recipe.fingerprint(str(artifact.parent))
    recipe.record(args, "regen", {"target": before})
    (tmp_path / "answers.jsonl").write_text("{}\n")
    assert recipe.current(args, "regen", {"target": recipe.fingerprint(str(artifact.parent))},
                          str(tmp_path / "answers.jsonl"))
    artifact.write_bytes(b"retrained")
    assert not recipe.current(args, "regen", {"target": recipe.fingerprint(str(artifact.parent))},
                              str(tmp_path / "answers.jsonl"))
    rec = json.loads((tmp_path / "RECIPE.json").read_text())
    assert set(rec["stages"]) == {"target", "regen"} and rec["command"] == "python -m train.demo.recipe"


def test_a_training_run_folder_restarts_only_for_other_settings(tmp_path):
    run = tmp_path / "runs" / "dspark"
    recipe.run_for(str(run), {"target": "aaaa"})
    (run / "checkpoints").mkdir()
    recipe.run_for(str(run), {"target": "aaaa"})          # the same run, killed and resumed
    assert (run / "checkpoints").exists()
    recipe.run_for(str(run), {"target": "bbbb"})          # a new target: its checkpoints go
    assert not (run / "checkpoints").exists() and json.loads((run / "recipe_settings.json").read_text()) == {
        "target": "bbbb"}


def test_regen_stage_answers_a_sampled_and_a_greedy_share(tmp_path, monkeypatch):
    import os
    import shutil
    import types

    from tests.conftest import FIXTURES
    from tests.test_training import synthetic_chats
    from train import data, regen

    monkeypatch.setattr(recipe, "ARTIFACTS", str(tmp_path / "artifacts"))
    shutil.copytree(os.path.join(FIXTURES, "qwen3_tiny_tied"), tmp_path / "artifacts" / "target")
    work = tmp_path / "work"
    (work / "corpus" / "prompts").mkdir(parents=True)
    synthetic_chats(work / "corpus" / "prompts" / "train.jsonl", n=12)
    args = recipe.parse_args(["--work", str(work), "--regen-prompts", "6", "--greedy-prompts", "3"])
    recipe.stage_regen(str(work), args)

    splits = data.load(str(work / "data"), "demo_regen")
    assert (len(splits["train"]), len(splits["validation"])) == (5 + 2, 1 + 1)    # 6% of each share, at least 1
    greedy = (work / "regen" / "greedy.jsonl").read_text()
    again = tmp_path / "again.jsonl"                                               # T = 0: the seed changes nothing
    regen.regenerate(types.SimpleNamespace(
        target=str(tmp_path / "artifacts" / "target"), draft=None, prompts=str(work / "regen" / "greedy.prompts.jsonl"),
        out=str(again), max_new_tokens=96, temperature=0.0, top_k=0, top_p=1.0, seed=5, batch_size=64, limit=0,
        name=None))
    assert again.read_text() == greedy
    assert recipe.current(args, "regen", {"prompts": 6, "greedy_prompts": 3,
                                          "target": recipe.fingerprint(str(tmp_path / "artifacts" / "target"))},
                          str(work / "regen" / "answers.jsonl"))
