"""The engine serves DeepSeek-V4 targets: speculative rounds with rejections over the
V4 cache reproduce transformers' greedy tokens, and the parameters and cache placed on a
mesh by their logical axes (experts split over the expert axis) give transformers' logits."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import generation, target
from dspark_jax import mesh as mesh_lib
from dspark_jax.models.deepseek_v4 import DEEPSEEK_V4_CACHE_AXES
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES
from tests.helpers import OracleDrafter

NAME = "deepseek_v4_tiny_a"
GAMMA = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    folder = os.path.join(FIXTURES, NAME)
    cfg, params = target.load(folder, "float32")
    g = dict(np.load(os.path.join(folder, "golden.npz")))
    seqs = [list(g["prompt_ids"][b, :n]) for b, n in enumerate(g["prompt_lengths"])]
    return cfg, params, g, seqs


def test_engine_speculation_with_oracle_drafter_equals_greedy(model):
    """The engine drives the V4 cache (`.lengths`, `replace`): an oracle drafter wrong 30%
    of the time makes verify steps of up to gamma + 1 tokens that complete windows and are
    partly rejected; the output is still transformers' greedy continuation."""
    cfg, params, g, seqs = model
    new = 12
    ref = [g["greedy_0"][:new].tolist(), g["greedy_1"][:new].tolist()]
    width = max(len(p) for p in seqs) + new + GAMMA + 2
    toks = np.zeros((2, width), np.int32)
    for i, (p, r) in enumerate(zip(seqs, ref)):
        toks[i, :len(p + r)] = p + r
    corrupt = np.random.default_rng(0).random(toks.shape) < 0.3
    comps = generation.generate(cfg, params, seqs, max_new_tokens=new, sampling=SamplingParams.make(2),
                                seeds=range(2), drafter=OracleDrafter(GAMMA, cfg.vocab_size), gamma=GAMMA,
                                dparams={"ref": jnp.asarray(toks), "corrupt": jnp.asarray(corrupt)})
    assert [c.token_ids for c in comps] == ref
    assert max(c.tau for c in comps) > 2.0  # real multi-token acceptances happened



def test_sharded_2x4_prefill_equals_transformers(model):
    """Parameters on their logical axes (experts over `model`, heads / vocab split) and
    the cache on DEEPSEEK_V4_CACHE_AXES (batch over `data`): the golden logits."""
    cfg, params, g, seqs = model
    lens = [20, 13]
    toks = np.zeros((2, 24), np.int32)
    for b in range(2):
        toks[b, :lens[b]] = seqs[b][:lens[b]]
    mesh = mesh_lib.make_mesh("2x4")
    cache = mesh_lib.shard_tree(target.init_cache(cfg, 2, 32), DEEPSEEK_V4_CACHE_AXES, mesh)
    got, cache, _ = target.prefill(cfg, target.shard(cfg, params, mesh), jnp.asarray(toks), jnp.asarray(lens),
                                   cache)
    for b in range(2):
        assert np.abs(np.asarray(got)[b] - g[f"logits_{b}"][lens[b] - 1]).max() <= TOL
    assert cache.kv.sharding.spec[1] == "data"
