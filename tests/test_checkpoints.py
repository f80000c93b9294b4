"""Loading Hugging Face folders: layouts, dtypes, and one-line errors naming the culprit."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from dspark_jax import checkpoints, target
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder, save_file
from dspark_jax.tokenizer import Tokenizer
from tests.conftest import FIXTURES

UNTIED = os.path.join(FIXTURES, "qwen3_tiny_untied")
TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")


@pytest.fixture
def folder(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(TIED, dst)
    return str(dst)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_sharded_index_and_single_file_layouts_load():
    cfg_u, p_u = target.load(UNTIED)
    cfg_t, p_t = target.load(TIED)
    assert not cfg_u.tie_word_embeddings and "lm_head" in p_u
    assert cfg_t.tie_word_embeddings and "lm_head" not in p_t
    assert len([f for f in os.listdir(UNTIED) if f.endswith(".safetensors")]) > 1


def test_shards_without_index_load(folder, tmp_path):
    index = open_folder(UNTIED)
    names = sorted(index)
    dst = tmp_path / "noindex"
    shutil.copytree(UNTIED, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({n: np.asarray(index[n]) for n in names[:10]}, str(dst / "a.safetensors"))
    save_file({n: np.asarray(index[n]) for n in names[10:]}, str(dst / "b.safetensors"))
    _, params = target.load(str(dst))
    _, ref = target.load(UNTIED)
    np.testing.assert_array_equal(params["norm"]["weight"], ref["norm"]["weight"])


def test_bfloat16_checkpoint_and_dtype_override(folder):
    index = open_folder(folder)
    tensors = {n: np.asarray(index[n]).astype(ml_dtypes.bfloat16) for n in index}
    os.remove(os.path.join(folder, "model.safetensors"))
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    _edit_config(folder, dtype="bfloat16")
    cfg, params = target.load(folder, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params["norm"]["weight"].dtype == jnp.bfloat16
    cfg32, params32 = target.load(folder)  # on a CPU backend the default computes in float32
    assert jax.default_backend() != "cpu" or (cfg32.dtype == "float32"
                                              and params32["norm"]["weight"].dtype == np.float32)
    cfg32, params32 = target.load(folder, dtype="float32")
    assert params32["norm"]["weight"].dtype == np.float32
    h, _, _ = target.forward(cfg, params, jnp.array([[1, 2, 3]]), jnp.array([3]))
    assert h.dtype == jnp.bfloat16 and bool(jnp.isfinite(h.astype(jnp.float32)).all())


def test_safetensors_writer_agrees_with_the_library(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int32)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_rope_theta_top_level_or_rope_parameters(folder):
    _edit_config(folder, rope_parameters=None, rope_theta=12345.0)
    cfg, _ = target.load(folder)
    assert cfg.rope_theta == 12345.0
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 1.0})
    with pytest.raises(DSparkError, match="rope_type 'yarn'"):
        target.load(folder)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="mistral"), r"unknown model_type 'mistral'"),
    (dict(hidden_size=None), r"missing field\(s\) hidden_size"),
    (dict(num_hidden_layers=3), r"tensor model.layers.2.input_layernorm.weight is missing"),
    (dict(intermediate_size=100), r"tensor model.layers.0.mlp.\w+_proj.weight in model.safetensors has shape \((96, 48|48, 96)\); the config implies"),
    (dict(head_dim=8), r"tensor model.layers.0.self_attn.\w+.weight in model.safetensors has shape \(\d+(, \d+)?,?\); the config implies"),
])
def test_bad_folders_name_the_problem(folder, change, match):
    _edit_config(folder, **change)
    with pytest.raises(DSparkError, match=match):
        target.load(folder)


def test_missing_files(folder, tmp_path):
    with pytest.raises(DSparkError, match="does not exist"):
        target.load(str(tmp_path / "nope"))
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(DSparkError, match="no \\*.safetensors weights"):
        target.load(folder)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(DSparkError, match="missing .*config.json"):
        target.load(folder)
    sharded = tmp_path / "sharded"
    shutil.copytree(UNTIED, sharded)
    os.remove(sharded / "model-00003-of-00007.safetensors")
    with pytest.raises(DSparkError, match="missing weights file .*model-00003-of-00007.safetensors"):
        target.load(str(sharded))


def test_save_then_load_round_trip(tmp_path):
    cfg, params = target.load(UNTIED)
    out = tmp_path / "copy"
    shutil.copytree(UNTIED, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    checkpoints.save_tensors(checkpoints.to_tensors(params), str(out))
    _, back = target.load(str(out))
    for a, b in zip(np.asarray(params["layers_1"]["self_attn"]["o_proj"]["kernel"]).ravel(),
                    np.asarray(back["layers_1"]["self_attn"]["o_proj"]["kernel"]).ravel()):
        assert a == b


def test_tokenizer_and_chat_template():
    tok = Tokenizer(TIED)
    ids = tok.encode("Hello there.")
    assert ids and tok.decode(ids) == "Hello there."
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.stop_ids == (tok.token_to_id("<|im_end|>"),)
    assert max(tok.encode_chat([{"role": "user", "content": "Hi"}])) < 384


def test_tokenizer_missing(tmp_path):
    with pytest.raises(DSparkError, match="missing .*tokenizer.json"):
        Tokenizer(str(tmp_path))
