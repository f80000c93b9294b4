"""The DeepSeek-V4 DSpark drafter: trained by `train.train` on a V4 target (the loss
falls, a killed run resumes), exported in DeepSeek's `mtp.*` layout and loaded back bit
for bit; through the engine its greedy output equals plain greedy (CLI), and at
temperature 1 / top-p 0.9 the samples keep the target's distribution. Compilations are
kept few: one training run (resumed once), one CLI pair, one small sampling target."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import checkpoints, drafters, generation, sampling, target
from dspark_jax.config_deepseek_v4 import MOE, SLIDING, DeepseekV4Config
from dspark_jax.drafters import deepseek_v4_drafter as dv4
from dspark_jax.drafters import deepseek_v4_layout as layout
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder
from serve import generate
from tests.conftest import FIXTURES
from tests.test_gemma4_drafters import fill
from tests.test_speculation_distribution import chi_square_z
from tests.test_training import metrics, synthetic_chats
from train import data, trainer
from train.config import TrainConfig

TINY = os.path.join(FIXTURES, "deepseek_v4_tiny_a")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of train.train on the tiny V4 target, killed after step 2 and resumed."""
    root = tmp_path_factory.mktemp("v4_drafter")
    synthetic_chats(root / "train.jsonl", n=24)
    synthetic_chats(root / "val.jsonl", n=4, seed=1)
    data.build(name="count", sources={"train": [str(root / "train.jsonl")], "validation": [str(root / "val.jsonl")]},
               tokenizer_dir=TINY, data_dir=str(root))
    cfg = TrainConfig(target=TINY, data_dir=str(root), dataset="count", steps=4, batch_size=4, seq_len=32,
                      num_anchors=6, block_size=5, draft_layers=2, markov_rank=16, lr=3e-3, mask_token="3",
                      out_dir=str(root / "run"), ckpt_every=2, log_every=1, async_checkpoint=False)
    trainer.run(cfg, progress=False, stop_after=3)     # killed: the checkpoint of step 2 survives
    state, drafter = trainer.run(cfg, progress=False)  # resumes at step 2, exports at 4
    return cfg, state, drafter, os.path.join(cfg.out_dir, "drafter")


def test_training_resumes_and_loss_falls(trained):
    cfg, state, drafter, _ = trained
    assert int(state.step) == 4 and isinstance(drafter, dv4.DeepseekV4BlockDrafter)
    m = metrics(cfg.out_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4]   # step 3 of the killed run was cut from the log
    assert m[-1]["loss"] < m[0]["loss"], [r["loss"] for r in m]
    # DeepSeek's taps by default: the streams entering the last three of the 4 target layers
    assert drafter.cfg.target_layer_ids == (0, 1, 2) and drafter.gamma == 5


def test_export_is_deepseeks_mtp_layout_and_loads_bit_for_bit(trained):
    cfg, state, drafter, folder = trained
    hf = checkpoints.read_config(folder)
    assert hf["model_type"] == "deepseek_v4" and hf["num_nextn_predict_layers"] == 2
    assert (hf["dspark_block_size"], hf["dspark_noise_token_id"], hf["dspark_markov_rank"]) == (5, 3, 16)
    assert hf["dspark_target_layer_ids"] == [1, 2, 3]   # DeepSeek's ids: layers whose input is tapped
    names = set(open_folder(folder))
    assert all(n.startswith("mtp.") for n in names)
    d, r = 64, 16
    index = open_folder(folder)
    for name, shape in (("mtp.0.main_proj.weight", (d, 3 * d)), ("mtp.0.main_norm.weight", (d,)),
                        ("mtp.1.attn.wkv.weight", (32, d)), ("mtp.1.attn.attn_sink", (4,)),
                        ("mtp.0.ffn.experts.7.w2.weight", (d, 16)), ("mtp.1.ffn.gate.bias", (8,)),
                        ("mtp.0.ffn.shared_experts.w3.weight", (16, d)), ("mtp.0.hc_attn_fn", (24, 4 * d)),
                        ("mtp.1.hc_head_fn", (4, 4 * d)), ("mtp.1.norm.weight", (d,)),
                        ("mtp.1.markov_head.markov_w1.weight", (320, r)),
                        ("mtp.1.markov_head.markov_w2.weight", (320, r)),
                        ("mtp.1.confidence_head.proj.weight", (1, d + r))):
        assert tuple(index[name].shape) == shape, name
    assert "mtp.0.markov_head.markov_w1.weight" not in names and "mtp.0.hc_head_fn" not in names
    tcfg, _ = target.load(TINY, "float32")
    got, params = drafters.load(folder, tcfg)
    assert got.cfg.arch == drafter.cfg.arch and got.cfg.target_layer_ids == drafter.cfg.target_layer_ids
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_released_combined_folder_serves_target_and_drafter(trained, tmp_path):
    """DeepSeek ships V4-*-DSpark as ONE folder: the target's shards plus the `mtp.*`
    tensors, the dspark fields in its config.json. The same folder is --target and --draft."""
    _, state, _, folder = trained
    combined = tmp_path / "combined"
    shutil.copytree(TINY, combined)
    shutil.copy(os.path.join(folder, "model.safetensors"), combined / "model-mtp.safetensors")
    with open(combined / "model.safetensors.index.json") as f:
        index = json.load(f)
    index["weight_map"].update({n: "model-mtp.safetensors" for n in open_folder(folder)})
    with open(combined / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    shutil.copy(os.path.join(folder, "config.json"), combined / "config.json")
    tcfg, tparams = target.load(str(combined), "float32")
    ref_cfg, ref_params = target.load(TINY, "float32")
    assert tcfg == ref_cfg
    for a, b in zip(jax.tree.leaves(tparams), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, params = drafters.load(str(combined), tcfg)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def records(capsys, *argv):
    generate.main(list(argv))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_greedy_equals_plain(capsys, trained):
    """`--draft <exported folder> --temperature 0` gives the fixture's greedy tokens (those
    of transformers' full forwards, which `--drafter none` reproduces: test_deepseek_v4_engine)."""
    g = np.load(os.path.join(TINY, "golden.npz"))
    argv = ["--target", TINY, "--draft", trained[3], "--temperature", "0", "--json", "--max-new-tokens", "12",
            "--ignore-eos"]
    for b, n in enumerate(g["prompt_lengths"]):
        argv += ["--prompt-ids", ",".join(map(str, g["prompt_ids"][b, :n]))]
    spec = records(capsys, *argv)
    assert [r["token_ids"] for r in spec] == [g["greedy_0"].tolist(), g["greedy_1"].tolist()]
    assert all(r["gamma"] == 5 for r in spec)


def test_flash_production_shape():
    """On V4-Flash (eval_shape, nothing allocated): 3 MoE layers of 256 experts, window 128,
    gamma 5, rank 256, taps at DeepSeek's released dspark_target_layer_ids [40, 41, 42]."""
    from configs.models.deepseek_v4 import preset

    tcfg = preset("deepseek-v4-flash")
    drafter = dv4.DeepseekV4BlockDrafter(dv4.new_config(tcfg, mask_token_id=128799), tcfg, 5)
    shapes = drafter.param_shapes_and_axes()[0]
    assert [i + 1 for i in drafter.cfg.target_layer_ids] == [40, 41, 42]
    assert drafter.cfg.arch.sliding_window == 128 and drafter.gamma == 5 and len(drafter.cfg.arch.layer_types) == 3
    assert shapes["fc"]["kernel"].shape == (3 * 4096, 4096)
    assert shapes["layers_2"]["mlp"]["experts"]["gate_up_proj"].shape == (256, 2, 2048, 4096)
    assert shapes["confidence_head"]["proj"]["kernel"].shape == (4096 + 256, 1)


def test_refusals_are_one_line():
    tcfg, _ = target.load(TINY, "float32")
    hf = checkpoints.read_config(TINY)   # the target's own folder: no dspark fields
    with pytest.raises(DSparkError) as e:
        drafters.load(TINY, tcfg)
    assert "holds no DSpark drafter" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DSparkError) as e:
        dv4.DeepseekV4BlockDrafter(dv4.new_config(tcfg, markov_rank=0), tcfg, 5)
    assert "vanilla Markov head" in str(e.value)
    bad = layout.folder_config(dict(hf, dspark_block_size=5, dspark_noise_token_id=3, dspark_markov_rank=8,
                                    dspark_target_layer_ids=[1, 2, 3], num_nextn_predict_layers=1), tcfg, "c", None)
    assert bad.arch.num_hidden_layers == 1 and bad.target_layer_ids == (0, 1, 2)
    with pytest.raises(DSparkError) as e:
        dv4.DeepseekV4BlockDrafter(bad.replace(target_layer_ids=(0, 3)), tcfg, 5)
    assert "do not fit a 4-layer target" in str(e.value)


def test_block_sees_the_sliding_window_before_its_anchor():
    """Context K=V outside [anchor - sliding_window, anchor) changes nothing; inside it does
    (two blocks laid end to end, as training lays them, each with its own anchor)."""
    tcfg = small_target()
    cfg = dv4.new_config(tcfg, num_layers=1, target_layer_ids=(0,), block_size=2, mask_token_id=3, markov_rank=4)
    drafter = dv4.DeepseekV4BlockDrafter(cfg, tcfg, 2)
    params = fill(drafter.param_shapes_and_axes()[0], 5)
    w, s, d = tcfg.sliding_window, 24, tcfg.hidden_size
    rng = np.random.default_rng(0)
    ctx = jnp.asarray(rng.normal(size=(1, 1, s, 1, tcfg.head_dim)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 4, d)), jnp.float32)
    anchors = (12, 20)
    positions = jnp.asarray([[anchors[0], anchors[0] + 1, anchors[1], anchors[1] + 1]], jnp.int32)
    mask = jnp.asarray([[[c < anchors[q // 2] for c in range(s)] + [q // 2 == k // 2 for k in range(4)]
                         for q in range(4)]])

    @jax.jit
    def run(c):
        return drafter.module.apply({"params": params}, x, positions, c, c, mask, method="block")

    def block(c):
        return np.asarray(run(c))

    base = block(ctx)
    far = ctx.at[:, :, :anchors[0] - w].add(5.0)                 # before both windows
    np.testing.assert_array_equal(block(far), base)
    first_only = ctx.at[:, :, anchors[0] - w:anchors[1] - w].add(5.0)   # in block 0's window only
    got = block(first_only)
    assert np.abs(got[:, :2] - base[:, :2]).max() > 1e-3
    np.testing.assert_array_equal(got[:, 2:], base[:, 2:])


# ------------------------------------------------------------ temperature 1, top-p 0.9

V = 6
PROMPT = [1, 4, 2, 5, 0]
N = 2000


def small_target():
    hf = checkpoints.read_config(TINY)
    hf.update(vocab_size=V, num_hidden_layers=2, layer_types=[SLIDING, SLIDING], mlp_layer_types=[MOE, MOE])
    return DeepseekV4Config.from_hf(hf, "small", "float32")


def test_sampling_matches_target_distribution():
    tcfg = small_target()
    tparams = fill(target.param_shapes_and_axes(tcfg)[0], 7, scale=12.0)   # peaked, varied p
    cfg = dv4.new_config(tcfg, num_layers=1, block_size=2, mask_token_id=3, markov_rank=8)
    drafter = dv4.DeepseekV4BlockDrafter(cfg, tcfg, 2)
    dparams = fill(drafter.param_shapes_and_axes()[0], 3, scale=12.0)
    sp = (1.0, 0, 0.9)
    seqs = np.array([PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    n = len(PROMPT)

    @jax.jit
    def probs_of(tp, toks):
        h, _, _ = target.forward(tcfg, tp, toks, jnp.full((len(seqs),), n + 2, jnp.int32))
        return sampling.warp(target.logits(tcfg, tp, h), sampling.SamplingParams.make(len(seqs), *sp))

    p = np.asarray(probs_of(tparams, jnp.asarray(seqs)), np.float64)
    probs = p[0, n - 1][:, None, None] * p[::V, n].reshape(V, V)[:, :, None] * p[:, n + 1].reshape(V, V, V)
    comps = generation.generate(tcfg, tparams, [PROMPT] * N, max_new_tokens=4,
                                sampling=sampling.SamplingParams.make(N, *sp), seeds=range(N),
                                drafter=drafter, dparams=dparams)
    counts = np.zeros((V, V, V))
    for c in comps:
        counts[tuple(c.token_ids[:3])] += 1
    tau = 3 * N / sum(c.rounds for c in comps)
    assert 1.05 < tau < 2.95, tau   # some drafts accepted, some rejected
    z = chi_square_z(counts, probs)
    assert z < 4.0, f"speculative samples deviate from the target distribution (z={z:.2f})"
