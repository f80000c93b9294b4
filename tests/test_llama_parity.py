"""Llama 3 targets against golden outputs of transformers' LlamaForCausalLM (float32, tol 1e-4).

The fixtures (tests/fixtures/make_llama_golden.py) are a sharded, untied folder with
Llama 3.1 RoPE scaling and a tied one with plain RoPE and attention biases, both GQA.
They load through the model registry and run through the Qwen3 module (Llama's
attention switch) and the engine: dense, packed and paged passes give transformers'
greedy tokens. Ignoring the llama3 scaling breaks parity, so the rule is exercised.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from dspark_jax.models import registry
from dspark_jax.tokenizer import Tokenizer
from tests.conftest import FIXTURES
from tests.parity import assert_padded_prefill_matches, assert_taps_are_raw, golden_prompts

FOLDERS = ["llama3_tiny_untied", "llama3_tiny_tied"]
SCALED = os.path.join(FIXTURES, "llama3_tiny_untied")
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _load(name):
    folder = os.path.join(FIXTURES, name)
    cfg, params = target.load(folder)
    return cfg, params, np.load(os.path.join(folder, "golden.npz"))


@pytest.fixture(scope="module", params=FOLDERS)
def loaded(request):
    return _load(request.param)


def _logit_diff(cfg, params, g):
    """Max |logit - reference| over both golden prompts, each run alone."""
    worst = 0.0
    for i, prompt in enumerate(golden_prompts(g)):
        h, _, _ = target.forward(cfg, params, jnp.array([prompt]), jnp.array([len(prompt)]))
        worst = max(worst, float(jnp.abs(target.logits(cfg, params, h)[0] - g[f"logits_{i}"]).max()))
    return worst


def test_loads_through_the_registry_as_llama(loaded):
    cfg, params, _ = loaded
    assert isinstance(cfg, LlamaConfig) and registry.for_config(cfg).name == "llama"
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA
    attn = params["layers_0"]["self_attn"]
    assert "q_norm" not in attn and "k_norm" not in attn  # Llama has no per-head q/k norm
    assert ("bias" in attn["q_proj"]) == cfg.attention_bias
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


def test_rope_frequencies_match_reference(loaded):
    cfg, _, g = loaded
    np.testing.assert_allclose(cfg.inv_freq(), g["inv_freq"], rtol=1e-6, atol=0)


def test_full_forward_logits_match_reference(loaded):
    cfg, params, g = loaded
    diff = _logit_diff(cfg, params, g)
    print(f"max |logit diff| = {diff:.2e}")
    assert diff <= TOL, diff


def test_batched_right_padded_prefill_matches_reference(loaded):
    cfg, params, g = loaded
    assert_padded_prefill_matches(cfg, params, g, TOL)


def test_layer_taps_are_raw_decoder_outputs(loaded):
    cfg, params, g = loaded
    assert_taps_are_raw(cfg, params, g, TOL)


def test_greedy_tokens_identical(loaded):
    cfg, params, g = loaded
    out = target.greedy_decode(cfg, params, golden_prompts(g), 32)
    assert out == [g["greedy_0"].tolist(), g["greedy_1"].tolist()]


@pytest.mark.parametrize("query_block", [None, 4])
def test_packed_pass_equals_dense_step(loaded, query_block):
    """The packed verification pass gives the dense cached step's logits on Llama."""
    cfg, params, _ = loaded
    rng = np.random.default_rng(0)
    s, w, plen, q_lens = 3, 4, np.array([5, 2, 7], np.int32), np.array([4, 1, 3], np.int32)
    pre = rng.integers(6, cfg.vocab_size, (s, 8)).astype(np.int32)
    _, cache, _ = target.prefill(cfg, params, jnp.asarray(pre), jnp.asarray(plen), target.init_cache(cfg, s, 32))
    tokens = rng.integers(6, cfg.vocab_size, (s, w)).astype(np.int32)
    want, _, _ = target.step(cfg, params, jnp.asarray(tokens), jnp.asarray(q_lens), jax.tree.map(jnp.copy, cache))
    idx = np.flatnonzero(np.arange(w)[None] < q_lens[:, None])
    rows, cols = idx // w, idx % w
    pad = 10 - len(idx)
    got, after, _ = target.step_packed(
        cfg, params, jnp.asarray(np.pad(tokens.reshape(-1)[idx], (0, pad))), jnp.asarray(np.pad(rows, (0, pad))),
        jnp.asarray(np.pad(plen[rows] + cols, (0, pad), constant_values=32)),
        jnp.asarray(np.arange(10) < len(idx)), cache, query_block=query_block)
    np.testing.assert_allclose(np.asarray(got)[:len(idx)], np.asarray(want)[rows, cols], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(after.lengths, plen)


@pytest.mark.parametrize("name,paged", [("llama3_tiny_untied", False), ("llama3_tiny_untied", True),
                                        ("llama3_tiny_tied", True)])
def test_engine_greedy_equals_reference(name, paged):
    """Engine, policy "none": staggered requests (the second prompt enters in chunks of 3
    beside a decoding row on the slot cache; page tables on the paged one) decode
    transformers' greedy tokens."""
    cfg, params, g = _load(name)
    engine = Engine(cfg, params, None, None, slots=2, max_len=64, policy="none", prefill_chunk=3,
                    paged=paged, page_size=4)
    ids = [engine.submit(golden_prompts(g)[0], max_new_tokens=32)]
    engine.step()
    ids.append(engine.submit(golden_prompts(g)[1], max_new_tokens=32))
    while not engine.idle:
        engine.step()
    for i, rid in enumerate(ids):
        res = engine.result(rid)
        assert res.error is None and res.token_ids == g[f"greedy_{i}"].tolist(), (i, paged)
    assert engine.paged == paged
    if not paged:
        assert engine.metrics.prefill_chunks > 0


def test_ignoring_llama3_scaling_breaks_parity():
    """The wrong rule fails: the same folder with the llama3 scaling dropped (plain RoPE at
    the same theta) is far from the reference; the fixture's frequencies fall in all three
    bands (kept, blended, divided by the factor)."""
    cfg, params, g = _load("llama3_tiny_untied")
    assert cfg.rope_type == "llama3" and cfg.rope_factor == 8.0
    plain = cfg.replace(rope_type="default").inv_freq()
    ratio = cfg.inv_freq() / plain
    assert np.any(ratio == 1.0) and np.any(np.isclose(ratio, 1 / 8)) and np.any((ratio > 1 / 8) & (ratio < 1))
    angle_gap = (max(g["prompt_lengths"]) - 1) * np.abs(plain - cfg.inv_freq()).max()
    assert angle_gap > 1.0, angle_gap  # radians at the longest prompt's last position
    assert _logit_diff(cfg, params, g) <= TOL
    assert _logit_diff(cfg.replace(rope_type="default"), params, g) > 100 * TOL


def test_legacy_rope_scaling_spelling_reads_the_same():
    """Llama 3.x folders spell RoPE as `rope_theta` + `rope_scaling`; transformers 5 as
    `rope_parameters`: both give the same config, and to_hf round-trips."""
    with open(os.path.join(SCALED, "config.json")) as f:
        hf = json.load(f)
    want = LlamaConfig.from_hf(hf)
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    scaling = dict(hf["rope_parameters"])
    legacy["rope_theta"] = scaling.pop("rope_theta")
    legacy["rope_scaling"] = scaling
    assert LlamaConfig.from_hf(legacy) == want
    assert LlamaConfig.from_hf(dict(legacy, rope_scaling=None)).rope_type == "default"
    assert LlamaConfig.from_hf(want.to_hf()) == want


@pytest.mark.parametrize("change,match", [
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_switch_is_refused_by_name(tmp_path, change, match):
    folder = tmp_path / "llama"
    shutil.copytree(SCALED, folder)
    with open(folder / "config.json") as f:
        hf = json.load(f)
    hf.update(change)
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DSparkError, match=match) as e:
        target.load(str(folder))
    assert "\n" not in str(e.value)


def test_tokenizer_folder_reads_llama_stop_ids_and_template():
    tok = Tokenizer(SCALED)
    assert tok.stop_ids == (1, 4)  # <|end_of_text|>, <|eot_id|> from generation_config.json
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and tok.token_to_id("<|eot_id|>") in ids
