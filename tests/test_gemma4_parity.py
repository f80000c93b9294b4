"""Gemma 4 against golden outputs of transformers' Gemma4ForCausalLM (float32, tol 1e-4),
its cache path against its own full forward, config errors, and the 12B preset's shape."""

import copy
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import generation, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.config_gemma4 import Gemma4Config, gemma4_12b, gemma4_tiny
from dspark_jax.errors import DSparkError
from dspark_jax.models.gemma4 import GEMMA4_CACHE_AXES, Gemma4Cache
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from tests.parity import golden_prompts
from tests.helpers import OracleDrafter

TOP_LEVEL, MOE_SHARED = "gemma4_tiny", "gemma4_tiny_moe_shared"
TOL = 1e-4


# Every call below uses one of a few shapes (batch 3; full passes 24 wide; cache steps 8
# wide into 32 slots), so each config compiles a handful of programs, not one per test.
B, T_FULL, T_STEP, MAX_LEN = 3, 24, 8, 32


@pytest.fixture(scope="module", params=[TOP_LEVEL, MOE_SHARED])
def loaded(request):
    folder = os.path.join(FIXTURES, request.param)
    cfg, params = target.load(folder)
    return cfg, params, np.load(os.path.join(folder, "golden.npz"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _full(cfg, params, tokens, q_lens):
    h, _, taps = target.forward(cfg, params, tokens, q_lens, None, tuple(range(-1, cfg.num_hidden_layers)))
    return target.logits(cfg, params, h), taps


def full(cfg, params, seqs):
    """One causal pass over up to B right-padded sequences: (logits [B, T, V], taps per
    layer -1..L-1, each [B, T, E])."""
    return _full(cfg, params, *_rows(seqs, T_FULL, pad=0))


def _rows(seqs, width, pad):
    toks = np.full((B, width), pad, np.int32)
    for b, s in enumerate(seqs):
        toks[b, :len(s)] = s
    return jnp.asarray(toks), jnp.asarray([len(s) for s in seqs] + [0] * (B - len(seqs)), jnp.int32)


def step(cfg, params, seqs, cache, pad=0):
    """Up to B ragged rows (<= T_STEP tokens each, `pad` in the padded slots) against the
    cache: (logits [B, T_STEP, V], cache)."""
    logits, cache, _ = target.step(cfg, params, *_rows(seqs, T_STEP, pad), cache)
    return np.asarray(logits), cache


def prefill(cfg, params, seqs):
    _, cache, _ = target.prefill(cfg, params, *_rows(seqs, T_STEP, 0), target.init_cache(cfg, B, MAX_LEN))
    return cache


def test_fixtures_exercise_every_switch(loaded):
    cfg, _, g = loaded
    assert isinstance(cfg, Gemma4Config) and cfg.sliding_window == 4
    assert "sliding_attention" in cfg.layer_types and cfg.layer_types[-1] == "full_attention"
    assert cfg.global_head_dim != cfg.head_dim
    if cfg.enable_moe_block:  # the MoE / KV-sharing folder
        assert cfg.num_kv_shared_layers == 2 and cfg.use_double_wide_mlp and cfg.attention_k_eq_v
        assert cfg.global_kv_heads == 1 and not cfg.tie_word_embeddings
        assert cfg.full_rope.factor == 2.0 and cfg.final_logit_softcapping is None
        assert float(g["min_router_gap"]) > 1e-3
    else:  # the top-level `gemma4` folder
        assert cfg.hidden_size_per_layer_input == 8 and cfg.tie_word_embeddings
        assert cfg.full_rope.rope_type == "proportional" and cfg.final_logit_softcapping == 5.0
    assert float(g["min_greedy_margin"]) > 1e-3


def test_logits_match_reference_in_right_padded_batch(loaded):
    cfg, params, g = loaded
    logits, _ = full(cfg, params, golden_prompts(g))
    for i, n in enumerate(g["prompt_lengths"]):
        diff = float(jnp.abs(logits[i, :n] - g[f"logits_{i}"]).max())
        print(f"max |logit diff| prompt {i}: {diff:.2e}")
        assert diff <= TOL, diff


def test_layer_taps_are_raw_decoder_outputs(loaded):
    cfg, params, g = loaded
    prompt = golden_prompts(g)[0]
    _, taps = full(cfg, params, [prompt])
    n = len(prompt)
    hs = g["hidden_states_0"]  # index i+1 = output of layer i; the last one is normed by HF
    for layer in range(-1, cfg.num_hidden_layers - 1):
        assert float(jnp.abs(taps[layer + 1][0, :n] - hs[layer + 1]).max()) <= TOL, layer
    assert float(jnp.abs(taps[-1][0, :n] - g["last_layer_raw_0"]).max()) <= TOL
    np.testing.assert_allclose(np.asarray(target.embed(cfg, params, jnp.array([prompt]))[0]), hs[0],
                               atol=TOL, rtol=0)


def test_greedy_tokens_identical(loaded):
    cfg, params, g = loaded
    out = target.greedy_decode(cfg, params, golden_prompts(g), 32)
    assert out[0] == g["greedy_0"].tolist()
    assert out[1] == g["greedy_1"].tolist()


def test_chunked_cache_path_matches_reference(loaded):
    """Prefill 3 tokens, then verify-style chunks of 6 and 4: every chunk crosses the
    4-token window, and the logits still equal transformers' single pass."""
    cfg, params, g = loaded
    prompt = golden_prompts(g)[1]
    cache = prefill(cfg, params, [prompt[:3]])
    first, cache = step(cfg, params, [prompt[3:9]], cache, pad=7)
    second, cache = step(cfg, params, [prompt[9:13]], cache, pad=7)
    got = np.concatenate([first[0, :6], second[0, :4]])
    assert np.abs(got - g["logits_1"][3:]).max() <= TOL


def test_prefill_then_multi_token_steps_equal_full_forward(loaded):
    """Cache path (ragged prefill, then ragged multi-token steps with padding) == one pass."""
    cfg, params, _ = loaded
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (19, 11, 15)]
    prompt_lens = [5, 1, 8]
    cache = prefill(cfg, params, [s[:n] for s, n in zip(seqs, prompt_lens)])
    pos = list(prompt_lens)
    got = [[] for _ in seqs]
    for sizes in [[3, 0, 4], [1, 5, 3], [8, 3, 0], [2, 2, 0]]:
        rows = [seqs[b][pos[b]:pos[b] + n] for b, n in enumerate(sizes)]
        logits, cache = step(cfg, params, rows, cache, pad=int(rng.integers(0, cfg.vocab_size)))
        for b, n in enumerate(sizes):
            got[b].extend(logits[b, :n])
            pos[b] += n
    assert [int(x) for x in cache.lengths] == pos
    ref, _ = full(cfg, params, [s[:n] for s, n in zip(seqs, pos)])
    for b in range(len(seqs)):
        assert np.abs(np.stack(got[b]) - np.asarray(ref[b, prompt_lens[b]:pos[b]])).max() <= TOL


def test_rejected_drafts_are_overwritten(loaded):
    """What speculation does: verify 5 drafts, keep 2 via `cache.replace(lengths=...)`,
    continue; the result equals never having seen the rejected tokens."""
    cfg, params, _ = loaded
    seq = list(range(3, 20))
    cache = prefill(cfg, params, [seq[:6]])
    _, cache = step(cfg, params, [seq[6:8] + [1, 2, 3]], cache)
    cache = cache.replace(lengths=cache.lengths - jnp.array([3, 0, 0]))
    logits, cache = step(cfg, params, [seq[8:12]], cache)
    ref, _ = full(cfg, params, [seq[:12]])
    assert np.abs(logits[0, :4] - np.asarray(ref[0, 8:12])).max() <= TOL


def test_padding_slots_do_not_touch_cache(loaded):
    cfg, params, _ = loaded
    cache = prefill(cfg, params, [[1, 2, 3], [4, 5]])
    assert isinstance(cache, Gemma4Cache) and cache.lengths.dtype == jnp.int32
    before = jax.device_get(cache)
    a, ca = step(cfg, params, [[7], [1, 2]], jax.tree.map(jnp.asarray, before), pad=9)
    b, cb = step(cfg, params, [[7], [1, 2]], jax.tree.map(jnp.asarray, before), pad=200)
    np.testing.assert_array_equal(a[0, :1], b[0, :1])
    np.testing.assert_array_equal(a[1, :2], b[1, :2])
    for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_speculation_with_oracle_drafter_equals_greedy():
    """The engine drives the Gemma 4 cache (`.lengths`, `replace(lengths=...)`): with an
    oracle drafter wrong 30% of the time, verify steps of up to 5 tokens cross the
    4-token window and rejected drafts are rolled back; the output is still
    transformers' greedy continuation."""
    folder = os.path.join(FIXTURES, MOE_SHARED)
    cfg, params = target.load(folder)
    g = np.load(os.path.join(folder, "golden.npz"))
    prompts, new = golden_prompts(g), 20
    ref = [g["greedy_0"][:new].tolist(), g["greedy_1"][:new].tolist()]
    toks = np.zeros((2, 40), np.int32)
    for i, (p, r) in enumerate(zip(prompts, ref)):
        toks[i, :len(p + r)] = p + r
    corrupt = np.random.default_rng(0).random(toks.shape) < 0.3
    comps = generation.generate(cfg, params, prompts, max_new_tokens=new, sampling=SamplingParams.make(2),
                                seeds=range(2), drafter=OracleDrafter(4, cfg.vocab_size), gamma=4,
                                dparams={"ref": jnp.asarray(toks), "corrupt": jnp.asarray(corrupt)})
    assert [c.token_ids for c in comps] == ref
    assert max(c.tau for c in comps) > 2.0  # real multi-token acceptances happened


def test_sharded_4x2_prefill_equals_unsharded():
    """Parameters on their logical axes (experts replicated, heads / mlp / vocab split)
    and the cache on GEMMA4_CACHE_AXES: same logits as one device."""
    cfg, params = target.load(os.path.join(FIXTURES, MOE_SHARED))
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 8)), jnp.int32)
    lens = jnp.array([8, 3, 5, 1])
    ref, _, _ = target.prefill(cfg, params, toks, lens, target.init_cache(cfg, 4, 16))
    mesh = mesh_lib.make_mesh("4x2")
    cache = mesh_lib.shard_tree(target.init_cache(cfg, 4, 16), GEMMA4_CACHE_AXES, mesh)
    got, cache, _ = target.prefill(cfg, target.shard(cfg, params, mesh), toks, lens, cache)
    assert float(jnp.abs(got - ref).max()) <= TOL
    assert cache.sliding_k.sharding.spec[1] == "data"


# ----------------------------------------------------------------------- config reading

def _hf(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def test_legacy_global_head_fields_read_like_per_layer_config():
    """Hub files written before per_layer_config say global_head_dim /
    num_global_key_value_heads (the latter only counts with attention_k_eq_v)."""
    hf = _hf(MOE_SHARED)
    legacy = {k: v for k, v in hf.items() if k != "per_layer_config"}
    legacy.update(global_head_dim=16, num_global_key_value_heads=1)
    assert Gemma4Config.from_hf(legacy) == Gemma4Config.from_hf(hf)
    ignored = dict(legacy, attention_k_eq_v=False)
    assert Gemma4Config.from_hf(ignored).global_kv_heads == hf["num_key_value_heads"]
    wrapped = {"model_type": "gemma4", "text_config": hf, "tie_word_embeddings": False}
    assert Gemma4Config.from_hf(wrapped) == Gemma4Config.from_hf(hf)


def _text_bad(**changes):
    hf = copy.deepcopy(_hf(MOE_SHARED))
    hf.update(changes)
    return hf


BAD = [
    ({"model_type": "gemma4"}, "needs a text_config"),
    (_text_bad(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1.0}}),
     "rope_type 'yarn'"),
    (_text_bad(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1.0}}),
     "needs an entry for 'sliding_attention'"),
    (_text_bad(per_layer_config={"2": {"intermediate_size": 7}}), "intermediate_size of layer 2"),
    (_text_bad(use_bidirectional_attention="all"), "not a causal LM"),
    (_text_bad(num_experts=None), "enable_moe_block needs"),
    (_text_bad(num_attention_heads=3), "multiple of"),
    (_text_bad(hidden_activation="relu"), "hidden_activation 'relu'"),
    (_text_bad(layer_types=["sliding_attention"] * 3), "layer_types has 3 entries"),
    (_text_bad(sliding_window="wide"), "wrong type"),
    (_text_bad(num_kv_shared_layers=5), "needs an earlier layer"),
    ({k: v for k, v in _hf(MOE_SHARED).items() if k != "hidden_size"}, "missing field(s) hidden_size"),
]


@pytest.mark.parametrize("hf,match", BAD, ids=[m for _, m in BAD])
def test_bad_config_is_one_line_error(tmp_path, hf, match):
    with pytest.raises(DSparkError) as e:
        Gemma4Config.from_hf(hf, "config.json")
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DSparkError, match="config.json"):
        target.load(str(tmp_path))


def test_missing_tensor_is_one_line_error(tmp_path):
    hf = _hf(MOE_SHARED)
    hf["hidden_size_per_layer_input"] = 4  # asks for per-layer input tensors the file lacks
    (tmp_path / "config.json").write_text(json.dumps(hf))
    os.symlink(os.path.join(FIXTURES, MOE_SHARED, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(DSparkError, match=r"tensor model\.embed_tokens_per_layer\.weight is missing"):
        target.load(str(tmp_path))


def test_tiny_preset_builds_and_counts():
    cfg = gemma4_tiny()
    shapes, _ = target.param_shapes_and_axes(cfg)
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == cfg.num_params()
    assert hash(cfg) == hash(gemma4_tiny())


# ----------------------------------------------------------------------- full-size shape

def bytes_per_device(shapes, axes, mesh, rules=mesh_lib.SERVING_RULES):
    total = 0
    for shape, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=mesh_lib._is_axes)):
        spec = mesh_lib.logical_to_spec(ax, shape.shape, mesh, rules)
        split = math.prod(mesh.shape[a] for a in spec if a is not None)
        total += math.prod(shape.shape) * np.dtype(shape.dtype).itemsize // split
    return total


def test_gemma4_12b_eval_shape_sharded(record_property):
    cfg = gemma4_12b(dtype="bfloat16")
    shapes, axes = target.param_shapes_and_axes(cfg)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    assert n == cfg.num_params()
    assert abs(n / 1e9 - 11.91) < 0.02, n  # 11.96B in the model card includes vision/audio
    cache = jax.eval_shape(lambda: Gemma4Cache.init(cfg, 8, 8192))
    for spec in ("8x1", "4x2"):
        mesh = mesh_lib.make_mesh(spec)
        serve = bytes_per_device(shapes, axes, mesh)
        train = bytes_per_device(shapes, axes, mesh, mesh_lib.TRAINING_RULES)
        kv = bytes_per_device(cache, GEMMA4_CACHE_AXES, mesh)
        record_property(f"gemma4-12b_{spec}_serving_bytes_per_device", serve)
        print(f"gemma4-12b {spec}: params {n / 1e9:.3f}B, bf16 total {2 * n / 2**30:.2f} GiB, "
              f"serving {serve} B = {serve / 2**30:.2f} GiB/device, training (FSDP) "
              f"{train / 2**30:.2f} GiB/device, KV cache (8 x 8192) {kv / 2**30:.2f} GiB/device")
        if spec == "8x1":
            assert serve == 2 * n and train < 2 * n / 7
        else:
            assert serve < 2 * n * 0.51 + 2 * cfg.hidden_size * cfg.vocab_size
