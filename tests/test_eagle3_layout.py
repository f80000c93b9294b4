"""EAGLE-3 folders in the EAGLE / SpecForge layout (`LlamaForCausalLMEagle3`) load as
Eagle3 drafters as they are.

The fixtures were written with the EAGLE authors' own `cnets.Model`
(tests/fixtures/make_eagle3_folder.py): for a tiny random 8-layer Qwen3 target and a
tiny random 8-layer Llama 3 target, an EAGLE-3 drafter with a 96-token draft vocabulary
(d2t / t2d) and no layer ids, and golden.npz with EAGLE's first-round chain. The tests
read only those files, plus a 6-token pair built here for the sampling test.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import checkpoints, drafters, target
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.drafters import eagle3, eagle3_layout
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder
from dspark_jax.sampling import SamplingParams
from serve import generate
from tests.conftest import FIXTURES
from tests.test_speculation_distribution import chi_square_z, exact_joint, sampled_joint

FAMILIES = ("qwen3", "llama")
MAX_LEN = 64


def folders(family):
    return (os.path.join(FIXTURES, f"eagle3_{family}_target"), os.path.join(FIXTURES, f"eagle3_{family}_draft"))


DRAFT = folders("llama")[1]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(tcfg, tparams, drafter, dparams, golden) of each target family's fixtures."""
    tfolder, dfolder = folders(request.param)
    tcfg, tparams = target.load(tfolder)
    drafter, dparams = drafters.load(dfolder, tcfg, kind="eagle3")
    return tcfg, tparams, drafter, dparams, dict(np.load(os.path.join(dfolder, "golden.npz")))


@pytest.fixture(scope="module")
def llama_target():
    return target.load(folders("llama")[0])


def first_round(tcfg, tparams, drafter, dparams, golden, greedy=True):
    """(anchor, drafts [gamma], q [gamma, V]) of the first round on the golden prompt."""
    prompt = jnp.asarray(golden["prompt_ids"])[None]
    n = jnp.array([prompt.shape[1]], jnp.int32)
    cache = target.init_cache(tcfg, 1, MAX_LEN)
    last, cache, taps = target.prefill(tcfg, tparams, prompt, n, cache, drafter.tap_layers)
    anchor = jnp.argmax(last, axis=-1).astype(jnp.int32)
    follow = jnp.concatenate([prompt[:, 1:], anchor[:, None]], axis=1)
    dcache = drafter.ingest(dparams, tparams, drafter.init_cache(1, MAX_LEN), jnp.concatenate(taps, axis=-1),
                            follow, jnp.zeros((1,), jnp.int32), n)
    sp = SamplingParams.make(1) if greedy else SamplingParams.make(1, 1.0)
    drafts, q, _ = drafter.propose(dparams, tparams, dcache, anchor, n, sp, jax.random.split(jax.random.key(0), 1))
    return int(anchor[0]), np.asarray(drafts[0]), np.asarray(q[0])


def copy_with(tmp_path, src, edit=None, name="draft"):
    """A copy of a drafter folder whose config.json `edit` changes in place."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if edit is not None:
        with open(dst / "config.json") as f:
            hf = json.load(f)
        edit(hf)
        with open(dst / "config.json", "w") as f:
            json.dump(hf, f)
    return str(dst)


def with_tensors(tmp_path, change, name="draft"):
    """A copy of DRAFT whose tensors `change(dict)` edits in place."""
    folder = copy_with(tmp_path, DRAFT, name=name)
    index = open_folder(folder)
    tensors = {k: np.asarray(index[k]) for k in index}
    change(tensors)
    checkpoints.save_tensors(tensors, folder)
    return folder


def test_folder_loads_as_an_eagle3_drafter(family):
    tcfg, _, drafter, dparams, golden = family
    assert isinstance(drafter, eagle3_layout.EagleLayoutDrafter) and drafter.kind == "eagle3"
    assert drafter.tap_layers == (1, 3, 4)  # EAGLE's inputs of layers 2, L/2, L-3 of an 8-layer target
    assert drafter.gamma == 7 and drafter.draft_vocab == 96 and not drafter.own_embedding
    assert isinstance(drafter.cfg.arch, LlamaConfig) and dparams["lm_head"]["kernel"].shape == (32, 96)
    assert str(golden["eagle_revision"]) == eagle3_layout.EAGLE_REVISION


def test_first_round_drafts_equal_eagle(family):
    *four, golden = family
    anchor, drafts, _ = first_round(*four, golden)
    assert anchor == int(golden["anchor"])
    np.testing.assert_array_equal(drafts, golden["drafts"])


def test_full_vocabulary_distribution_is_the_scattered_reduced_one(family):
    """At T=1, q over the full vocabulary is softmax(reduced logits) at draft id + d2t, zero elsewhere."""
    tcfg, tparams, drafter, dparams, golden = family
    _, _, q = first_round(tcfg, tparams, drafter, dparams, golden, greedy=False)
    ids = np.arange(96) + np.asarray(dparams["d2t"])
    first = np.exp(golden["draft_logits"][0] - golden["draft_logits"][0].max())
    np.testing.assert_allclose(q[0, ids], first / first.sum(), atol=1e-5)
    outside = np.ones(tcfg.vocab_size, bool)
    outside[ids] = False
    assert (q[:, outside] == 0).all() and np.allclose(q.sum(-1), 1.0, atol=1e-5)


def test_a_wrong_mapping_breaks_the_drafts(family):
    """d2t permuted (the same set of ids, so t2d still agrees) or ignored: not EAGLE's drafts."""
    tcfg, tparams, drafter, dparams, golden = family
    d2t = np.asarray(dparams["d2t"])
    ids = np.arange(96) + d2t
    rolled = np.roll(ids, 1) - np.arange(96)
    for wrong in (rolled, np.zeros_like(d2t)):
        _, drafts, _ = first_round(tcfg, tparams, drafter, dict(dparams, d2t=jnp.asarray(wrong, jnp.int32)), golden)
        assert (drafts != golden["drafts"]).any()


def test_greedy_speculative_equals_plain_greedy(family):
    tcfg, tparams, drafter, dparams, golden = family
    prompts = [golden["prompt_ids"].tolist(), [9, 8, 7, 6, 5]]
    new = len(golden["greedy"])
    engine = Engine(tcfg, tparams, drafter, dparams, slots=2, max_len=MAX_LEN, policy="fixed", trace=True,
                    buckets=(2 * (1 + drafter.gamma),))  # the full budget only: the layout is under test
    ids = [engine.submit(p, max_new_tokens=new) for p in prompts]
    engine.run_until_done()
    results = [engine.result(i) for i in ids]
    assert [list(r.token_ids) for r in results] == target.greedy_decode(tcfg, tparams, prompts, new)
    assert list(results[0].token_ids) == golden["greedy"].tolist()  # transformers' greedy
    assert list(results[0].trace[0]["draft_tokens"]) == golden["drafts"].tolist()


def test_cli_loads_the_folder(capsys):
    tfolder, dfolder = folders("llama")
    golden = np.load(os.path.join(dfolder, "golden.npz"))
    generate.main(["--target", tfolder, "--draft", dfolder, "--drafter", "eagle3", "--temperature", "0", "--json",
                   "--trace", "--max-new-tokens", "8", "--prompt-ids", ",".join(str(t) for t in golden["prompt_ids"])])
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rec["token_ids"] == golden["greedy"][:8].tolist() and rec["drafter"] == "eagle3"
    assert rec["trace"][0]["draft_tokens"] == golden["drafts"].tolist()


# ------------------------------------------------- T > 0: a 6-token target, 4 draft ids

SP = (1.0, 0, 1.0)


def test_sampling_with_a_reduced_vocabulary_keeps_the_target_distribution():
    """Two of six tokens cannot be drafted (q = 0 there); the verifier's residual still
    gives the target's joint distribution of the first three tokens."""
    tcfg = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    tparams = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, target.init_params(tcfg, jax.random.key(7)))
    cfg = eagle3.Eagle3Config(arch=tcfg.replace(num_hidden_layers=1), target_layer_ids=(-1, 0, 0), block_size=2)
    drafter = eagle3_layout.EagleLayoutDrafter(cfg=cfg, tcfg=tcfg, gamma=2, draft_vocab=4, own_embedding=False)
    dparams = eagle3.init_eagle3_params(drafter, jax.random.key(3))
    dparams = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, dparams)
    dparams["d2t"] = jnp.array([0, 1, 1, 2], jnp.int32)  # draft ids 0..3 -> tokens 0, 2, 3, 5
    counts, rounds = sampled_joint(tcfg, tparams, drafter, dparams, SP)
    assert 4 * counts.sum() / rounds > 1.05  # 4 tokens per sequence: some drafts accepted
    assert counts[1].sum() > 0 and counts[4].sum() > 0  # undraftable tokens still come out
    z = chi_square_z(counts, exact_joint(tcfg, tparams, SP))
    assert z < 4.0, f"speculative samples deviate from the target distribution (z={z:.2f})"


# ------------------------------------------------- config, switches, maps, layout mix-ups

def test_default_taps_follow_eagle_and_sglang(llama_target, tmp_path):
    assert eagle3_layout.default_taps(32) == (1, 15, 28)  # Llama-3.1-8B: inputs of layers 2, 16, 29
    folder = copy_with(tmp_path, DRAFT, lambda hf: hf.update(eagle_config={"eagle_aux_hidden_state_layer_ids":
                                                                           [0, 2, 5]}))
    assert drafters.load(folder, llama_target[0])[0].tap_layers == (0, 2, 5)  # SGLang's reading: layer k's output


@pytest.mark.parametrize("field,value", [
    ("norm_before_residual", True), ("fc_norm", True), ("target_hidden_size", 64), ("num_hidden_layers", 2),
    ("eagle_config.use_aux_hidden_state", False), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("mlp_bias", True),
])
def test_unsupported_switches_are_refused_by_name(llama_target, tmp_path, field, value):
    def edit(hf):
        node, key = (hf.setdefault("eagle_config", {}), field.split(".")[1]) if "." in field else (hf, field)
        node[key] = value

    with pytest.raises(DSparkError) as e:
        drafters.load(copy_with(tmp_path, DRAFT, edit), llama_target[0])
    msg = str(e.value)
    assert (field.split(".")[-1] in msg or "yarn" in msg) and len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize("field,value", [("norm_before_residual", False), ("fc_norm", False),
                                         ("target_hidden_size", 32)])
def test_neutral_switch_values_load(llama_target, tmp_path, field, value):
    drafter, _ = drafters.load(copy_with(tmp_path, DRAFT, lambda hf: hf.update({field: value})), llama_target[0])
    assert drafter.gamma == 7


def test_the_folders_own_embedding_is_used_when_present(llama_target, tmp_path):
    tcfg, tparams = llama_target
    embed = np.asarray(tparams["embed_tokens"]["embedding"])
    folder = with_tensors(tmp_path, lambda t: t.update({"embed_tokens.weight": embed}))
    drafter, dparams = drafters.load(folder, tcfg)
    assert drafter.own_embedding
    golden = dict(np.load(os.path.join(DRAFT, "golden.npz")))
    np.testing.assert_array_equal(first_round(tcfg, tparams, drafter, dparams, golden)[1], golden["drafts"])


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update(d2t=np.zeros_like(t["d2t"])), "t2d does not mark exactly"),
    (lambda t: t.update(d2t=t["d2t"] + 1000), "d2t does not map the 96 draft ids to distinct ids"),
    (lambda t: t.update(d2t=t["d2t"][:50]), r"d2t has shape \[50\]"),
    (lambda t: t.pop("d2t"), "tensor d2t is missing"),
])
def test_inconsistent_maps_are_refused(llama_target, tmp_path, change, match):
    with pytest.raises(DSparkError, match=match):
        drafters.load(with_tensors(tmp_path, change), llama_target[0])


def test_an_eagle3_folder_given_as_another_layout_names_it(llama_target, tmp_path):
    for i, arch in enumerate(("Qwen3Eagle3Model", "LlamaForCausalLM", "DFlashDraftModel")):
        folder = copy_with(tmp_path, DRAFT, lambda hf: hf.update(architectures=[arch]), f"as_{i}")
        with pytest.raises(DSparkError, match=r"looks like an? EAGLE-3 folder") as e:
            drafters.load(folder, llama_target[0])
        assert len(str(e.value).splitlines()) == 1


def test_other_layouts_given_as_eagle3_name_theirs(llama_target, tmp_path):
    zlab_dir = os.path.join(FIXTURES, "zlab_dflash_llama_b16")
    folder = copy_with(tmp_path, zlab_dir, lambda hf: hf.update(architectures=[eagle3_layout.ARCH]), "zlab")
    with pytest.raises(DSparkError, match="looks like a z-lab DFlash folder .* says \\['LlamaForCausalLMEagle3'\\]"):
        drafters.load(folder, llama_target[0])

    def deepspec(hf):
        hf.pop("draft_vocab_size")
        hf.update(ttt_length=7, target_layer_ids=[1, 3, 4])

    with pytest.raises(DSparkError, match="looks like a DeepSpec Eagle3 folder"):
        drafters.load(copy_with(tmp_path, DRAFT, deepspec, "deepspec"), llama_target[0])


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_eagle3_folder_under_another_kind_is_one_line(capsys, kind):
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", folders("llama")[0], "--prompt-ids", "1,2", "--draft", DRAFT, "--drafter", kind])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "holds an eagle3 drafter (EAGLE-3 layout)" in err and len(err.splitlines()) == 1, err


def test_gamma_and_mtp1(llama_target):
    assert drafters.load(DRAFT, llama_target[0], gamma=3)[0].gamma == 3
    assert drafters.load(DRAFT, llama_target[0], kind="mtp1")[0].gamma == 1
    with pytest.raises(DSparkError, match="gamma 8 exceeds"):
        drafters.load(DRAFT, llama_target[0], gamma=8)


def test_a_gemma4_target_is_refused():
    gcfg, _ = target.load(os.path.join(FIXTURES, "gemma4_tiny"))
    with pytest.raises(DSparkError, match="supported for Qwen3 and Llama 3 targets"):
        drafters.load(DRAFT, gcfg)
