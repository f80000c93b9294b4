"""serve.generate with DeepSpec-layout drafter folders written by the test."""

import json
import os

import pytest

from dspark_jax import target
from serve import generate
from tests.conftest import FIXTURES
from tests.helpers import make_block_drafter, write_block_drafter

UNTIED = os.path.join(FIXTURES, "qwen3_tiny_untied")
TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    tcfg, tparams = target.load(UNTIED)
    out = {}
    for name, kw in {"dspark": dict(head="gated"), "dflash": dict(rank=0, confidence=False)}.items():
        d, p = make_block_drafter(tcfg, **kw)
        out[name] = write_block_drafter(root / name, UNTIED, tparams, d, p, sts=[1.0, 1.5, 2.0, 2.5])
    from dspark_jax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_eagle3_params, save_eagle3
    from dspark_jax import checkpoints

    e3 = Eagle3Drafter(cfg=Eagle3Config(arch=tcfg.replace(num_hidden_layers=1), target_layer_ids=(0, 1),
                                        block_size=4), tcfg=tcfg, gamma=4)
    save_eagle3(str(root / "eagle3"), e3, init_eagle3_params(e3, __import__("jax").random.key(3)),
                checkpoints.read_config(UNTIED))
    out["eagle3"] = str(root / "eagle3")
    tcfg_t, tparams_t = target.load(TIED)
    d, p = make_block_drafter(tcfg_t)
    out["tied"] = write_block_drafter(root / "tied", TIED, tparams_t, d, p)
    return out


def records(capsys, *argv):
    generate.main(list(argv))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "mtp1"])
def test_speculative_json_equals_plain(capsys, folders, kind):
    common = ["--target", UNTIED, "--prompt-ids", "1,2,3", "--prompt-ids", "7,8,9,10,11,12",
              "--temperature", "0", "--json", "--max-new-tokens", "12"]
    plain = records(capsys, *common, "--drafter", "none")
    draft = folders["dspark" if kind == "mtp1" else kind]
    spec = records(capsys, *common, "--draft", draft, "--drafter", kind, "--trace")
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    gamma = 1 if kind == "mtp1" else 4
    for r in spec:
        assert r["gamma"] == gamma and len(r["accepted_per_position"]) == gamma
        assert len(r["trace"]) == r["rounds"]
        assert {"draft_tokens", "confidences", "verify_depth", "accepted"} <= set(r["trace"][0])
        assert r["trace"][0]["verify_depth"] == gamma


def test_verify_depth_and_gamma_flags(capsys, folders):
    common = ["--target", UNTIED, "--prompt-ids", "4,5,6", "--json", "--max-new-tokens", "8", "--trace"]
    plain = records(capsys, *common)
    spec = records(capsys, *common, "--draft", folders["dspark"], "--gamma", "3", "--verify-depth", "2")
    assert spec[0]["token_ids"] == plain[0]["token_ids"]
    # the fixed policy at depth 2 drafts only the 2 tokens it verifies (the room left caps the last rounds)
    assert all(t["verify_depth"] <= 2 and len(t["draft_tokens"]) == 2 for t in spec[0]["trace"])
    assert spec[0]["trace"][0]["verify_depth"] == 2 and spec[0]["policy"] == "fixed"


@pytest.mark.parametrize("extra,needle", [
    (["--draft", "TIED_DRAFT"], "vocab_size 384 does not match the target's 512"),
    (["--draft", "DSPARK", "--gamma", "5"], "gamma 5 is above the drafter's block size 4"),
    (["--draft", "DSPARK", "--gamma", "0"], "gamma must be >= 1"),
    (["--draft", "DSPARK", "--verify-depth", "9"], "verify depth must be in [0, gamma=4]"),
    (["--draft", "DFLASH", "--drafter", "dspark"], "holds a dflash drafter"),
    (["--draft", "DSPARK", "--drafter", "eagle3"], "holds a dspark drafter"),
    (["--drafter", "dspark"], "needs --draft DIR"),
    (["--draft", UNTIED], "is not a drafter"),
])
def test_bad_drafter_inputs_exit_2(capsys, folders, extra, needle):
    sub = {"TIED_DRAFT": folders["tied"], "DSPARK": folders["dspark"], "DFLASH": folders["dflash"]}
    extra = [sub.get(x, x) for x in extra]
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", UNTIED, "--prompt-ids", "1,2"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
