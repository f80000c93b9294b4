"""train.train trains a DFlash drafter in z-lab's block convention (block_convention=zlab:
the anchor then block_size - 1 mask tokens, block position k predicting x_{a+k}) and
exports it as a faithful z-lab folder: the folder loads with --drafter dflash, its
first-round drafts equal the trained drafter's bit for bit, greedy speculative output
equals plain greedy. The targets, weights and target distributions shift with the
convention (a known sequence pins them against the target's own forward and against the
DeepSpec rule on the same weights); a DeepSpec-convention drafter is refused for export_layout=zlab before the
first step, and resuming across conventions is a one-line error."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import drafters, generation, target
from dspark_jax.drafters import zlab
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams
from tests.test_training import TIED, config, dataset, metrics  # noqa: F401  (dataset: fixture)
from tests.test_zlab_dflash import first_round
from tests.test_zlab_export import assert_same_params
from train import objective, step as step_lib, trainer
from train.config import validate

G = 5


def zlab_config(dataset, out, **kw):
    base = dict(drafter="dflash", block_convention="zlab", export_layout="zlab", block_size=G, steps=20)
    base.update(kw)
    return config(dataset, out, **base)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    cfg = zlab_config(dataset, tmp_path_factory.mktemp("zlab_run"))
    state, drafter = trainer.run(cfg, progress=False)
    return cfg, state, drafter


def test_zlab_run_trains_and_exports_a_faithful_folder(trained):
    cfg, state, drafter = trained
    losses = [m["loss"] for m in metrics(cfg.out_dir)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert type(drafter) is zlab.ZlabDFlashDrafter and drafter.gamma == G - 1
    folder = os.path.join(cfg.out_dir, "drafter_zlab")
    assert not os.path.exists(os.path.join(cfg.out_dir, "drafter"))
    tcfg, tparams = target.load(TIED)
    loaded, lparams = drafters.load(folder, tcfg, kind="dflash")
    assert type(loaded) is zlab.ZlabDFlashDrafter and loaded.gamma == G - 1 and loaded.cfg.block_size == G
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), state.params)
    assert_same_params(params, lparams)
    golden = {"prompt_ids": np.array([1, 5, 9, 12, 7, 3], np.int32)}
    a0, d0, l0 = first_round(tcfg, tparams, drafter, state.params, golden)
    a1, d1, l1 = first_round(tcfg, tparams, loaded, lparams, golden)
    assert a0 == a1 and len(d1) == G - 1 and np.array_equal(d0, d1) and np.array_equal(l0, l1)
    prompts = [[1, 5, 9, 12], [2, 3]]
    sp = SamplingParams.make(2)
    plain = generation.generate(tcfg, tparams, prompts, max_new_tokens=10, sampling=sp, seeds=[0, 1])
    spec = generation.generate(tcfg, tparams, prompts, max_new_tokens=10, sampling=sp, seeds=[0, 1],
                               drafter=loaded, dparams=lparams)
    assert [c.token_ids for c in plain] == [c.token_ids for c in spec]


def test_block_forward_shifts_targets_weights_and_target_logits(trained):
    """A known sequence: z-lab block position k (1..G-1) is scored against x_{a+k}, with the
    target's distribution at position a+k-1, and q read from the block's hidden state at k."""
    cfg, state, drafter = trained
    tcfg, tparams = target.load(TIED)
    length = 16
    ids = jnp.arange(100, 100 + length, dtype=jnp.int32)[None]
    batch = {"input_ids": ids, "loss_mask": jnp.ones((1, length), jnp.int32),
             "lengths": jnp.array([length], jnp.int32)}
    key, n = jax.random.key(0), cfg.num_anchors
    q, p, targets, tvalid, conf = step_lib.block_forward(drafter, tcfg, state.params, tparams, batch, key, n)
    anchors, valid = objective.sample_anchors(key, batch["loss_mask"], n)
    assert conf is None and q.shape[:3] == p.shape[:3] == targets.shape == (1, n, G - 1)
    a = np.asarray(anchors)[0]
    want = 100 + a[:, None] + np.arange(1, G)[None]
    tv = np.asarray(tvalid)[0]
    assert np.array_equal(tv, want < 100 + length) and np.array_equal(np.asarray(targets)[0][tv], want[tv])
    hidden, _, _ = target.forward(tcfg, tparams, ids, batch["lengths"], None, drafter.tap_layers)
    want_p = target.logits(tcfg, tparams, hidden[0, np.minimum(a[:, None] + np.arange(G - 1)[None], length - 1)])
    np.testing.assert_allclose(np.asarray(p[0]), np.asarray(want_p), rtol=1e-5, atol=1e-5)
    # the DeepSpec drafter of the same weights is scored at positions 0..G-1 against x_{a+1..a+G}
    deep = step_lib.build_drafter(cfg.replace(block_convention="deepspec"), tcfg, drafter.cfg.mask_token_id)
    qd, pd, td, _, _ = step_lib.block_forward(deep, tcfg, state.params, tparams, batch, key, n)
    assert td.shape == (1, n, G) and np.array_equal(np.asarray(td[..., :-1]), np.asarray(targets))
    np.testing.assert_allclose(np.asarray(q), np.asarray(qd[:, :, 1:]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p), np.asarray(pd[:, :, :-1]), rtol=1e-5, atol=1e-5)
    # the loss weights cover the G - 1 drafts
    _, out = step_lib.loss_fn(state.params, tparams, batch, key, drafter=drafter, tcfg=tcfg, cfg=cfg)
    w = objective.position_weights(G - 1, cfg.loss_decay)
    assert np.isclose(float(out["weight"]), float(jnp.sum(w[None, None] * tvalid)))


def test_conventions_are_checked_before_training_and_on_resume(dataset, tmp_path):
    for bad in (dict(block_convention="hf"), dict(drafter="dspark"), dict(block_size=1)):
        with pytest.raises(DSparkError, match="block_convention"):
            validate(zlab_config(dataset, tmp_path / "v", **bad))
    deep = zlab_config(dataset, tmp_path / "r", block_convention="deepspec", steps=2, ckpt_every=1)
    with pytest.raises(DSparkError) as e:    # DeepSpec's convention has no z-lab folder: refused up front
        trainer.run(deep, progress=False)
    assert "positions 0.." in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(deep.out_dir, "metrics.jsonl"))
    trainer.run(deep.replace(export_layout="deepspec"), progress=False, stop_after=1)
    with pytest.raises(DSparkError) as e:    # resuming across conventions
        trainer.run(deep.replace(block_convention="zlab"), progress=False)
    assert "block_convention" in str(e.value) and "\n" not in str(e.value)
