"""DeepSeek-V4's static-shape cache against transformers' full forward (golden logits):
prefill then verification steps of 1..gamma+1 tokens per row (ragged), rounds that
write wrong drafts (completing compressor windows, so entries and indexer keys are built
from them) and are rolled back by setting lengths only; greedy decoding through the
cache; config switches we do not support are one-line errors naming them."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import checkpoints, target
from dspark_jax.config_deepseek_v4 import DeepseekV4Config
from dspark_jax.errors import DSparkError
from dspark_jax.models.deepseek_v4 import DEEPSEEK_V4_CACHE_AXES, DeepseekV4Cache
from dspark_jax.safetensors_io import save_file
from tests.conftest import FIXTURES

TOL = 1e-4
NAME = "deepseek_v4_tiny_a"       # HCA (m 8), CSA (m 4, top-3 indexer), sliding window 8
GAMMA = 6
COUNTS = (7, 3, 1, 5, 6, 2, 4, 7, 7)


@pytest.fixture(scope="module")
def model():
    folder = os.path.join(FIXTURES, NAME)
    cfg, params = target.load(folder, "float32")
    g = dict(np.load(os.path.join(folder, "golden.npz")))
    seqs = [list(g["prompt_ids"][b, :n]) for b, n in enumerate(g["prompt_lengths"])]
    return cfg, params, g, seqs


def _shapes(g):
    """The shapes target.greedy_decode uses, so every test here shares its programs."""
    width = int(g["prompt_ids"].shape[1])
    return width, width + 12


def _step(cfg, params, cache, rows):
    toks = np.zeros((len(rows), GAMMA + 1), np.int32)
    for b, r in enumerate(rows):
        toks[b, :len(r)] = r
    logits, cache, _ = target.step(cfg, params, jnp.asarray(toks), jnp.asarray([len(r) for r in rows], jnp.int32),
                                   cache)
    return np.asarray(logits), cache


def _check(logits, rows, starts, g, what):
    for b, r in enumerate(rows):
        for j in range(len(r)):
            diff = np.abs(logits[b, j] - g[f"logits_{b}"][starts[b] + j]).max()
            assert diff <= TOL, f"{what}: row {b} position {starts[b] + j}: max |logit diff| {diff}"


def test_ragged_verify_steps_with_rollback_equal_the_full_forward(model):
    cfg, params, g, seqs = model
    width, max_len = _shapes(g)
    cache = target.init_cache(cfg, 2, max_len)
    assert isinstance(cache, DeepseekV4Cache) and DEEPSEEK_V4_CACHE_AXES.lengths == ("batch",)
    starts = [5, 9]
    toks = np.zeros((2, width), np.int32)
    for b in range(2):
        toks[b, :starts[b]] = seqs[b][:starts[b]]
    last, cache, _ = target.prefill(cfg, params, jnp.asarray(toks), jnp.asarray(starts, jnp.int32), cache)
    for b in range(2):
        assert np.abs(np.asarray(last)[b] - g[f"logits_{b}"][starts[b] - 1]).max() <= TOL
    rnd, rejected_windows = 0, 0
    while any(starts[b] < len(seqs[b]) for b in range(2)):
        counts = [min(COUNTS[(rnd + 3 * b) % len(COUNTS)], len(seqs[b]) - starts[b]) for b in range(2)]
        if rnd % 2 == 0:   # a round of wrong drafts after one real token, then rejected
            rows = [seqs[b][starts[b]:starts[b] + 1] + [(t * 7 + 3) % cfg.vocab_size for t in
                                                       seqs[b][starts[b] + 1:starts[b] + counts[b]]]
                    if counts[b] else [] for b in range(2)]
            before = np.asarray(cache.csa_entries).copy(), np.asarray(cache.idx_keys).copy()
            logits, cache = _step(cfg, params, cache, rows)
            _check(logits, [r[:1] for r in rows], starts, g, "first token of a draft round")
            rejected_windows += sum(
                (s + c) // cfg.csa_rate > (s + 1) // cfg.csa_rate for s, c in zip(starts, counts))
            assert not np.array_equal(before[0], np.asarray(cache.csa_entries)) or not any(counts)
            keep = [min(1, c) if b == 0 else 0 for b, c in enumerate(counts)]   # accept one / reject all
            starts = [s + k for s, k in zip(starts, keep)]
            cache = cache.replace(lengths=jnp.asarray(starts, jnp.int32))
        else:
            rows = [seqs[b][starts[b]:starts[b] + counts[b]] for b in range(2)]
            logits, cache = _step(cfg, params, cache, rows)
            _check(logits, rows, starts, g, f"round {rnd}")
            starts = [s + c for s, c in zip(starts, counts)]
            assert list(np.asarray(cache.lengths)) == starts
        rnd += 1
    assert rejected_windows >= 5, "the draft rounds must complete compressor windows from wrong tokens"


def test_greedy_decode_matches_golden(model):
    cfg, params, g, seqs = model
    width, max_len = _shapes(g)
    out = target.greedy_decode(cfg, params, seqs, 12, max_len=max_len)
    for b in range(2):
        assert out[b] == list(g[f"greedy_{b}"]), f"row {b}"


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("scoring_func", "relu"),
    ("num_key_value_heads", 2), ("n_shared_experts", 2)])
def test_unsupported_switch_is_a_one_line_error(tmp_path, field, value):
    folder = tmp_path / "v4"
    shutil.copytree(os.path.join(FIXTURES, NAME), folder)
    hf = checkpoints.read_config(str(folder))
    hf[field] = value
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DSparkError) as e:
        target.load(str(folder), "float32")
    msg = str(e.value)
    assert "\n" not in msg and field in msg


def test_legacy_fields_fold_as_transformers():
    """Legacy fields and a top-level `rope_scaling` (type yarn); the expected YaRN
    frequencies are transformers' DeepseekV4RotaryEmbedding's for this config."""
    hf = {"model_type": "deepseek_v4", "num_hidden_layers": 5, "compress_ratios": [128, 4, 0, 4, 128],
          "compress_rate_csa": 8, "num_hash_layers": 1, "qk_rope_head_dim": 16, "head_dim": 64,
          "index_head_dim": 32, "compress_rope_theta": 160000, "max_position_embeddings": 4096,
          "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 256,
                           "beta_fast": 32, "beta_slow": 1}}
    cfg = DeepseekV4Config.from_hf(hf)
    want = [1.0, 0.153729662, 0.0187499989, 0.00069877127, 0.000156249997, 3.49385627e-05, 7.81250037e-06,
            1.74692821e-06]
    np.testing.assert_allclose(cfg.compress_rope.inv_freq(), want, rtol=1e-6)
    assert cfg.layer_types == ("heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                               "compressed_sparse_attention", "heavily_compressed_attention")
    assert cfg.csa_rate == 8 and cfg.hca_rate == 128 and cfg.rope_dim == 16
    assert cfg.mlp_layer_types == ("hash_moe", "moe", "moe", "moe", "moe")
    assert cfg.compress_rope.rope_type == "yarn" and cfg.compress_rope.attention_factor == 1.0
    assert cfg.main_rope.rope_type == "default" and cfg.main_rope.theta == 10000.0


def _copy_with_index(tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(folder, index["weight_map"])
    path.write_text(json.dumps(index))
    return str(folder)


def test_missing_and_unexpected_tensors_are_one_line_errors(tmp_path):
    def drop(folder, wm):
        del wm["model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"]

    with pytest.raises(DSparkError) as e:
        target.load(_copy_with_index(tmp_path / "a", "deepseek_v4_tiny_b", drop), "float32")
    assert "\n" not in str(e.value) and "indexer.q_b_proj" in str(e.value) and "missing" in str(e.value)

    def extra(folder, wm):
        save_file({"layers.0.attn.wq_c.weight": np.zeros((2, 2), np.float32)}, str(folder / "extra.safetensors"))
        wm["layers.0.attn.wq_c.weight"] = "extra.safetensors"

    with pytest.raises(DSparkError) as e:
        target.load(_copy_with_index(tmp_path / "b", "deepseek_v4_tiny_fp8", extra), "float32")
    assert "\n" not in str(e.value) and "layers.0.attn.wq_c.weight" in str(e.value)


def test_fp8_weight_without_its_scale_is_a_one_line_error(tmp_path):
    def drop_scale(folder, wm):
        del wm["layers.0.attn.wq_a.weight_scale_inv"]

    with pytest.raises(DSparkError) as e:
        target.load(_copy_with_index(tmp_path, "deepseek_v4_tiny_fp8", drop_scale), "float32")
    assert "\n" not in str(e.value) and "layers.0.attn.wq_a.weight" in str(e.value)
