"""train.pretrain: packed rows, a killed run resumes bit for bit, the export loads and can be
continued, and a checkpoint or a folder of another shape is refused in one line."""

import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

from dspark_jax import target
from dspark_jax.config import Qwen3Config
from dspark_jax.errors import DSparkError
from tests.conftest import FIXTURES
from tests.test_training import metrics, synthetic_chats
from train import data, pretrain

TOKENIZER = os.path.join(FIXTURES, "qwen3_tiny_tied")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    synthetic_chats(root / "train.jsonl", n=64)
    data.build(name="count", sources={"train": [str(root / "train.jsonl")]}, tokenizer_dir=TOKENIZER,
               data_dir=str(root))
    return str(root)


def config(corpus, out, **kw):
    model = Qwen3Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0,
                        tie_word_embeddings=True, max_position_embeddings=128)
    base = dict(tokenizer_dir=TOKENIZER, data_dir=corpus, dataset="count", model=model, seq_len=32, batch_size=4,
                pack=True, steps=8, lr=3e-3, out_dir=str(out), ckpt_every=2, log_every=1, async_checkpoint=False)
    return pretrain.PretrainConfig(**dict(base, **kw))


def test_killed_pretraining_resumes_bit_for_bit_and_exports(corpus, tmp_path):
    full = config(corpus, tmp_path / "full")
    folder = pretrain.run(full, progress=False)
    killed = config(corpus, tmp_path / "killed")
    assert pretrain.run(killed, progress=False, stop_after=5) is None     # checkpoint of step 4 survives
    assert pretrain.run(killed, progress=False) is not None               # resumes at step 4
    assert [m["loss"] for m in metrics(full.out_dir)] == [m["loss"] for m in metrics(killed.out_dir)]
    losses = [m["loss"] for m in metrics(full.out_dir)]
    assert losses[-1] < losses[0], losses
    a = target.load(folder, "float32")[1]
    b = target.load(os.path.join(killed.out_dir, "model"), "float32")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:   # stored in bfloat16
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))

    more = config(corpus, tmp_path / "more", init_from=folder, steps=4, seed=1)   # continues the export
    pretrain.run(more, progress=False)
    assert metrics(more.out_dir)[0]["loss"] < losses[0] - 0.5, (metrics(more.out_dir)[0], losses)
    wider = config(corpus, tmp_path / "wider", init_from=folder, model=full.model.replace(hidden_size=48))
    with pytest.raises(DSparkError, match=r"init_from .*another architecture \(hidden_size 32 there, 48 now"):
        pretrain.run(wider, progress=False)

    other = config(corpus, tmp_path / "killed", model=full.model.replace(hidden_size=48))
    with pytest.raises(DSparkError, match=r"another architecture.*model.hidden_size 32 there, 48 now"):
        pretrain.run(other, progress=False)
