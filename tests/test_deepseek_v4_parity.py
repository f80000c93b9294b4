"""DeepSeek-V4 against golden outputs of transformers' DeepseekV4ForCausalLM (float32,
full forwards from position 0, tol 1e-4): logits of both prompts, every layer's output
streams, greedy tokens by full re-forwards; for every fixture folder (original DeepSeek
names, transformers' names, and the FP8 release layout dequantised at load). The golden
files come from tests/fixtures/make_deepseek_v4_golden.py; this test reads only them."""

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from tests.conftest import FIXTURES

TOL = 1e-4
FOLDERS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(FIXTURES, "deepseek_v4_tiny_*")))
GREEDY = 12


@functools.lru_cache(maxsize=None)
def loaded(name):
    folder = os.path.join(FIXTURES, name)
    cfg, params = target.load(folder, "float32")
    return cfg, params, dict(np.load(os.path.join(folder, "golden.npz")))


@functools.partial(jax.jit, static_argnames=("cfg",))
def full(cfg, params, tokens, q_lens):
    """logits [B, T, V] and per-layer output means of one causal pass without a cache."""
    h, _, taps = target.forward(cfg, params, tokens, q_lens, None, tuple(range(cfg.num_hidden_layers)))
    return target.logits(cfg, params, h), taps


def width(golden) -> int:
    """One padded width for every full pass of a folder (prompts + greedy tokens)."""
    return golden["prompt_ids"].shape[1] + GREEDY


def run(cfg, params, seqs, t):
    toks = np.zeros((len(seqs), t), np.int32)
    for b, s in enumerate(seqs):
        toks[b, :len(s)] = s
    return full(cfg, params, jnp.asarray(toks), jnp.asarray([len(s) for s in seqs], jnp.int32))


def prompts(golden):
    return [list(golden["prompt_ids"][b, :n]) for b, n in enumerate(golden["prompt_lengths"])]


@pytest.mark.parametrize("name", FOLDERS)
def test_logits_and_layers_match_transformers(name):
    cfg, params, g = loaded(name)
    logits, taps = run(cfg, params, prompts(g), width(g))
    logits = np.asarray(logits)
    for b, n in enumerate(g["prompt_lengths"]):
        diff = np.abs(logits[b, :n] - g[f"logits_{b}"]).max()
        assert diff <= TOL, f"{name} prompt {b}: max |logit diff| {diff}"
    for spec, key in ((cfg.main_rope, "inv_freq_main"), (cfg.compress_rope, "inv_freq_compress")):
        np.testing.assert_allclose(spec.inv_freq(), g[key], rtol=1e-6, err_msg=f"{name} {key}")
    n0 = g["prompt_lengths"][0]
    for i, want in enumerate(g["layer_out_0"]):   # taps are the mean of the streams
        diff = np.abs(np.asarray(taps[i])[0, :n0] - want.mean(axis=1)).max()
        assert diff <= TOL, f"{name} layer {i}: max |stream-mean diff| {diff}"


@pytest.mark.parametrize("name", FOLDERS)
def test_greedy_by_full_forwards_matches_transformers(name):
    cfg, params, g = loaded(name)
    seqs = prompts(g)
    for step in range(GREEDY):
        logits, _ = run(cfg, params, seqs, width(g))
        logits = np.asarray(logits)
        for b in range(len(seqs)):
            last = logits[b, len(seqs[b]) - 1]
            assert np.abs(last - g[f"greedy_logits_{b}"][step]).max() <= TOL, f"{name} row {b} step {step}"
            seqs[b] = seqs[b] + [int(np.argmax(last))]
    for b in range(len(seqs)):
        got = seqs[b][int(g["prompt_lengths"][b]):]
        assert got == list(g[f"greedy_{b}"]), f"{name} row {b}: {got} != {list(g[f'greedy_{b}'])}"


def test_fixtures_exercise_every_switch():
    """The fixture set covers all layer kinds, both routers,
    several scoring functions, YaRN and FP8."""
    cfgs = [loaded(n)[0] for n in FOLDERS]
    kinds = {k for c in cfgs for k in c.layer_types}
    assert kinds == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert {k for c in cfgs for k in c.mlp_layer_types} == {"hash_moe", "moe"}
    assert len({c.scoring_func for c in cfgs}) >= 2
    assert any(c.compress_rope.rope_type == "yarn" for c in cfgs)
    assert any(n.endswith("fp8") for n in FOLDERS)
