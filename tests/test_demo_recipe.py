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
