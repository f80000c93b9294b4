"""DFlash drafters go back out in z-lab's layout (dspark_jax/drafters/zlab_export.py).

Export then load round-trips bit for bit (tensors, parameters and the first round's
drafts on the same target); the config.json holds the fields z-lab's own class writes
(tests/fixtures/zlab_dflash_b16, written by `DFlashDraftModel`); drafters whose
computation a z-lab folder cannot hold are refused in one line; a wrong export rule
(taps off by one) breaks the round trip.
"""

import json
import os

import jax
import numpy as np
import pytest

from dspark_jax import drafters, target
from dspark_jax.drafters import zlab, zlab_export
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter
from tests.test_zlab_dflash import first_round
from train import export as export_cli
from train import step as step_lib, trainer
from train.config import TrainConfig, validate

TARGET = os.path.join(FIXTURES, "zlab_dflash_target")
DRAFT = os.path.join(FIXTURES, "zlab_dflash_b16")
# written by transformers' save_pretrained, read by nothing: not part of the layout
NOT_READ = {"transformers_version"}


@pytest.fixture(scope="module")
def tgt():
    return target.load(TARGET)


def fresh_zlab_drafter(tcfg, taps=(1, 3), block_size=6, seed=7):
    """A random drafter that drafts from the mask positions, as one trained here would be."""
    cfg = DrafterConfig(arch=tcfg.replace(num_hidden_layers=2), target_layer_ids=taps, block_size=block_size,
                        mask_token_id=3, markov_rank=0, enable_confidence_head=False,
                        num_target_layers=tcfg.num_hidden_layers)
    drafter = zlab.ZlabDFlashDrafter(cfg, tcfg, block_size - 1)
    return drafter, drafter.init_params(jax.random.key(seed))


def assert_same_params(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("source", ["fresh", "qwen3_fixture", "llama_fixture"])
def test_export_then_load_round_trips_bit_for_bit(tgt, tmp_path, source):
    tcfg, tparams = tgt
    if source == "fresh":
        drafter, params = fresh_zlab_drafter(tcfg)
    elif source == "qwen3_fixture":
        drafter, params = drafters.load(DRAFT, tcfg, kind="dflash")
    else:   # a Llama 3 target (llama3-scaled RoPE) with its z-lab drafter
        tcfg, tparams = target.load(os.path.join(FIXTURES, "zlab_dflash_llama_target"))
        drafter, params = drafters.load(os.path.join(FIXTURES, "zlab_dflash_llama_b16"), tcfg, kind="dflash")
    out = zlab_export.save_zlab(str(tmp_path / "out"), drafter, params)
    loaded, lparams = drafters.load(out, tcfg)
    assert type(loaded) is zlab.ZlabDFlashDrafter and loaded.cfg == drafter.cfg and loaded.gamma == drafter.gamma
    assert_same_params(params, lparams)
    a0, d0, l0 = first_round(tcfg, tparams, drafter, params)
    a1, d1, l1 = first_round(tcfg, tparams, loaded, lparams)
    assert a0 == a1 and np.array_equal(d0, d1) and np.array_equal(l0, l1)
    assert len(d1) == drafter.cfg.block_size - 1


def test_exported_fixture_equals_zlab_own_folder(tgt, tmp_path):
    """The z-lab fixture, loaded and exported, is z-lab's own folder again: the same
    tensors bit for bit and config.json with the same fields (and values, except
    max_window_layers, unused when layer_types is given)."""
    tcfg, _ = tgt
    drafter, params = drafters.load(DRAFT, tcfg, kind="dflash")
    out = zlab_export.save_zlab(str(tmp_path / "out"), drafter, params)
    with open(os.path.join(DRAFT, "config.json")) as f:
        want = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        got = json.load(f)
    assert set(got) == set(want) - NOT_READ
    differ = {k for k in got if got[k] != want[k]}
    assert differ <= {"max_window_layers"}, {k: (got[k], want[k]) for k in differ}
    ref, new = open_folder(DRAFT), open_folder(out)
    assert sorted(new) == sorted(ref)
    for name in ref:
        assert np.array_equal(np.asarray(new[name]), np.asarray(ref[name])), name


def test_taps_off_by_one_break_the_round_trip(tgt, tmp_path):
    """A wrong rule (the taps shifted by one, as writing hidden_states indices would) loads
    but drafts differently: the round-trip test would catch it."""
    tcfg, tparams = tgt
    drafter, params = fresh_zlab_drafter(tcfg, seed=3)
    out = zlab_export.save_zlab(str(tmp_path / "out"), drafter, params)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf["dflash_config"]["target_layer_ids"] = [i + 1 for i in hf["dflash_config"]["target_layer_ids"]]
    with open(path, "w") as f:
        json.dump(hf, f)
    wrong, wparams = drafters.load(out, tcfg)
    _, _, l0 = first_round(tcfg, tparams, drafter, params)
    _, _, l1 = first_round(tcfg, tparams, wrong, wparams)
    assert not np.allclose(l0, l1)


def refusal(drafter, layouts=("zlab",)) -> str:
    with pytest.raises(DSparkError) as e:
        zlab_export.check_exportable(drafter, layouts)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_deepspec_drafters_are_refused_in_one_line(tgt, tmp_path):
    tcfg, _ = tgt
    dflash, params = make_block_drafter(tcfg, rank=0, confidence=False, block_size=7, taps=(1, 3))
    assert "drafts from block positions 0..6" in refusal(dflash)
    with pytest.raises(DSparkError, match="positions 0"):
        zlab_export.save_zlab(str(tmp_path / "no"), dflash, params)
    assert not os.path.exists(tmp_path / "no")
    dspark, _ = make_block_drafter(tcfg, rank=8, taps=(1, 3))
    assert "DSpark" in refusal(dspark) and "sequential" in refusal(dspark)
    conf, _ = make_block_drafter(tcfg, rank=0, confidence=True, with_markov=False, taps=(1, 3))
    assert "confidence head" in refusal(conf)


def test_a_zlab_drafter_is_not_written_as_deepspec(tgt):
    drafter, _ = fresh_zlab_drafter(tgt[0])
    assert "DeepSpec" in refusal(drafter, ("deepspec",)) and "mask positions" in refusal(drafter, ("deepspec",))
    zlab_export.check_exportable(drafter, ("zlab",))


def test_eagle3_and_llama_layer_drafters_are_refused(tgt):
    tcfg, _ = tgt
    from dspark_jax.config_llama import LlamaConfig

    drafter, _ = fresh_zlab_drafter(tcfg)
    fields = {f: getattr(drafter.cfg.arch, f) for f in drafter.cfg.arch.__dataclass_fields__}
    llama = type(drafter)(drafter.cfg.replace(arch=LlamaConfig(**fields)), tcfg, drafter.gamma)
    assert "LlamaConfig layers" in refusal(llama)

    class Eagle3Like:
        kind = "eagle3"

    assert "Eagle3" in refusal(Eagle3Like())


def test_training_refuses_before_it_starts(tgt, tmp_path):
    """train.train checks the export on the drafter it builds, before any step: a DeepSpec
    DFlash drafter (what drafter=dflash trains) is refused for export_layout=zlab."""
    tcfg, _ = tgt
    cfg = TrainConfig(target=TARGET, data_dir="d", dataset="x", drafter="dflash", block_size=7,
                      target_layer_ids=(1, 3), mask_token="3", export_layout="deepspec,zlab")
    validate(cfg)
    built = step_lib.build_drafter(cfg, tcfg, 3)
    assert "positions 0..6" in refusal(built, zlab_export.parse_layouts(cfg.export_layout))
    for bad in ("", "hf", "zlab,zlab"):
        with pytest.raises(DSparkError, match="export_layout"):
            validate(cfg.replace(export_layout=bad))


def test_trainer_export_step_writes_drafter_zlab(tgt, tmp_path):
    tcfg, tparams = tgt
    drafter, params = fresh_zlab_drafter(tcfg)
    cfg = TrainConfig(target=TARGET, out_dir=str(tmp_path), export_layout="zlab")
    folder = trainer.export_drafter(cfg, drafter, params, tparams)
    assert folder == str(tmp_path / "drafter_zlab") and not os.path.exists(tmp_path / "drafter")
    _, lparams = drafters.load(folder, tcfg)
    assert_same_params(params, lparams)


def test_cli_exports_and_refuses_in_one_line(tgt, tmp_path, capsys):
    export_cli.main(["--target", TARGET, "--draft", DRAFT, "--layout", "zlab", "--out", str(tmp_path / "o")])
    assert f"in the zlab layout to {tmp_path / 'o'}" in capsys.readouterr().out
    assert sorted(open_folder(str(tmp_path / "o"))) == sorted(open_folder(DRAFT))
    tcfg, tparams = tgt
    dflash, params = make_block_drafter(tcfg, rank=0, confidence=False, taps=(1, 3))
    from tests.helpers import write_block_drafter

    src = write_block_drafter(tmp_path / "deepspec", TARGET, tparams, dflash, params)
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--target", TARGET, "--draft", src, "--out", str(tmp_path / "o2")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drafts from block positions 0.." in err
