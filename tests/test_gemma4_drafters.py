"""Gemma 4 DSpark / DFlash drafters: DeepSpec folders in and out, lossless speculation.

Both tiny Gemma 4 fixtures (PLE + soft-cap + tied; MoE + KV sharing + K = V + untied):
random drafters round-trip through `drafters.load`, speculative greedy output equals
plain greedy (random per-request depth limits, and threshold depths that vary round by
round; an oracle drafter drives real acceptances), the
temperature-1 / top-p 0.9 sampler keeps the target's distribution, and the CLI agrees
with plain decoding. Compilations are kept few (the machine is small and shared).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import checkpoints, drafters, generation, sampling, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.config_gemma4 import FULL, SLIDING, gemma4_tiny
from dspark_jax.drafters import gemma4_drafter as g4
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.engine import drafter_has_confidence
from dspark_jax.errors import DSparkError
from serve import generate
from tests.conftest import FIXTURES
from tests.helpers import write_block_drafter
from tests.test_speculation_greedy import ConfidentOracle
from tests.test_speculation_distribution import chi_square_z

TINY = os.path.join(FIXTURES, "gemma4_tiny")
MOE = os.path.join(FIXTURES, "gemma4_tiny_moe_shared")
QWEN = os.path.join(FIXTURES, "qwen3_tiny_untied")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
NEW = 16
DRAFTERS = {"vanilla": dict(head="vanilla"), "gated": dict(head="gated", with_markov=False),
            "dflash": dict(rank=0, confidence=False)}
# which random drafters run the (compile-heavy) greedy test on which fixture
GREEDY = [(TINY, "vanilla"), (TINY, "dflash"), (MOE, "gated")]
MESH = mesh_lib.make_mesh("1x1")


def fill(template, seed, scale=1.0):
    """Random parameters without compiling an init: matrices N(0, 0.02 * scale), vectors 1."""
    leaves, tree = jax.tree.flatten(template)
    rng = np.random.default_rng(seed)
    out = [(rng.normal(0, 0.02 * scale, s.shape) if len(s.shape) > 1 else np.ones(s.shape)).astype(s.dtype)
           for s in leaves]
    return jax.tree.unflatten(tree, out)


def make_drafter(tcfg, *, head="vanilla", rank=16, layers=2, block_size=4, taps=(0, 3), confidence=True,
                 with_markov=True, scale=1.0, seed=1):
    cfg = g4.new_config(tcfg, num_layers=layers, target_layer_ids=taps, block_size=block_size, mask_token_id=3,
                        markov_rank=rank, markov_head_type=head, enable_confidence_head=confidence,
                        confidence_head_with_markov=with_markov)
    drafter = g4.Gemma4BlockDrafter(cfg, tcfg, block_size)
    return drafter, fill(drafter.param_shapes_and_axes()[0], seed, scale)


def random_depths(gamma, seed, n=len(PROMPTS)):
    """A random depth limit in [0, gamma] for each of n prompts (generate's max_depths)."""
    return np.random.default_rng(seed).integers(0, gamma + 1, n)


def run(tcfg, tparams, drafter=None, dparams=None, **kw):
    comps = generation.generate(tcfg, tparams, PROMPTS, max_new_tokens=NEW,
                                sampling=sampling.SamplingParams.make(len(PROMPTS)), seeds=range(len(PROMPTS)),
                                drafter=drafter, dparams=dparams, **kw)
    return [c.token_ids for c in comps], comps


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per fixture: target, plain greedy reference, and the three drafters' saved folders."""
    root = tmp_path_factory.mktemp("gemma4_drafters")
    out = {}
    for folder in (TINY, MOE):
        tcfg, tparams = target.load(folder)
        # placed as serve.generate places them, so the CLI test reuses these compilations
        tparams = target.shard(tcfg, tparams, MESH)
        saved = {}
        for name, kw in DRAFTERS.items():
            d, p = make_drafter(tcfg, seed=len(saved) + 1, **kw)
            path = str(root / f"{os.path.basename(folder)}_{name}")
            g4.save_gemma4_drafter(path, d, p, checkpoints.read_config(folder), tparams,
                                   sts_temperatures=[1.0, 1.5, 2.0, 2.5] if name == "gated" else None)
            saved[name] = (d, p, path)
        ref = run(tcfg, tparams)[0] if any(f == folder for f, _ in GREEDY) else None
        out[folder] = (tcfg, tparams, ref, saved)
    return out


@pytest.mark.parametrize("folder", [TINY, MOE], ids=["tiny", "moe_shared"])
def test_save_load_round_trip(pairs, folder):
    tcfg, _, _, saved = pairs[folder]
    for name, (d, p, path) in saved.items():
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        assert hf["architectures"] == [g4.ARCHITECTURES[d.kind]] and hf["model_type"] == "gemma4_text"
        assert hf["num_hidden_layers"] == 2 and hf["num_target_layers"] == 6 and "text_config" not in hf
        loaded, lp = drafters.load(path, tcfg)
        assert type(loaded) is g4.Gemma4BlockDrafter and loaded.kind == ("dflash" if name == "dflash" else "dspark")
        assert loaded.cfg == d.cfg and loaded.gamma == d.gamma == 4
        assert loaded.sts_temperatures == ((1.0, 1.5, 2.0, 2.5) if name == "gated" else None)
        assert jax.tree.structure(lp) == jax.tree.structure(p)
        jax.tree.map(np.testing.assert_array_equal, lp, p)
        assert drafters.load(path, tcfg, kind="mtp1")[0].gamma == 1


def test_checkpoint_without_layer_scalars_loads_ones(pairs, tmp_path):
    from safetensors.numpy import load_file, save_file

    tcfg, _, _, saved = pairs[TINY]
    folder = shutil.copytree(saved["vanilla"][2], tmp_path / "no_scalar")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith("layer_scalar")}, str(folder / "model.safetensors"))
    _, params = drafters.load(str(folder), tcfg)
    for i in range(2):
        np.testing.assert_array_equal(params[f"layers_{i}"]["layer_scalar"], np.ones((1,), np.float32))


@pytest.mark.parametrize("folder,name", GREEDY, ids=[f"{os.path.basename(f)}-{n}" for f, n in GREEDY])
def test_random_drafters_equal_greedy(pairs, folder, name):
    tcfg, tparams, ref, saved = pairs[folder]
    drafter, dparams = drafters.load(saved[name][2], tcfg)
    dparams = drafter.shard(dparams, MESH)
    runs = [dict(max_depths=random_depths(drafter.gamma, 0))]
    if drafter_has_confidence(drafter):  # depths from the confidence head, varying round by round
        runs.append(dict(policy="threshold"))
    for kw in runs:
        got, comps = run(tcfg, tparams, drafter, dparams, **kw)
        assert got == ref, kw
        assert all(c.rounds >= 1 for c in comps)


@pytest.mark.parametrize("folder", [TINY, MOE], ids=["tiny", "moe_shared"])
def test_oracle_acceptances_equal_greedy(pairs, folder):
    tcfg, tparams, ref, _ = pairs[folder]
    length = max(len(p) for p in PROMPTS) + NEW + 8
    toks = np.zeros((len(PROMPTS), length), np.int32)
    for i, (p, r) in enumerate(zip(PROMPTS, ref)):
        toks[i, :len(p + r)] = p + r
    rng = np.random.default_rng(0)
    oracle = ConfidentOracle(4, tcfg.vocab_size)
    # confidences (read by the threshold policy only): mostly above its 0.5, now and then below
    conf = jnp.asarray(np.where(rng.random(toks.shape) < 0.8, 0.9, 0.1), jnp.float32)
    for rate in (0.0, 0.3):
        dparams = {"ref": jnp.asarray(toks), "corrupt": jnp.asarray(rng.random(toks.shape) < rate), "conf": conf}
        # random per-request limits; depths varying round by round (threshold on the confidences)
        for kw in (dict(max_depths=random_depths(4, 1)), dict(policy="threshold")):
            got, comps = run(tcfg, tparams, oracle, dparams, **kw)
            assert got == ref, (rate, kw)
            if rate == 0.0:
                assert max(c.tau for c in comps) > 2.0, kw  # real multi-token acceptances on the Gemma target


# ------------------------------------------------------------ temperature 1, top-p 0.9

V = 6
PROMPT = [1, 4, 2, 5, 0]
N = 4000


def joint_counts(tcfg, tparams, drafter, dparams, sp):
    """Counts of (t1, t2, t3) over N speculative samples of PROMPT, and tau. Four tokens
    are generated so that t2 and t3 both pass verification: the engine verifies no draft
    past max_new_tokens, so with three t3 would never be a verified draft or a residual."""
    comps = generation.generate(tcfg, tparams, [PROMPT] * N, max_new_tokens=4,
                                sampling=sampling.SamplingParams.make(N, *sp), seeds=range(N),
                                drafter=drafter, dparams=dparams)
    counts = np.zeros((V, V, V))
    for c in comps:
        counts[tuple(c.token_ids[:3])] += 1
    return counts, 3 * N / sum(c.rounds for c in comps)


def exact_joint(tcfg, tparams, sp):
    """P(t1, t2, t3) of plain sampling from the warped target, [V, V, V]."""
    seqs = np.array([PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    n = len(PROMPT)

    @jax.jit
    def probs_of(tp, toks):
        h, _, _ = target.forward(tcfg, tp, toks, jnp.full((len(seqs),), n + 2, jnp.int32))
        return sampling.warp(target.logits(tcfg, tp, h), sampling.SamplingParams.make(len(seqs), *sp))

    p = np.asarray(probs_of(tparams, jnp.asarray(seqs)), np.float64)
    return p[0, n - 1][:, None, None] * p[::V, n].reshape(V, V)[:, :, None] * p[:, n + 1].reshape(V, V, V)


def test_sampling_matches_target_distribution():
    tcfg = gemma4_tiny(vocab_size=V, num_hidden_layers=3, layer_types=(SLIDING, FULL, FULL), num_kv_shared_layers=1)
    tparams = fill(target.param_shapes_and_axes(tcfg)[0], 7, scale=12.0)  # peaked, varied p
    drafter, dparams = make_drafter(tcfg, rank=8, layers=1, block_size=2, taps=(0,), scale=12.0, seed=3)
    sp = (1.0, 0, 0.9)
    probs = exact_joint(tcfg, tparams, sp)
    counts, tau = joint_counts(tcfg, tparams, drafter, dparams, sp)
    assert 1.05 < tau < 2.95, tau  # some drafts accepted, some rejected
    z = chi_square_z(counts, probs)
    assert z < 4.0, f"speculative samples deviate from the target distribution (z={z:.2f})"


# --------------------------------------------------------------------------------- CLI

def records(capsys, *argv):
    generate.main(list(argv))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_json_equals_plain(capsys, pairs):
    # the greedy tests' prompts and lengths (same shapes: the compiled rounds can be reused)
    common = ["--target", TINY, "--temperature", "0", "--json", "--max-new-tokens", str(NEW)]
    for p in PROMPTS:
        common += ["--prompt-ids", ",".join(map(str, p))]
    plain = records(capsys, *common, "--drafter", "none")
    spec = records(capsys, *common, "--draft", pairs[TINY][3]["vanilla"][2])
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    assert all(r["gamma"] == 4 and r["rounds"] >= 1 for r in spec)


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(dst)


def test_mismatched_draft_and_target_refused(capsys, pairs, tmp_path):
    tcfg = pairs[TINY][0]
    tiny_draft = pairs[TINY][3]["vanilla"][2]
    qcfg, qparams = target.load(QWEN)
    qd = BlockDrafter(DrafterConfig(arch=qcfg.replace(num_hidden_layers=1), target_layer_ids=(0,), block_size=4,
                                    mask_token_id=3, markov_rank=8), qcfg, 4)
    qwen_draft = write_block_drafter(tmp_path / "qwen", QWEN, qparams, qd, fill(qd.param_shapes_and_axes()[0], 0))
    cases = [
        (qcfg, tiny_draft, "a Gemma 4 drafter needs a Gemma 4 target"),
        (tcfg, qwen_draft, "holds a Qwen3 drafter"),
        (tcfg, _edited(tiny_draft, tmp_path / "taps", target_layer_ids=[0, 5]), "do not fit a 6-layer target"),
        (tcfg, _edited(tiny_draft, tmp_path / "layers", num_target_layers=8), "trained for a 8-layer target"),
        (tcfg, _edited(tiny_draft, tmp_path / "vocab", vocab_size=300), "vocab_size 300 does not match"),
        # read as a Gemma 4 Eagle3 drafter (tests/test_gemma4_eagle3.py), whose layers have their own hidden_norm
        (tcfg, _edited(tiny_draft, tmp_path / "eagle3", architectures=["Gemma4Eagle3Model"]),
         "tensor layers.0.hidden_norm.weight is missing"),
    ]
    for cfg, dfolder, needle in cases:
        with pytest.raises(DSparkError) as e:
            drafters.load(dfolder, cfg)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    # and through the CLI: exit status 2 with one line on stderr
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", TINY, "--draft", qwen_draft, "--prompt-ids", "1,2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "holds a Qwen3 drafter" in err and len(err.splitlines()) == 1, err
