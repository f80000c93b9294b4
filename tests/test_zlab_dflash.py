"""z-lab DFlash folders (`DFlashDraftModel`) load as DFlash drafters as they are.

The fixtures were written by z-lab's own code (tests/fixtures/make_zlab_dflash.py):
a tiny random Qwen3 target this project had not seen, a DFlash drafter for it saved by
z-lab's `DFlashDraftModel`, and golden.npz with z-lab's first-block proposal and
transformers' greedy continuation. The tests read only those files.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import drafters, target
from dspark_jax.drafters import zlab
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams
from serve import generate
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter, write_block_drafter

TARGET = os.path.join(FIXTURES, "zlab_dflash_target")
DRAFT = os.path.join(FIXTURES, "zlab_dflash_b16")
GOLDEN = np.load(os.path.join(DRAFT, "golden.npz"))
# family -> (target folder, z-lab drafter folder); the Llama 3 target uses llama3 RoPE scaling
FAMILIES = {"qwen3": (TARGET, DRAFT),
            "llama": (os.path.join(FIXTURES, "zlab_dflash_llama_target"),
                      os.path.join(FIXTURES, "zlab_dflash_llama_b16"))}
MAX_LEN = 64


def load_pair(family):
    tfolder, dfolder = FAMILIES[family]
    tcfg, tparams = target.load(tfolder)
    drafter, dparams = drafters.load(dfolder, tcfg, kind="dflash")
    return tcfg, tparams, drafter, dparams, dict(np.load(os.path.join(dfolder, "golden.npz")))


@pytest.fixture(scope="module")
def pair():
    return load_pair("qwen3")[:4]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(tcfg, tparams, drafter, dparams, golden) of each target family's fixtures."""
    return load_pair(request.param)


def first_round(tcfg, tparams, drafter, dparams, golden=GOLDEN):
    """(anchor, drafts [gamma], draft logits [gamma, V]) of the first round on the golden
    prompt: prefill, the context ingested, one proposal."""
    prompt = jnp.asarray(golden["prompt_ids"])[None]
    n = jnp.array([prompt.shape[1]], jnp.int32)
    cache = target.init_cache(tcfg, 1, MAX_LEN)
    last, cache, taps = target.prefill(tcfg, tparams, prompt, n, cache, drafter.tap_layers)
    anchor = jnp.argmax(last, axis=-1).astype(jnp.int32)
    follow = jnp.concatenate([prompt[:, 1:], anchor[:, None]], axis=1)
    dcache = drafter.ingest(dparams, tparams, drafter.init_cache(1, MAX_LEN), jnp.concatenate(taps, axis=-1),
                            follow, jnp.zeros((1,), jnp.int32), n)
    logits = target.logits(tcfg, tparams, drafter.block_hidden(dparams, tparams, dcache, anchor, n))
    drafts, _, _ = drafter.propose(dparams, tparams, dcache, anchor, n, SamplingParams.make(1),
                                   jax.random.split(jax.random.key(0), 1))
    return int(anchor[0]), np.asarray(drafts[0]), np.asarray(logits[0])


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


def test_folder_loads_as_a_dflash_drafter(pair):
    _, _, drafter, _ = pair
    assert isinstance(drafter, zlab.ZlabDFlashDrafter) and drafter.kind == "dflash"
    assert drafter.gamma == 15 and drafter.cfg.block_size == 16  # block 16 drafts 15 tokens
    assert drafter.tap_layers == (1, 3) and drafter.cfg.mask_token_id == 3 and drafter.cfg.markov_rank == 0
    assert str(GOLDEN["zlab_revision"]) == zlab.ZLAB_REVISION


def test_first_round_drafts_equal_zlab(family):
    *four, golden = family
    anchor, drafts, logits = first_round(*four, golden)
    assert anchor == int(golden["anchor"])
    np.testing.assert_array_equal(drafts, golden["drafts"])
    np.testing.assert_allclose(logits, golden["draft_logits"], rtol=1e-4, atol=1e-4)


def test_features_from_the_wrong_hidden_state_break_the_drafts(family):
    """hidden_states[layer_id] instead of [layer_id + 1] is the tap one layer lower."""
    tcfg, tparams, drafter, dparams, golden = family
    cfg = drafter.cfg.replace(target_layer_ids=tuple(i - 1 for i in drafter.tap_layers))
    _, drafts, _ = first_round(tcfg, tparams, dataclasses.replace(drafter, cfg=cfg), dparams, golden)
    assert (drafts != golden["drafts"]).any()
    np.testing.assert_array_equal(drafts, golden["wrong_offset_drafts"])  # what z-lab's code does with it


def test_drafting_from_the_anchor_position_breaks_the_drafts(pair):
    """The DeepSpec convention (draft k read at block position k - 1) is not z-lab's."""
    tcfg, tparams, drafter, dparams = pair
    deepspec = BlockDrafter(drafter.cfg, tcfg, drafter.gamma)
    _, drafts, _ = first_round(tcfg, tparams, deepspec, dparams)
    assert (drafts != GOLDEN["drafts"]).any()


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
    assert list(results[0].token_ids) == golden["greedy"].tolist() == golden["zlab_greedy"].tolist()
    assert list(results[0].trace[0]["draft_tokens"]) == golden["drafts"].tolist()


def test_cli_trace_shows_zlab_first_block(capsys):
    argv = ["--target", TARGET, "--draft", DRAFT, "--drafter", "dflash", "--temperature", "0", "--json", "--trace",
            "--max-new-tokens", str(len(GOLDEN["greedy"])),
            "--prompt-ids", ",".join(str(t) for t in GOLDEN["prompt_ids"])]
    generate.main(argv)
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rec["token_ids"] == GOLDEN["greedy"].tolist() and rec["gamma"] == 15 and rec["drafter"] == "dflash"
    assert rec["trace"][0]["draft_tokens"] == GOLDEN["drafts"].tolist()


def test_layer_ids_derived_as_zlab_does(pair, tmp_path):
    assert zlab.derive_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # z-lab/Qwen3-8B-DFlash-b16's taps
    assert zlab.derive_layer_ids(28, 1) == [14] and zlab.derive_layer_ids(6, 2) == [1, 3]
    folder = copy_with(tmp_path, DRAFT, lambda hf: hf["dflash_config"].pop("target_layer_ids"))
    drafter, _ = drafters.load(folder, pair[0])
    assert drafter.tap_layers == (1, 3)


@pytest.mark.parametrize("field,value", [
    ("input_embedding_scale", 2.0), ("output_multiplier", 0.5), ("final_logit_softcapping", 30.0),
    ("is_causal", True), ("dflash_config.is_causal", True), ("dflash_config.draft_window", 64),
    ("layer_types", ["sliding_attention", "full_attention"]), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
])
def test_unsupported_fields_are_refused_by_name(pair, tmp_path, field, value):
    def edit(hf):
        node, key = (hf["dflash_config"], field.split(".")[1]) if "." in field else (hf, field)
        node[key] = value

    with pytest.raises(DSparkError) as e:
        drafters.load(copy_with(tmp_path, DRAFT, edit), pair[0])
    msg = str(e.value)
    assert field.split(".")[-1] in msg or "yarn" in msg
    assert len(msg.splitlines()) == 1


@pytest.mark.parametrize("field,value", [("input_embedding_scale", 1.0), ("is_causal", False),
                                         ("final_logit_softcapping", None)])
def test_neutral_values_of_newer_fields_load(pair, tmp_path, field, value):
    drafter, _ = drafters.load(copy_with(tmp_path, DRAFT, lambda hf: hf.update({field: value})), pair[0])
    assert drafter.gamma == 15


def test_other_zlab_classes_are_refused(pair, tmp_path):
    folder = copy_with(tmp_path, DRAFT, lambda hf: hf.update(architectures=["DFlash2DraftModel"]))
    with pytest.raises(DSparkError, match="z-lab class DFlash2DraftModel is not supported"):
        drafters.load(folder, pair[0])


def test_a_deepspec_folder_given_as_zlab_names_its_layout(pair, tmp_path):
    tcfg, tparams, _, _ = pair
    d, p = make_block_drafter(tcfg, rank=0, confidence=False, taps=(1, 3))
    deepspec = write_block_drafter(tmp_path / "deepspec", TARGET, tparams, d, p)
    assert drafters.load(deepspec, tcfg)[0].kind == "dflash"  # as itself it loads
    folder = copy_with(tmp_path, deepspec, lambda hf: hf.update(architectures=["DFlashDraftModel"]), "as_zlab")
    with pytest.raises(DSparkError, match=r"says DFlashDraftModel .* looks like a DeepSpec folder"):
        drafters.load(folder, tcfg)


def test_a_zlab_folder_given_as_deepspec_names_its_layout(pair, tmp_path):
    folder = copy_with(tmp_path, DRAFT, lambda hf: hf.update(architectures=["Qwen3DFlashModel"]))
    with pytest.raises(DSparkError, match="looks like a z-lab DFlash folder"):
        drafters.load(folder, pair[0])


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_zlab_folder_under_another_kind_is_one_line(capsys, kind):
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", TARGET, "--prompt-ids", "1,2", "--draft", DRAFT, "--drafter", kind])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "holds a dflash drafter (z-lab DFlash layout)" in err and len(err.splitlines()) == 1, err


def test_a_gemma4_target_is_refused():
    gcfg, _ = target.load(os.path.join(FIXTURES, "gemma4_tiny"))
    with pytest.raises(DSparkError, match="supported for Qwen3 and Llama 3 targets; the target's config is a Gemma4"):
        drafters.load(DRAFT, gcfg)


def test_gamma_is_capped_at_the_mask_positions(pair):
    with pytest.raises(DSparkError, match="gamma 16 is above the 15 drafts"):
        drafters.load(DRAFT, pair[0], gamma=16)
    assert drafters.load(DRAFT, pair[0], gamma=4)[0].gamma == 4
    assert drafters.load(DRAFT, pair[0], kind="mtp1")[0].gamma == 1  # one draft: block position 1
