"""Training presets: every configs/*.py loads and names its hardware; the demo presets fit
the bundled target, stay in step with the recipe that trained the bundled drafters and
fit their stated memory (traced with jax.eval_shape: nothing is allocated)."""

import glob
import os

import pytest

from dspark_jax import mesh as mesh_lib
from dspark_jax import target
from train import memory, step as step_lib
from train.config import SHAPE_FIELDS, import_config, load_config, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
PRESETS = [p for p in PRESETS if not p.endswith("__init__.py")]
DEMO = [p for p in PRESETS if p.endswith("_demo.py")]


def module_doc(path):
    import ast

    with open(path) as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads_and_names_its_hardware(path):
    cfg = load_config(path, ["target=T", "data_dir=D", "dataset=x"])
    assert cfg.steps >= 1
    doc = module_doc(path)
    assert any(word in doc for word in ("CPU", "TPU", "GPU")), doc


def test_demo_presets_exist_for_every_drafter_kind():
    kinds = {import_config(p, TrainConfig).drafter for p in DEMO}
    assert kinds == {"dspark", "dflash", "eagle3"}


@pytest.mark.parametrize("path", DEMO, ids=os.path.basename)
def test_demo_preset_matches_the_recipe(path):
    from train.demo import recipe

    cfg = import_config(path, TrainConfig)
    ref = recipe.drafter_config("work", cfg.drafter, cfg.steps)
    for field in SHAPE_FIELDS + ("seq_len", "batch_size", "num_anchors", "lr", "ttt_length", "mask_token"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert os.path.samefile(os.path.join(REPO, cfg.target), os.path.join(REPO, ref.target))


@pytest.mark.parametrize("path", DEMO, ids=os.path.basename)
def test_demo_preset_fits_its_stated_memory(path):
    cfg = import_config(path, TrainConfig)
    assert "2 GiB" in module_doc(path)
    folder = os.path.join(REPO, cfg.target)
    tcfg, tparams = target.load(folder, cfg.compute_dtype)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    drafter = step_lib.build_drafter(cfg, tcfg, step_lib.mask_token_id(cfg, folder, tcfg.vocab_size))
    est = memory.abstract_estimate(cfg, drafter, tcfg, step_lib.optimizer(cfg), tparams, mesh)
    assert 0 < est.parts["activations"] and est.peak < 2 * 2 ** 30, est
