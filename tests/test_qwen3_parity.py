"""Qwen3 against golden outputs of transformers' Qwen3ForCausalLM (float32, tol 1e-4)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target
from tests.conftest import FIXTURES
from tests.parity import assert_padded_prefill_matches, assert_taps_are_raw, golden_prompts

FOLDERS = ["qwen3_tiny_untied", "qwen3_tiny_tied"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FOLDERS)
def loaded(request):
    folder = os.path.join(FIXTURES, request.param)
    cfg, params = target.load(folder)
    return cfg, params, np.load(os.path.join(folder, "golden.npz"))


def test_full_forward_logits_match_reference(loaded):
    cfg, params, g = loaded
    for i, prompt in enumerate(golden_prompts(g)):
        h, _, _ = target.forward(cfg, params, jnp.array([prompt]), jnp.array([len(prompt)]))
        diff = float(jnp.abs(target.logits(cfg, params, h)[0] - g[f"logits_{i}"]).max())
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
    assert out[0] == g["greedy_0"].tolist()
    assert out[1] == g["greedy_1"].tolist()


def test_prefill_then_multi_token_steps_equal_full_forward(loaded):
    """Cache path (ragged prefill, then ragged multi-token steps with padding) == one pass."""
    cfg, params, _ = loaded
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (19, 11, 15)]
    prompt_lens = [5, 1, 8]
    cache = target.init_cache(cfg, 3, 32)
    t = max(prompt_lens)
    toks = jnp.array([s[:n] + [0] * (t - n) for s, n in zip(seqs, prompt_lens)])
    _, cache, _ = target.prefill(cfg, params, toks, jnp.array(prompt_lens), cache)
    pos = list(prompt_lens)
    got = [[] for _ in seqs]
    step_sizes = [[3, 0, 4], [1, 5, 3], [8, 3, 0], [2, 2, 0]]
    for sizes in step_sizes:
        width = 8
        q = []
        for b, n in enumerate(sizes):
            chunk = seqs[b][pos[b]:pos[b] + n]
            q.append(chunk + [int(rng.integers(0, cfg.vocab_size))] * (width - len(chunk)))  # junk padding
        logits, cache, _ = target.step(cfg, params, jnp.array(q), jnp.array(sizes), cache)
        for b, n in enumerate(sizes):
            got[b].extend(np.asarray(logits[b, :n]))
            pos[b] += n
    assert [int(x) for x in cache.lengths] == pos
    for b, s in enumerate(seqs):
        n = pos[b]
        h, _, _ = target.forward(cfg, params, jnp.array([s[:n]]), jnp.array([n]))
        ref = np.asarray(target.logits(cfg, params, h)[0, prompt_lens[b]:n])
        assert np.abs(np.stack(got[b]) - ref).max() <= TOL


def test_padding_slots_do_not_touch_cache(loaded):
    cfg, params, _ = loaded
    cache = target.init_cache(cfg, 2, 16)
    _, cache, _ = target.prefill(cfg, params, jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2]), cache)
    before = jax.device_get(cache)
    a, ca, _ = target.step(cfg, params, jnp.array([[7, 8, 9], [1, 2, 3]]), jnp.array([1, 2]),
                           jax.tree.map(jnp.asarray, before))
    b, cb, _ = target.step(cfg, params, jnp.array([[7, 100, 101], [1, 2, 200]]), jnp.array([1, 2]),
                           jax.tree.map(jnp.asarray, before))
    np.testing.assert_array_equal(np.asarray(a[0, :1]), np.asarray(b[0, :1]))
    np.testing.assert_array_equal(np.asarray(a[1, :2]), np.asarray(b[1, :2]))
    np.testing.assert_array_equal(np.asarray(ca.k), np.asarray(cb.k))
    np.testing.assert_array_equal(np.asarray(ca.v), np.asarray(cb.v))
