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


def test_fp4_routed_experts_of_a_released_folder_are_unpacked_at_load(tmp_path):
    """DeepSeek-V4-Flash / -Pro ship routed experts as packed e2m1 (int8, low nibble first)
    with an e8m0 scale per 32 inputs and `expert_dtype: fp4`: the fp8 fixture's experts
    rewritten so load as the element-wise rule says."""
    import json
    import shutil

    import ml_dtypes

    from dspark_jax import fp8
    from dspark_jax.safetensors_io import save_file

    src, dst = os.path.join(FIXTURES, "deepseek_v4_tiny_fp8"), tmp_path / "fp4"
    shutil.copytree(src, dst)
    with open(dst / "model.safetensors.index.json") as f:
        index = json.load(f)
    rng, new, want = np.random.default_rng(0), {}, {}
    for name in [n for n in index["weight_map"] if ".ffn.experts." in n and n.endswith(".weight")]:
        out, cols = {"w1": (24, 64), "w3": (24, 64), "w2": (64, 24)}[name.split(".")[-2]]
        packed = rng.integers(-128, 128, (out, cols // 2), dtype=np.int8)
        scale = (2.0 ** rng.integers(-6, -2, (out, -(-cols // 32)))).astype(ml_dtypes.float8_e8m0fnu)
        prefix = name[: -len(".weight")]
        new[name], new[prefix + ".scale"] = packed, scale
        del index["weight_map"][prefix + ".weight_scale_inv"]
        want[name] = fp8.dequantize_fp4(packed, scale)
    save_file(new, str(dst / "experts-fp4.safetensors"))
    index["weight_map"].update({n: "experts-fp4.safetensors" for n in new})
    with open(dst / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with open(dst / "config.json") as f:
        hf = json.load(f)
    with open(dst / "config.json", "w") as f:
        json.dump(dict(hf, expert_dtype="fp4"), f)
    cfg, params = target.load(str(dst), "float32")
    for layer in range(cfg.num_hidden_layers):
        experts = params[f"layers_{layer}"]["mlp"]["experts"]
        for e in range(cfg.n_routed_experts):
            w = f"layers.{layer}.ffn.experts.{e}"
            np.testing.assert_array_equal(np.asarray(experts["gate_up_proj"][e, 0]), want[f"{w}.w1.weight"])
            np.testing.assert_array_equal(np.asarray(experts["gate_up_proj"][e, 1]), want[f"{w}.w3.weight"])
            np.testing.assert_array_equal(np.asarray(experts["down_proj"][e]), want[f"{w}.w2.weight"])
