"""The packed pretraining loader: rows are the permuted conversations end to end."""

import numpy as np
import pytest

from dspark_jax.errors import DSparkError
from train.loader import PackedLoader


def _source(n=23, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 20))
        out.append({"input_ids": np.arange(k, dtype=np.int32) + 100 * (i + 1),
                    "loss_mask": (np.arange(k) % 2).astype(np.int32)})
    return out


def test_rows_are_the_epoch_stream_cut_into_rows():
    src = _source()
    loader = PackedLoader(src, global_batch=2, seq_len=8)
    order = np.random.default_rng([0, 0]).permutation(len(src))
    stream = np.concatenate([src[i]["input_ids"] for i in order])
    masks = np.concatenate([src[i]["loss_mask"] for i in order])
    for step in range(loader.steps_per_epoch):
        b = loader.batch(step)
        lo = step * 16
        assert (b["input_ids"].reshape(-1) == stream[lo:lo + 16]).all()
        assert (b["loss_mask"].reshape(-1) == masks[lo:lo + 16]).all()
        assert (b["lengths"] == 8).all()
    # the next epoch draws a new order; a fresh loader (a resumed run) gives the same batch
    step = loader.steps_per_epoch + 1
    assert (PackedLoader(src, global_batch=2, seq_len=8).batch(step)["input_ids"] == loader.batch(step)["input_ids"]).all()
    assert not (loader.batch(step)["input_ids"] == loader.batch(1)["input_ids"]).all()


def test_hosts_split_the_global_batch():
    src = _source()
    whole = PackedLoader(src, global_batch=4, seq_len=6).batch(3)["input_ids"]
    parts = [PackedLoader(src, global_batch=4, seq_len=6, process_index=p, process_count=2).batch(3)["input_ids"]
             for p in range(2)]
    assert (np.concatenate(parts) == whole).all()


def test_too_little_data_and_foreign_ids_are_refused():
    with pytest.raises(DSparkError, match="fewer than one packed batch"):
        PackedLoader(_source(2), global_batch=4, seq_len=64)
    with pytest.raises(DSparkError, match="outside the target's vocabulary"):
        PackedLoader(_source(), global_batch=2, seq_len=8, vocab_size=50).batch(0)
