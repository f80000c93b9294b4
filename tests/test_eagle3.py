"""Eagle3 chain drafter: checkpoint round trip, lossless greedy generation, cached chain
drafting against an uncached reference, and one-line errors for misfit folders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dspark_jax import checkpoints, generation, target
from dspark_jax.drafters.eagle3 import (Eagle3Config, Eagle3Drafter, init_eagle3_params,
                                        load_eagle3, save_eagle3)
from dspark_jax.errors import DSparkError
from dspark_jax.mesh import make_mesh
from dspark_jax.safetensors_io import open_folder, save_file
from dspark_jax.sampling import SamplingParams, warp
from tests.conftest import FIXTURES

UNTIED = os.path.join(FIXTURES, "qwen3_tiny_untied")
GAMMA = 3
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 100, 200, 300, 400, 50, 60, 70, 80], list(range(30, 47))]


@pytest.fixture(scope="module")
def tgt():
    return target.load(UNTIED)


@pytest.fixture(scope="module")
def eagle(tgt):
    tcfg, tparams = tgt
    cfg = Eagle3Config(arch=tcfg.replace(num_hidden_layers=1), target_layer_ids=(0, 1))
    drafter = Eagle3Drafter(cfg=cfg, tcfg=tcfg, gamma=GAMMA)
    params = init_eagle3_params(drafter, jax.random.key(7))
    params["embed_tokens"] = {"embedding": jnp.asarray(tparams["embed_tokens"]["embedding"])}
    params["lm_head"] = {"kernel": jnp.asarray(tparams["lm_head"]["kernel"])}
    return drafter, params


@pytest.fixture
def saved(eagle, tmp_path):
    drafter, params = eagle
    folder = str(tmp_path / "eagle3")
    save_eagle3(folder, drafter, params, checkpoints.read_config(UNTIED))
    return folder


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_save_load_round_trip(tgt, eagle, saved):
    tcfg, _ = tgt
    drafter, params = eagle
    with open(os.path.join(saved, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["Qwen3Eagle3Model"] and hf["model_type"] == "qwen3"
    assert (hf["num_hidden_layers"], hf["num_target_layers"], hf["target_layer_ids"]) == (1, 3, [0, 1])
    assert hf["layer_types"] == ["full_attention"] and hf["tie_word_embeddings"] is False
    assert (hf["block_size"], hf["ttt_length"], hf["step_loss_decay"]) == (7, 7, 0.8)
    assert "fc.weight" in open_folder(saved) and "layers.0.hidden_norm.weight" in open_folder(saved)
    assert open_folder(saved)["layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 2 * 64)
    loaded, lparams = load_eagle3(saved, tcfg, gamma=GAMMA)
    assert loaded == drafter and hash(loaded) == hash(drafter)
    assert load_eagle3(saved, tcfg)[0].gamma == 7  # default: block_size
    a, b = _flat(params), _flat(lparams)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_qk_norms_load_as_ones(tgt, saved):
    index = open_folder(saved)
    kept = {n: np.asarray(index[n]) for n in index if "q_norm" not in n and "k_norm" not in n}
    assert len(kept) == len(index) - 2
    save_file(kept, os.path.join(saved, "model.safetensors"))
    _, params = load_eagle3(saved, tgt[0], gamma=GAMMA)
    attn = params["layers_0"]["self_attn"]
    np.testing.assert_array_equal(attn["q_norm"]["weight"], np.ones(32, np.float32))
    np.testing.assert_array_equal(attn["k_norm"]["weight"], np.ones(32, np.float32))


@pytest.mark.parametrize("change, words", [
    ({"vocab_size": 1024}, ["vocab_size", "1024", "512"]),
    ({"hidden_size": 128}, ["hidden_size", "128", "64"]),
    ({"target_layer_ids": [0, 2]}, ["target_layer_ids", "-1..1"]),
    ({"architectures": ["Qwen3ForCausalLM"]}, ["architectures", "Eagle3"]),
    ({"target_layer_ids": None}, ["target_layer_ids"]),
])
def test_bad_config_is_refused(tgt, saved, change, words):
    path = os.path.join(saved, "config.json")
    with open(path) as f:
        hf = json.load(f)
    for k, v in change.items():
        hf.pop(k) if v is None else hf.__setitem__(k, v)
    with open(path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(DSparkError) as e:
        load_eagle3(saved, tgt[0])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("gamma, words", [(8, ["gamma", "block size"]), (0, ["gamma", ">= 1"])])
def test_bad_gamma_is_refused(tgt, saved, gamma, words):
    with pytest.raises(DSparkError) as e:
        load_eagle3(saved, tgt[0], gamma=gamma)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_ingest_then_propose_matches_uncached_chain(eagle):
    drafter, params = eagle
    mod = drafter.module
    d, b, width, g = 64, 3, 9, drafter.gamma
    lengths = np.array([5, 9, 3])
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(b, width, 2 * d)), jnp.float32)
    nxt = jnp.asarray(rng.integers(0, 512, size=(b, width)), jnp.int32)

    # ingest in two ragged chunks (row 2 ingests nothing in the first one)
    ingest = jax.jit(drafter.ingest)
    cache = drafter.init_cache(b, 32)
    c1 = jnp.array([3, 6, 0], jnp.int32)
    cache = ingest(params, None, cache, feats[:, :6], nxt[:, :6], jnp.zeros(b, jnp.int32), c1)
    idx = np.minimum(np.asarray(c1)[:, None] + np.arange(4)[None], width - 1)
    f2 = jnp.take_along_axis(feats, jnp.asarray(idx)[..., None], axis=1)
    n2 = jnp.take_along_axis(nxt, jnp.asarray(idx), axis=1)
    cache = ingest(params, None, cache, f2, n2, c1, jnp.asarray(lengths) - c1)
    np.testing.assert_array_equal(cache.kv.lengths, lengths)

    temps = [0.0, 1.0, 0.7]
    sampling = SamplingParams.make(b, temps)
    keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
    draft, q, conf = jax.jit(drafter.propose)(params, None, cache, nxt[:, 0], cache.kv.lengths,
                                              sampling, keys)
    assert draft.shape == (b, g) and draft.dtype == jnp.int32
    assert q.shape == (b, g, 512) and conf.shape == (b, g) and not np.asarray(conf).any()

    # uncached reference: the whole sequence of features (context fc(feats), then the
    # drafter's own outputs) re-run from position 0 for every drafted token
    wide = width + g

    @jax.jit
    def ref_step(gs, toks, n, sp):
        pos = jnp.arange(wide, dtype=jnp.int32)[None]
        h, _ = mod.apply({"params": params}, gs, toks, pos, pos < n, method="decode")
        last = h[:, n - 1]
        return last, warp(mod.apply({"params": params}, last, method="logits"), sp)[0]

    for r in range(b):
        n = int(lengths[r])
        gs = jnp.zeros((1, wide, d)).at[:, :n].set(
            mod.apply({"params": params}, feats[r:r + 1, :n], method="project"))
        toks = jnp.zeros((1, wide), jnp.int32).at[:, :n].set(nxt[r:r + 1, :n])
        for k in range(g):
            last, q_ref = ref_step(gs, toks, n, SamplingParams.make(1, temps[r]))
            np.testing.assert_allclose(q[r, k], q_ref, atol=2e-5, err_msg=f"row {r} step {k}")
            x = int(draft[r, k])
            assert q_ref[x] > 0
            if temps[r] == 0:
                assert x == int(jnp.argmax(q_ref))
            gs, toks, n = gs.at[:, n].set(last), toks.at[:, n].set(x), n + 1


def test_greedy_generation_is_lossless(tgt, eagle):
    tcfg, tparams = tgt
    drafter, params = eagle
    prompts = PROMPTS
    kw = dict(max_new_tokens=24, sampling=SamplingParams.make(3, 0.0), seeds=[0, 1, 2])
    plain = generation.generate(tcfg, tparams, prompts, **kw)
    ref = [c.token_ids for c in plain]
    assert all(len(t) == 24 for t in ref)
    for depth in (None, 1, 0):
        out = generation.generate(tcfg, tparams, prompts, drafter=drafter, dparams=params,
                                  gamma=drafter.gamma, verify_depth=depth, **kw)
        assert [c.token_ids for c in out] == ref, depth
        assert all(c.rounds > 0 and c.tau >= 1 for c in out)


def test_sampled_generation_accepts_deep_drafts(tgt, eagle):
    """At a high temperature even a random drafter is often accepted: rounds commit several
    tokens, so the drafter ingests multi-token rounds and drafts past accepted tokens."""
    tcfg, tparams = tgt
    drafter, params = eagle
    out = generation.generate(tcfg, tparams, PROMPTS, max_new_tokens=24,
                              sampling=SamplingParams.make(3, 3.0), seeds=[0, 1, 2],
                              drafter=drafter, dparams=params, gamma=drafter.gamma)
    for c in out:
        assert len(c.token_ids) == 24 and all(0 <= t < 512 for t in c.token_ids)
        assert c.rounds < 23 and c.accepted_per_position[1] > 0, c.accepted_per_position
    # whole drafts accepted (the engine verifies no draft past max_new_tokens, so a last
    # round's drafts count only where there is room for them)
    assert sum(c.accepted_per_position[-1] for c in out) > 0, [c.accepted_per_position for c in out]


def test_shard_places_params_on_mesh(eagle):
    drafter, params = eagle
    sharded = drafter.shard(params, make_mesh("2x2"))
    assert sharded["lm_head"]["kernel"].sharding.spec == PartitionSpec(None, "model")
    assert sharded["fc"]["kernel"].sharding.spec == PartitionSpec("model", None)
    np.testing.assert_array_equal(sharded["fc"]["kernel"], params["fc"]["kernel"])
