"""Eagle3 training-time test: the TTT loss against a hand computation, the diagonal TTT
mask against the drafter's own inference chain, and a tiny end-to-end training run whose
export generates losslessly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import drafters, generation, target
from dspark_jax.drafters import eagle3
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from train import data, eagle3_objective, step, trainer
from train.config import TrainConfig

TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")


@pytest.fixture(scope="module")
def tgt():
    return target.load(TIED)


def _setup(tcfg, ttt_length, seed=0, noise=0.0):
    cfg = TrainConfig(target=TIED, drafter="eagle3", draft_layers=1, block_size=max(ttt_length, 1),
                      ttt_length=ttt_length, ttt_decay=0.8)
    drafter = step.build_drafter(cfg, tcfg, mask_id=0)
    params = eagle3_objective.init_params(drafter, jax.random.key(seed))
    if noise:  # larger weights than the init: sharper attention, so a wrong mask shows
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda x: x + noise * rng.normal(size=x.shape).astype(np.float32), params)
    return cfg, drafter, params


def _batch(vocab, lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
    mask = (rng.random((len(lengths), width)) < 0.7).astype(np.int32)
    for r, n in enumerate(lengths):
        ids[r, n:], mask[r, n:] = 0, 0
    return {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask),
            "lengths": jnp.asarray(lengths, jnp.int32)}


def test_single_step_loss_matches_uncached_forward(tgt):
    tcfg, tparams = tgt
    cfg, drafter, params = _setup(tcfg, ttt_length=1, noise=0.05)
    batch = _batch(tcfg.vocab_size, [12, 9], 12)
    loss, m = jax.jit(step.loss_fn, static_argnames=("drafter", "tcfg", "cfg"))(
        params, tparams, batch, jax.random.key(0), drafter=drafter, tcfg=tcfg, cfg=cfg)

    @jax.jit
    def reference(params, ids, lengths):  # the module's plain (uncached, causal) forward
        hidden, _, taps = target.forward(tcfg, tparams, ids, lengths, None, drafter.tap_layers)
        dparams = eagle3_objective.with_target_head(params, tparams, tcfg)
        nxt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # x_{t+1} beside the features of t
        _, q_logits = drafter.module.apply({"params": dparams}, jnp.concatenate(taps, -1), nxt, lengths)
        return jax.nn.log_softmax(q_logits), jax.nn.softmax(target.logits(tcfg, tparams, hidden))

    logq, p = (np.asarray(x, np.float64) for x in reference(params, batch["input_ids"], batch["lengths"]))
    ids, mask, lengths = (np.asarray(batch[k]) for k in ("input_ids", "loss_mask", "lengths"))
    soft, hard, tv = [], [], []
    for r in range(ids.shape[0]):
        for t in range(int(lengths[r]) - 2):
            if mask[r, t + 2]:  # x_{t+2} predicted by position t, target p at t+1
                soft.append(-(p[r, t + 1] * logq[r, t]).sum())
                hard.append(-logq[r, t, ids[r, t + 2]])
                tv.append(np.abs(np.exp(logq[r, t]) - p[r, t + 1]).sum())
    assert len(soft) > 5
    np.testing.assert_allclose(float(loss), np.mean(soft), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), np.mean(soft), rtol=1e-5)
    np.testing.assert_allclose(float(m["ce"]), np.mean(hard), rtol=1e-5)
    np.testing.assert_allclose(float(m["tv"]), np.mean(tv), rtol=1e-5)
    np.testing.assert_allclose(float(m["accept_rate"]), 1 - np.mean(tv) / 2, rtol=1e-5)
    assert float(m["weight"]) == len(soft) and float(m["kl"]) >= 0


def test_ttt_steps_match_teacher_forced_chain_drafting(tgt, monkeypatch):
    """Step j at chain start t == the (j+1)-th draft distribution of ingest(0..t) + propose
    at temperature 1, with propose's draws forced to the data (x_{t+2}, x_{t+3}, ...)."""
    tcfg, tparams = tgt
    ttt = 3
    _, drafter, params = _setup(tcfg, ttt_length=ttt, seed=3, noise=0.1)
    dparams = eagle3_objective.with_target_head(params, tparams, tcfg)
    lengths, width = [11, 9], 11
    batch = _batch(tcfg.vocab_size, lengths, width, seed=1)
    ids = batch["input_ids"]
    _, _, taps = target.forward(tcfg, tparams, ids, batch["lengths"], None, drafter.tap_layers)
    feats = jnp.concatenate(taps, -1)
    hiddens = eagle3_objective.ttt_hidden(drafter, dparams, feats, ids, batch["lengths"], ttt)
    q_ttt = [np.asarray(jax.nn.softmax(drafter.module.apply({"params": dparams}, h, method="logits")))
             for h in hiddens]
    assert np.abs(q_ttt[1] - q_ttt[0]).max() > 1e-3  # the chain steps are not trivial copies

    b = len(lengths)
    keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
    # propose draws step k with split(keys[b], gamma)[k]: recognise the key, return the data
    table = jax.random.key_data(jax.vmap(lambda k: jax.random.split(k, ttt))(keys))  # [B, G, 2]
    forced = {}

    def forced_sample_rows(step_keys, probs):
        hit = jnp.all(jax.random.key_data(step_keys)[:, None, :] == table, axis=-1)  # [B, G]
        return jnp.take_along_axis(forced["tokens"], jnp.argmax(hit, axis=1)[:, None], axis=1)[:, 0]

    monkeypatch.setattr(eagle3, "sample_rows", forced_sample_rows)
    sampling = SamplingParams.make(b, 1.0)
    nxt = eagle3_objective.shift_left(ids, 1)

    @jax.jit
    def chain(t, tokens):  # ingest positions 0..t, then draft gamma tokens
        forced["tokens"] = tokens  # read while this function is traced
        cache = drafter.ingest(dparams, None, drafter.init_cache(b, 32), feats, nxt,
                               jnp.zeros(b, jnp.int32), jnp.full((b,), t + 1, jnp.int32))
        return drafter.propose(dparams, None, cache, ids[:, t + 1], cache.kv.lengths, sampling, keys)[:2]

    ids_np = np.asarray(ids)
    for t in range(0, min(lengths) - ttt - 1):
        tokens = ids_np[:, t + 2:t + 2 + ttt]
        draft, q = chain(t, tokens)
        np.testing.assert_array_equal(draft, tokens)
        for j in range(ttt):
            np.testing.assert_allclose(q[:, j], q_ttt[j][:, t], atol=2e-6, err_msg=f"t={t} step {j}")


def _chat_lines(path, n):
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "the", "cat", "sat"]
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words, 4))
            a = " ".join(words[(i + k) % len(words)] for k in range(12))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


def test_tiny_training_run_exports_a_lossless_drafter(tgt, tmp_path):
    tcfg, tparams = tgt
    src = str(tmp_path / "chat.jsonl")
    _chat_lines(src, 8)
    data.build(name="chat", sources={"train": [src]}, tokenizer_dir=TIED, data_dir=str(tmp_path / "data"))
    cfg = TrainConfig(target=TIED, data_dir=str(tmp_path / "data"), dataset="chat", drafter="eagle3",
                      draft_layers=1, block_size=3, ttt_length=2, seq_len=48, batch_size=4, steps=20,
                      lr=1e-2, warmup_frac=0.1, out_dir=str(tmp_path / "run"), ckpt_every=20,
                      log_every=1, async_checkpoint=False)
    state, drafter = trainer.run(cfg, progress=False)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    losses, kl = [m["loss"] for m in logs], [m["kl"] for m in logs]
    assert len(losses) == 20 and all(np.isfinite(losses))
    # the soft CE cannot fall below the target's entropy; its excess (the KL) can
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    assert np.mean(kl[-3:]) < 0.6 * np.mean(kl[:3]), kl
    assert logs[-1]["accept_rate"] > logs[0]["accept_rate"] + 0.1
    assert {"ce", "tv", "accept_rate", "weight", "grad_norm"} <= logs[0].keys()

    folder = str(tmp_path / "run" / "drafter")
    loaded, lparams = drafters.load(folder, tcfg)
    assert loaded.kind == "eagle3" and loaded.gamma == 3 and loaded.tap_layers == drafter.tap_layers
    np.testing.assert_array_equal(lparams["fc"]["kernel"], np.asarray(state.params["fc"]["kernel"]))
    np.testing.assert_array_equal(lparams["embed_tokens"]["embedding"],
                                  np.asarray(tparams["embed_tokens"]["embedding"]))
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 100, 200, 300, 50]]
    kw = dict(max_new_tokens=12, sampling=SamplingParams.make(2, 0.0), seeds=[0, 1])
    plain = [c.token_ids for c in generation.generate(tcfg, tparams, prompts, **kw)]
    spec = generation.generate(tcfg, tparams, prompts, drafter=loaded, dparams=lparams, **kw)
    assert [c.token_ids for c in spec] == plain
