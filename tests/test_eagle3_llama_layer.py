"""Eagle3 drafters for Qwen3 targets go out in the EAGLE-3 layout: train.train's
eagle3_layer=llama (the default `auto` picks it when export_layout holds eagle3) gives the
drafter EAGLE-3's Llama midlayer (no q/k norms, head_dim = hidden / heads) whatever the
target family. A tiny run on an 8-layer Qwen3 target exports it in both layouts; the
EAGLE-3 folder and the DeepSpec folder (model_type llama) load back bit for bit, their
first-round drafts equal the trained drafter's and greedy speculative output equals plain
greedy. The field's resolution and refusals, and resumes of checkpoints that predate it;
DeepSpec block-drafter folders written for a Llama target load back (model_type llama)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import drafters, generation, target
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.drafters import eagle3, eagle3_export, eagle3_layout
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from tests.test_eagle3_export import as_layout, assert_same_params
from tests.test_eagle3_layout import first_round
from tests.test_training import TIED, synthetic_chats
from train import data, trainer
from train.checkpointing import Checkpointer
from train.config import SHAPE_FIELDS, SHAPE_FIELDS_ABSENT, TrainConfig, eagle3_layer, validate
from train.eagle3_objective import with_target_head

QWEN3_TARGET = os.path.join(FIXTURES, "eagle3_qwen3_target")
TAPS = (1, 3, 5)
GOLDEN = {"prompt_ids": np.array([1, 5, 9, 12, 7, 3, 20, 31], np.int32)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of drafter=eagle3 on the 8-layer Qwen3 target (with the tiny Qwen3
    tokenizer, same vocabulary), export_layout=deepspec,eagle3, eagle3_layer left auto."""
    root = tmp_path_factory.mktemp("eagle3_llama_layer")
    tgt = root / "target"
    shutil.copytree(QWEN3_TARGET, tgt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TIED, name), tgt / name)
    synthetic_chats(root / "train.jsonl", n=8)
    data.build(name="count", sources={"train": [str(root / "train.jsonl")]}, tokenizer_dir=TIED,
               data_dir=str(root / "data"))
    cfg = TrainConfig(target=str(tgt), data_dir=str(root / "data"), dataset="count", drafter="eagle3",
                      draft_layers=1, target_layer_ids=TAPS, block_size=3, ttt_length=2, seq_len=32,
                      batch_size=2, steps=2, lr=1e-2, out_dir=str(root / "run"), ckpt_every=2, log_every=1,
                      async_checkpoint=False, export_layout="deepspec,eagle3")
    state, drafter = trainer.run(cfg, progress=False)
    tcfg, tparams = target.load(str(tgt))
    trained = with_target_head(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, tparams), tcfg)
    return cfg, drafter, trained, tcfg, tparams


def test_auto_trains_a_llama_midlayer_for_a_qwen3_target(run):
    cfg, drafter, trained, tcfg, _ = run
    arch = drafter.cfg.arch
    assert type(arch) is LlamaConfig and arch.rope_type == "default" and arch.rope_theta == tcfg.rope_theta
    assert arch.head_dim * arch.num_attention_heads == arch.hidden_size and not arch.attention_bias
    assert "q_norm" not in trained["layers_0"]["self_attn"]
    with open(os.path.join(cfg.out_dir, "config.json")) as f:
        assert json.load(f)["eagle3_layer"] == "llama"      # recorded resolved (compared on resume)
    assert eagle3_export.eagle3_refusal(drafter) is None


def test_eagle3_folder_round_trips_bit_for_bit(run):
    cfg, drafter, trained, tcfg, tparams = run
    loaded, lparams = drafters.load(os.path.join(cfg.out_dir, "drafter_eagle3"), tcfg, kind="eagle3",
                                    gamma=drafter.gamma)
    assert type(loaded) is eagle3_layout.EagleLayoutDrafter and loaded.cfg.arch == drafter.cfg.arch
    assert loaded.tap_layers == TAPS
    assert_same_params(as_layout(trained), lparams)
    a0, d0, q0 = first_round(tcfg, tparams, drafter, trained, GOLDEN, greedy=False)   # drafts and q
    a1, d1, q1 = first_round(tcfg, tparams, loaded, lparams, GOLDEN, greedy=False)
    assert a0 == a1 and np.array_equal(d0, d1) and np.array_equal(q0, q1) and (q0 > 0).all()
    prompts = [[9, 8, 7, 100, 200, 300, 50]]
    kw = dict(max_new_tokens=8, sampling=SamplingParams.make(1, 0.0), seeds=[0])
    plain = [c.token_ids for c in generation.generate(tcfg, tparams, prompts, **kw)]
    spec = generation.generate(tcfg, tparams, prompts, drafter=loaded, dparams=lparams, **kw)
    assert [c.token_ids for c in spec] == plain


def test_deepspec_folder_loads_back_as_llama_layers(run):
    cfg, drafter, trained, tcfg, tparams = run
    folder = os.path.join(cfg.out_dir, "drafter")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    loaded, lparams = drafters.load(folder, tcfg)
    assert type(loaded) is eagle3.Eagle3Drafter and loaded.cfg.arch == drafter.cfg.arch
    assert_same_params(trained, lparams)      # same class, same arch, same tensors: the same drafter


def test_eagle3_layer_resolution_and_refusals():
    cfg = TrainConfig(target=QWEN3_TARGET, data_dir="d", dataset="x", drafter="eagle3")
    assert eagle3_layer(cfg) == "target"                                   # DeepSpec export: unchanged
    assert eagle3_layer(cfg.replace(export_layout="eagle3")) == "llama"
    assert eagle3_layer(cfg.replace(export_layout="deepspec,eagle3", eagle3_layer="target")) == "target"
    assert eagle3_layer(cfg.replace(drafter="dflash", export_layout="zlab")) == "target"
    for bad, match in ((dict(eagle3_layer="qwen3"), "auto, target or llama"),
                       (dict(drafter="dflash", eagle3_layer="llama"), "drafter=eagle3")):
        with pytest.raises(DSparkError, match=match) as e:
            validate(cfg.replace(**bad))
        assert "\n" not in str(e.value)
    assert "eagle3_layer" in SHAPE_FIELDS and SHAPE_FIELDS_ABSENT["eagle3_layer"] == "target"


def test_checkpoint_before_the_field_resumes_as_the_target_layer(tmp_path):
    """A checkpoint whose config predates eagle3_layer was trained with the target's layer."""
    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
    state = {"w": jnp.zeros((2,), jnp.float32)}
    now = json.loads(TrainConfig(drafter="eagle3", eagle3_layer="target").to_json())
    old = {k: v for k, v in now.items() if k not in ("eagle3_layer", "block_convention")}
    ckpt.save(1, state, {"data_position": 1, "config": old})
    ckpt.wait()
    kw = dict(shape_fields=SHAPE_FIELDS, absent=SHAPE_FIELDS_ABSENT)
    ckpt.restore(1, state, config=now, **kw)
    with pytest.raises(DSparkError, match="eagle3_layer 'target' there, 'llama' now") as e:
        ckpt.restore(1, state, config=dict(now, eagle3_layer="llama"), **kw)
    assert "\n" not in str(e.value)
    ckpt.close()


def test_deepspec_block_drafter_for_a_llama_target_loads_back(tmp_path):
    """A DeepSpec block-drafter folder written for a Llama target (model_type llama) loads
    back as Llama draft layers, tensors bit for bit."""
    from tests.helpers import make_block_drafter, write_block_drafter

    folder = os.path.join(FIXTURES, "llama3_tiny_tied")
    tcfg, tparams = target.load(folder)
    drafter, params = make_block_drafter(tcfg, rank=0, confidence=False, layers=1, taps=(-1, 0))
    out = write_block_drafter(tmp_path / "dflash", folder, tparams, drafter, params)
    loaded, lparams = drafters.load(out, tcfg)
    assert loaded.kind == "dflash" and type(loaded.cfg.arch) is LlamaConfig
    assert loaded.cfg.arch == drafter.cfg.arch.replace(tie_word_embeddings=False)   # the folder writes False
    assert_same_params(params, lparams)
