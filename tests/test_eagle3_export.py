"""Eagle3 drafters go back out in the EAGLE-3 layout (dspark_jax/drafters/eagle3_export.py).

Export then load (the EAGLE-3 reader of drafters/eagle3_layout.py, `--drafter eagle3`)
round-trips bit for bit: parameters, the first round's drafts and draft distributions, the
engine's traced drafts; greedy speculative output equals plain greedy. Drafters the layout
cannot hold (Qwen3-shaped draft layers with q/k norms, several draft layers, taps not 3 or
not increasing, DFlash drafters) are refused in one line and nothing is written; a wrong
rule (the taps written off by one) breaks the round trip. The DeepSpec folder the trainer
writes for a Llama target beside it loads back too (model_type llama).
"""

import json
import os

import jax
import numpy as np
import pytest

from dspark_jax import drafters, target
from dspark_jax.drafters import eagle3, eagle3_export, eagle3_layout
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder
from tests.conftest import FIXTURES
from tests.test_eagle3_layout import MAX_LEN, first_round
from train import export as export_cli
from train import trainer
from train.config import TrainConfig, validate
from train.eagle3_objective import with_target_head

LLAMA_TARGET = os.path.join(FIXTURES, "eagle3_llama_target")
QWEN3_TARGET = os.path.join(FIXTURES, "eagle3_qwen3_target")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "eagle3_llama_draft", "golden.npz")))
TAPS = (1, 3, 5)   # not the default (1, 3, 4) of an 8-layer target: the written taps are read


@pytest.fixture(scope="module")
def llama():
    return target.load(LLAMA_TARGET)


def fresh(tcfg, taps=TAPS, layers=1, seed=5, gamma=4):
    """A random Eagle3 drafter as drafter=eagle3 builds it (the target's shape, one layer)."""
    arch = tcfg.replace(num_hidden_layers=layers, tie_word_embeddings=False)
    drafter = eagle3.Eagle3Drafter(cfg=eagle3.Eagle3Config(arch=arch, target_layer_ids=taps), tcfg=tcfg,
                                   gamma=gamma)
    return drafter, eagle3.init_eagle3_params(drafter, jax.random.key(seed))


def as_layout(params):
    """The original tree under the EAGLE-3 names (midlayer; d2t the identity)."""
    out = {("midlayer" if k == "layers_0" else k): v for k, v in params.items()}
    return dict(out, d2t=np.zeros(params["lm_head"]["kernel"].shape[-1], np.int32))


def assert_same_params(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert sorted(str(p) for p, _ in fa) == sorted(str(p) for p, _ in fb)
    fb = dict((str(p), y) for p, y in fb)
    for path, x in fa:
        assert np.array_equal(np.asarray(x), np.asarray(fb[str(path)])), path


def traced_run(tcfg, tparams, drafter, dparams, policy="fixed"):
    engine = Engine(tcfg, tparams, drafter, dparams, slots=2, max_len=MAX_LEN, policy=policy, trace=True,
                    buckets=(2 * (1 + drafter.gamma),))  # the full budget only: the layout is under test
    prompts = [GOLDEN["prompt_ids"].tolist(), [9, 8, 7, 6, 5]]
    ids = [engine.submit(p, max_new_tokens=12) for p in prompts]
    engine.run_until_done()
    return [engine.result(i) for i in ids]


def test_export_then_load_round_trips_bit_for_bit(llama, tmp_path):
    tcfg, tparams = llama
    drafter, params = fresh(tcfg)
    out = eagle3_export.save_eagle3_layout(str(tmp_path / "out"), drafter, params)
    loaded, lparams = drafters.load(out, tcfg, kind="eagle3", gamma=drafter.gamma)
    assert type(loaded) is eagle3_layout.EagleLayoutDrafter and loaded.own_embedding
    assert loaded.cfg.arch == drafter.cfg.arch and loaded.tap_layers == TAPS and loaded.gamma == drafter.gamma
    assert loaded.draft_vocab == tcfg.vocab_size
    assert_same_params(as_layout(params), lparams)
    a0, d0, q0 = first_round(tcfg, tparams, drafter, params, GOLDEN)
    a1, d1, q1 = first_round(tcfg, tparams, loaded, lparams, GOLDEN)
    assert a0 == a1 and np.array_equal(d0, d1) and np.array_equal(q0, q1)
    greedy_drafts = d1
    _, d0, q0 = first_round(tcfg, tparams, drafter, params, GOLDEN, greedy=False)   # sampled: q the draft prob
    _, d1, q1 = first_round(tcfg, tparams, loaded, lparams, GOLDEN, greedy=False)
    assert np.array_equal(d0, d1) and np.array_equal(q0, q1) and (q0 > 0).all()
    # the loaded folder serves losslessly (its first round equals the original's, above)
    back, plain = traced_run(tcfg, tparams, loaded, lparams), traced_run(tcfg, tparams, loaded, lparams, policy="none")
    assert [r.token_ids for r in back] == [r.token_ids for r in plain]   # greedy speculative == greedy
    assert list(back[0].trace[0]["draft_tokens"]) == list(greedy_drafts)        # the engine's first round too
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == hf["vocab_size"]
    assert hf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(TAPS) and hf["num_hidden_layers"] == 1
    index = open_folder(out)
    assert not np.asarray(index["d2t"]).any() and np.asarray(index["t2d"]).all()


def test_taps_off_by_one_break_the_round_trip(llama, tmp_path):
    tcfg, tparams = llama
    drafter, params = fresh(tcfg, seed=3)
    out = eagle3_export.save_eagle3_layout(str(tmp_path / "out"), drafter, params)
    path = os.path.join(out, "config.json")
    hf = json.load(open(path))
    hf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in TAPS]   # "inputs of layers"
    json.dump(hf, open(path, "w"))
    wrong, wparams = drafters.load(out, tcfg, kind="eagle3", gamma=drafter.gamma)
    _, _, q0 = first_round(tcfg, tparams, drafter, params, GOLDEN, greedy=False)
    _, _, q1 = first_round(tcfg, tparams, wrong, wparams, GOLDEN, greedy=False)
    assert not np.allclose(q0, q1)


def refusal(drafter, tmp_path) -> str:
    with pytest.raises(DSparkError) as e:
        eagle3_export.save_eagle3_layout(str(tmp_path / "no"), drafter, {})
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "no")
    return str(e.value)


def test_unfaithful_exports_are_refused_in_one_line(llama, tmp_path):
    tcfg, _ = llama
    qwen3_tcfg, _ = target.load(QWEN3_TARGET)
    assert "Qwen3Config layer" in refusal(fresh(qwen3_tcfg, taps=(1, 2, 3), gamma=2)[0], tmp_path)
    assert "2 draft layers" in refusal(fresh(tcfg, layers=2)[0], tmp_path)
    assert "increasing" in refusal(fresh(tcfg, taps=(5, 3, 1))[0], tmp_path)
    assert "reads 2 target layers" in refusal(fresh(tcfg, taps=(1, 3))[0], tmp_path)
    from tests.helpers import make_block_drafter

    dflash, _ = make_block_drafter(qwen3_tcfg, rank=0, confidence=False, taps=(1, 3))
    assert "not an Eagle3 drafter" in refusal(dflash, tmp_path)


def test_export_layout_accepts_eagle3(tmp_path):
    cfg = TrainConfig(target=LLAMA_TARGET, data_dir="d", dataset="x", drafter="eagle3",
                      export_layout="deepspec,eagle3")
    validate(cfg)
    assert eagle3_export.parse_layouts("deepspec,zlab,eagle3") == ("deepspec", "zlab", "eagle3")
    for bad in ("", "eagle", "eagle3,eagle3"):
        with pytest.raises(DSparkError, match="export_layout"):
            validate(cfg.replace(export_layout=bad))


def test_trainer_export_step_writes_drafter_eagle3(llama, tmp_path):
    """The trainer's export writes <out_dir>/drafter_eagle3 with the target's embedding and
    LM head (drafter=eagle3 trains with them frozen) beside the DeepSpec folder."""
    tcfg, tparams = llama
    drafter, params = fresh(tcfg)
    cfg = TrainConfig(target=LLAMA_TARGET, out_dir=str(tmp_path), export_layout="deepspec,eagle3")
    assert trainer.export_drafter(cfg, drafter, params, tparams) == str(tmp_path / "drafter")
    assert os.path.exists(tmp_path / "drafter" / "model.safetensors")
    _, lparams = drafters.load(str(tmp_path / "drafter_eagle3"), tcfg, kind="eagle3", gamma=drafter.gamma)
    want = with_target_head(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, tparams), tcfg)
    assert_same_params(as_layout(want), lparams)
    # the DeepSpec folder of a Llama target (model_type llama, llama3 RoPE) loads back as it was
    deep, dparams = drafters.load(str(tmp_path / "drafter"), tcfg)
    assert type(deep) is eagle3.Eagle3Drafter and deep.cfg.arch == drafter.cfg.arch
    assert deep.cfg.arch.rope_type == "llama3" and deep.tap_layers == TAPS
    assert_same_params(want, dparams)
    cfg = cfg.replace(export_layout="eagle3", out_dir=str(tmp_path / "q"))
    qwen3_tcfg, _ = target.load(QWEN3_TARGET)
    with pytest.raises(DSparkError, match="Qwen3Config"):
        trainer.export_drafter(cfg, fresh(qwen3_tcfg, taps=(1, 2, 3), gamma=2)[0], {}, None)
    assert not os.path.exists(tmp_path / "q" / "drafter_eagle3")


def test_cli_refuses_in_one_line(llama, tmp_path, capsys):
    """A saved DeepSpec Eagle3 folder loads with Qwen3 draft layers (q/k norms): refused."""
    qwen3_tcfg, qwen3_tparams = target.load(QWEN3_TARGET)
    drafter, params = fresh(qwen3_tcfg, taps=(1, 2, 3), gamma=2)
    from dspark_jax import checkpoints

    src = str(tmp_path / "deepspec")
    eagle3.save_eagle3(src, drafter, params, checkpoints.read_config(QWEN3_TARGET))
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--target", QWEN3_TARGET, "--draft", src, "--layout", "eagle3", "--out",
                         str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "EAGLE-3 layout" in err and "Qwen3Config" in err
    assert "eagle3_layer=llama" in err
    assert not os.path.exists(tmp_path / "o")
