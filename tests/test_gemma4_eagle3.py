"""Gemma 4 Eagle3 drafter: DeepSpec folders in and out, cached chain drafting, lossless
speculation.

Both tiny Gemma 4 fixtures (PLE + soft-cap + tied; MoE + KV sharing + K = V + untied):
random drafters round-trip through `drafters.load` and speculative greedy output equals
plain greedy (random per-request depth limits); at a high temperature the same drafters get deep
drafts accepted. On a 6-token Gemma 4 target a random drafter's greedy drafts are often
right, so rounds there commit several tokens; the temperature-1 / top-p 0.9 sampler keeps
that target's distribution, and a drafter that misreports its q fails the same test.
The CLI agrees with plain decoding; misfit or malformed folders are refused on one line.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dspark_jax import checkpoints, drafters, generation, sampling, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.config_gemma4 import FULL, SLIDING, gemma4_tiny
from dspark_jax.drafters import gemma4_eagle3 as ge
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder, save_file
from serve import generate
from tests.conftest import FIXTURES
from tests.test_gemma4_drafters import PROMPT, V, exact_joint, fill, joint_counts, random_depths, records
from tests.test_speculation_distribution import chi_square_z

TINY = os.path.join(FIXTURES, "gemma4_tiny")
MOE = os.path.join(FIXTURES, "gemma4_tiny_moe_shared")
QWEN = os.path.join(FIXTURES, "qwen3_tiny_untied")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
NEW = 16
GAMMA = 4
# per fixture: draft layers and tapped target layers (-1: the scaled embeddings)
SHAPES = {TINY: dict(layers=2, taps=(-1, 2, 4)), MOE: dict(layers=1, taps=(0, 3))}
MESH = mesh_lib.make_mesh("1x1")


def make_drafter(tcfg, *, layers=1, taps=(0,), block_size=GAMMA, scale=1.0, seed=1):
    cfg = ge.new_config(tcfg, num_layers=layers, target_layer_ids=taps, block_size=block_size)
    drafter = ge.Gemma4Eagle3Drafter(cfg=cfg, tcfg=tcfg, gamma=block_size)
    return drafter, fill(drafter.param_shapes_and_axes()[0], seed, scale)


def run(tcfg, tparams, prompts=PROMPTS, drafter=None, dparams=None, temperature=0.0, **kw):
    comps = generation.generate(tcfg, tparams, prompts, max_new_tokens=NEW,
                                sampling=sampling.SamplingParams.make(len(prompts), temperature),
                                seeds=range(len(prompts)), drafter=drafter, dparams=dparams, **kw)
    return [c.token_ids for c in comps], comps


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per fixture: target (placed as serve.generate places it), plain greedy, a saved drafter."""
    root = tmp_path_factory.mktemp("gemma4_eagle3")
    out = {}
    for seed, folder in enumerate((TINY, MOE)):
        tcfg, tparams = target.load(folder)
        tparams = target.shard(tcfg, tparams, MESH)
        drafter, dparams = make_drafter(tcfg, seed=seed + 1, **SHAPES[folder])
        path = str(root / os.path.basename(folder))
        ge.save_gemma4_eagle3(path, drafter, dparams, checkpoints.read_config(folder), tparams)
        out[folder] = (tcfg, tparams, run(tcfg, tparams)[0], (drafter, dparams, path))
    return out


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("folder", [TINY, MOE], ids=["tiny", "moe_shared"])
def test_save_load_round_trip(pairs, folder):
    tcfg, tparams, _, (drafter, dparams, path) = pairs[folder]
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["Gemma4Eagle3Model"] and hf["model_type"] == "gemma4_text"
    assert "text_config" not in hf and hf["tie_word_embeddings"] is False
    layers, taps = SHAPES[folder]["layers"], SHAPES[folder]["taps"]
    assert (hf["num_hidden_layers"], hf["num_target_layers"], hf["target_layer_ids"]) == (layers, 6, list(taps))
    assert (hf["ttt_length"], hf["step_loss_decay"], hf["block_size"]) == (7, 0.8, GAMMA)
    index = open_folder(path)
    d, heads, dh = tcfg.hidden_size, tcfg.num_attention_heads, tcfg.global_head_dim
    assert index["fc.weight"].shape == (d, len(taps) * d)
    assert index["layers.0.self_attn.q_proj.weight"].shape == (heads * dh, 2 * d)  # [norm(e); norm(g)]
    assert index["layers.0.self_attn.k_proj.weight"].shape == (tcfg.global_kv_heads * dh, 2 * d)
    assert ("layers.0.self_attn.v_proj.weight" in index) == (not tcfg.attention_k_eq_v)
    for name in ("hidden_norm", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        assert f"layers.0.{name}.weight" in index, name
    assert "layers.0.layer_scalar" in index and "norm.weight" in index
    # copies of the target's embedding and head for other engines; ours reads the target's
    embed = np.asarray(tparams["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(index["embed_tokens.weight"], embed)
    head = embed if tcfg.tie_word_embeddings else np.asarray(tparams["lm_head"]["kernel"]).T
    np.testing.assert_array_equal(index["lm_head.weight"], head)
    assert "embed_tokens" not in dparams and "lm_head" not in dparams

    loaded, lparams = drafters.load(path, tcfg)
    assert type(loaded) is ge.Gemma4Eagle3Drafter and loaded.kind == "eagle3"
    assert loaded == drafter and hash(loaded) == hash(drafter) and loaded.gamma == GAMMA
    a, b = _flat(dparams), _flat(lparams)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert drafters.load(path, tcfg, kind="eagle3", gamma=2)[0].gamma == 2
    assert drafters.load(path, tcfg, kind="mtp1")[0].gamma == 1


def test_checkpoint_without_layer_scalars_loads_ones(pairs, tmp_path):
    tcfg, _, _, (_, _, path) = pairs[TINY]
    folder = shutil.copytree(path, tmp_path / "no_scalar")
    index = open_folder(str(folder))
    save_file({n: np.asarray(index[n]) for n in index if not n.endswith("layer_scalar")},
              str(folder / "model.safetensors"))
    _, params = drafters.load(str(folder), tcfg)
    for i in range(SHAPES[TINY]["layers"]):
        np.testing.assert_array_equal(params[f"layers_{i}"]["layer_scalar"], np.ones((1,), np.float32))


def test_ingest_then_propose_matches_uncached_chain(pairs):
    """Ragged two-chunk ingestion and cached chain drafting agree with re-running the whole
    sequence (context features, then the drafter's own outputs) for every drafted token."""
    tcfg, tparams, _, (drafter, params, _) = pairs[TINY]
    mod, d, g = drafter.module, tcfg.hidden_size, drafter.gamma
    b, width, m = 3, 9, len(drafter.tap_layers)
    lengths = np.array([5, 9, 3])
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(b, width, m * d)), jnp.float32)
    nxt = jnp.asarray(rng.integers(0, tcfg.vocab_size, size=(b, width)), jnp.int32)

    ingest = jax.jit(drafter.ingest)
    cache = drafter.init_cache(b, 32)
    c1 = jnp.array([3, 6, 0], jnp.int32)  # row 2 ingests nothing in the first chunk
    cache = ingest(params, tparams, cache, feats[:, :6], nxt[:, :6], jnp.zeros(b, jnp.int32), c1)
    idx = jnp.asarray(np.minimum(np.asarray(c1)[:, None] + np.arange(4)[None], width - 1))
    cache = ingest(params, tparams, cache, jnp.take_along_axis(feats, idx[..., None], axis=1),
                   jnp.take_along_axis(nxt, idx, axis=1), c1, jnp.asarray(lengths) - c1)
    np.testing.assert_array_equal(cache.kv.lengths, lengths)

    temps = [0.0, 1.0, 0.7]
    keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
    draft, q, conf = jax.jit(drafter.propose)(params, tparams, cache, nxt[:, 0], cache.kv.lengths,
                                              sampling.SamplingParams.make(b, temps), keys)
    assert draft.shape == (b, g) and q.shape == (b, g, tcfg.vocab_size) and not np.asarray(conf).any()

    wide = width + g
    v = {"params": params}

    @jax.jit
    def ref_step(gs, toks, n, sp):
        pos = jnp.arange(wide, dtype=jnp.int32)[None]
        emb = target.embed(tcfg, tparams, toks)  # the target's sqrt(d)-scaled embeddings
        h, _ = mod.apply(v, gs, emb, pos, pos < n, method="decode_embedded")
        last = h[:, n - 1]
        logits = target.logits(tcfg, tparams, mod.apply(v, last, method="final_norm"))
        return last, logits[0], sampling.warp(logits, sp)[0]

    cap = tcfg.final_logit_softcapping
    for r in range(b):
        n = int(lengths[r])
        gs = jnp.zeros((1, wide, d)).at[:, :n].set(mod.apply(v, feats[r:r + 1, :n], method="project"))
        toks = jnp.zeros((1, wide), jnp.int32).at[:, :n].set(nxt[r:r + 1, :n])
        for k in range(g):
            last, logits, q_ref = ref_step(gs, toks, n, sampling.SamplingParams.make(1, temps[r]))
            assert float(jnp.max(jnp.abs(logits))) < cap  # soft-capped as the target's
            np.testing.assert_allclose(q[r, k], q_ref, atol=2e-5, err_msg=f"row {r} step {k}")
            x = int(draft[r, k])
            assert q_ref[x] > 0 and (temps[r] > 0 or x == int(jnp.argmax(q_ref)))
            gs, toks, n = gs.at[:, n].set(last), toks.at[:, n].set(x), n + 1


@pytest.mark.parametrize("folder", [TINY, MOE], ids=["tiny", "moe_shared"])
def test_random_drafter_equals_greedy(pairs, folder):
    tcfg, tparams, ref, (_, _, path) = pairs[folder]
    drafter, dparams = drafters.load(path, tcfg)
    dparams = drafter.shard(dparams, MESH)
    got, comps = run(tcfg, tparams, drafter=drafter, dparams=dparams, max_depths=random_depths(GAMMA, 0))
    assert got == ref and all(c.rounds >= 1 for c in comps)
    # at a high temperature both (soft-capped) distributions are flat: deep drafts get
    # accepted, so the drafter ingests multi-token rounds and drafts past them (same compilation)
    _, comps = run(tcfg, tparams, drafter=drafter, dparams=dparams, temperature=3.0)
    assert sum(c.accepted_per_position[-1] for c in comps) > 0, [c.accepted_per_position for c in comps]
    assert all(len(c.token_ids) == NEW and c.rounds < NEW - 1 for c in comps)


def test_shard_places_params_on_mesh(pairs):
    _, _, _, (drafter, params, _) = pairs[TINY]
    sharded = drafter.shard(params, mesh_lib.make_mesh("2x2"))
    attn = sharded["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].sharding.spec == PartitionSpec(None, "model", None)  # heads
    assert sharded["fc"]["kernel"].sharding.spec == PartitionSpec("model", None)
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], params["layers_0"]["self_attn"]["q_proj"]["kernel"])


# ------------------------------------------------- a 6-token target: deep acceptances

SP = (1.0, 0, 0.9)  # temperature 1, top-p 0.9


@pytest.fixture(scope="module")
def small():
    """A 6-token target, a drafter for the sampling tests, and the exact P(t1, t2, t3)."""
    tcfg = gemma4_tiny(vocab_size=V, num_hidden_layers=3, layer_types=(SLIDING, FULL, FULL), num_kv_shared_layers=1)
    tparams = fill(target.param_shapes_and_axes(tcfg)[0], 7, scale=12.0)  # peaked, varied p
    drafter, dparams = make_drafter(tcfg, taps=(0,), block_size=2, scale=12.0, seed=3)
    return tcfg, tparams, drafter, dparams, exact_joint(tcfg, tparams, SP)


def test_small_vocab_greedy_with_deep_acceptances(small):
    tcfg, tparams = small[:2]
    drafter, dparams = make_drafter(tcfg, taps=(-1, 0), block_size=3, scale=12.0, seed=0)
    prompts = [PROMPT, [3, 1], [0, 2, 4, 1, 3, 5, 2, 2, 1]]
    ref, _ = run(tcfg, tparams, prompts)
    for limits in ([3] * len(prompts), random_depths(3, 0, len(prompts))):
        got, comps = run(tcfg, tparams, prompts, drafter, dparams, max_depths=limits)
        assert got == ref
        # some rounds accepted the whole draft they verified (all `limit` drafts)
        assert sum(c.accepted_per_position[k - 1] for c, k in zip(comps, limits) if k > 0) > 0, \
            [c.accepted_per_position for c in comps]


def test_sampling_matches_target_distribution(small):
    tcfg, tparams, drafter, dparams, probs = small
    counts, tau = joint_counts(tcfg, tparams, drafter, dparams, SP)
    assert 1.05 < tau < 2.95, tau  # some drafts accepted, some rejected
    z = chi_square_z(counts, probs)
    assert z < 4.0, f"speculative samples deviate from the target distribution (z={z:.2f})"


@dataclasses.dataclass(frozen=True)
class MisreportingDrafter(ge.Gemma4Eagle3Drafter):
    """WRONG on purpose: drafts from q but reports q^2 (renormalised) to the verifier."""

    def propose(self, *args):
        draft, q, conf = super().propose(*args)
        q2 = q * q
        return draft, q2 / q2.sum(-1, keepdims=True), conf


@pytest.mark.slow
def test_misreporting_drafter_fails_the_same_test(small):
    tcfg, tparams, drafter, dparams, probs = small
    wrong = MisreportingDrafter(cfg=drafter.cfg, tcfg=tcfg, gamma=drafter.gamma)
    counts, _ = joint_counts(tcfg, tparams, wrong, dparams, SP)
    z = chi_square_z(counts, probs)
    assert z > 10.0, f"the misreporting drafter was not detected (z={z:.2f})"


# --------------------------------------------------------------------------------- CLI

def test_cli_json_equals_plain(capsys, pairs):
    common = ["--target", TINY, "--temperature", "0", "--json", "--max-new-tokens", str(NEW)]
    for p in PROMPTS:
        common += ["--prompt-ids", ",".join(map(str, p))]
    plain = records(capsys, *common, "--drafter", "none")
    spec = records(capsys, *common, "--draft", pairs[TINY][3][2])
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain] == pairs[TINY][2]
    assert all(r["gamma"] == GAMMA and r["rounds"] >= 1 for r in spec)


def _edited(src, dst, drop=(), **changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        hf = json.load(f)
    hf.update(changes)
    for key in drop:
        hf.pop(key)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(dst)


def test_misfit_and_malformed_folders_refused(capsys, pairs, tmp_path):
    tcfg, _, _, (_, _, path) = pairs[TINY]
    no_fc = shutil.copytree(path, tmp_path / "no_fc")
    index = open_folder(str(no_fc))
    save_file({n: np.asarray(index[n]) for n in index if n != "fc.weight"}, str(no_fc / "model.safetensors"))
    cases = [
        (target.load(QWEN)[0], path, {}, "a Gemma 4 drafter needs a Gemma 4 target"),
        (tcfg, _edited(path, tmp_path / "taps", target_layer_ids=[0, 5]), {}, "do not fit a 6-layer target"),
        (tcfg, _edited(path, tmp_path / "layers", num_target_layers=8), {}, "trained for a 8-layer target"),
        (tcfg, _edited(path, tmp_path / "vocab", vocab_size=300), {}, "vocab_size 300 does not match"),
        (tcfg, _edited(path, tmp_path / "no_taps", drop=("target_layer_ids",)), {}, "missing field target_layer_ids"),
        (tcfg, _edited(path, tmp_path / "ttt", ttt_length="seven"), {}, "a field has the wrong type"),
        (tcfg, _edited(path, tmp_path / "qwen", architectures=["Qwen3Eagle3Model"]), {}, "not ['Gemma4Eagle3Model']"),
        (tcfg, str(no_fc), {}, "tensor fc.weight is missing"),
        (tcfg, path, dict(gamma=GAMMA + 1), "exceeds the drafter's block size"),
        (tcfg, path, dict(kind="dspark"), "holds a eagle3 drafter"),
    ]
    for cfg, folder, kw, needle in cases:
        with pytest.raises(DSparkError) as e:
            drafters.load(folder, cfg, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    # and through the CLI: exit status 2 with one line on stderr
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", TINY, "--draft", str(tmp_path / "taps"), "--prompt-ids", "1,2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "do not fit a 6-layer target" in err and len(err.splitlines()) == 1, err
