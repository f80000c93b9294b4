"""Training: the loss falls, kill-and-resume is bit-exact, sharded == single device,
and a 2-process jax.distributed run matches a 1-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dspark_jax import drafters, generation, target
from dspark_jax.sampling import SamplingParams
from tests.conftest import FIXTURES, cpu_env
from train import data, trainer
from train.config import TrainConfig, load_config

TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_chats(path, n=48, seed=0):
    """Deterministic, learnable answers: counting sequences in words and digits."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            start = int(rng.integers(0, 50))
            answer = " ".join(str(start + k) for k in range(12))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count from {start}"},
                                             {"role": "assistant", "content": answer}],
                                "domain": "math" if i % 2 else "chat"}) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic_chats(root / "train.jsonl")
    synthetic_chats(root / "val.jsonl", n=8, seed=1)
    data.build(name="count", sources={"train": [str(root / "train.jsonl")], "validation": [str(root / "val.jsonl")]},
               tokenizer_dir=TIED, data_dir=str(root))
    return str(root)


def config(dataset, out, **kw):
    base = dict(target=TIED, data_dir=dataset, dataset="count", steps=30, batch_size=8, seq_len=64,
                num_anchors=8, block_size=4, markov_rank=16, lr=3e-3, out_dir=str(out), ckpt_every=10,
                log_every=5, async_checkpoint=False)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_export_runs(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "run")
    trainer.run(cfg, progress=False)
    losses = [m["loss"] for m in metrics(cfg.out_dir)]
    assert losses[-1] < 0.9 * losses[0], losses
    tcfg, tparams = target.load(TIED)
    drafter, dparams = drafters.load(os.path.join(cfg.out_dir, "drafter"), tcfg)
    assert drafter.kind == "dspark" and drafter.gamma == 4
    prompts = [[1, 5, 9, 12], [2, 3]]
    sp = SamplingParams.make(2)
    plain = generation.generate(tcfg, tparams, prompts, max_new_tokens=10, sampling=sp, seeds=[0, 1])
    spec = generation.generate(tcfg, tparams, prompts, max_new_tokens=10, sampling=sp, seeds=[0, 1],
                               drafter=drafter, dparams=dparams)
    assert [c.token_ids for c in plain] == [c.token_ids for c in spec]


def test_kill_and_resume_is_bit_exact(dataset, tmp_path):
    full = config(dataset, tmp_path / "full", steps=12, ckpt_every=4, log_every=2)
    state_a, _ = trainer.run(full, progress=False)
    killed = full.replace(out_dir=str(tmp_path / "killed"))
    trainer.run(killed, progress=False, stop_after=6)      # last checkpoint at step 4; steps 5-6 lost
    state_b, _ = trainer.run(killed, progress=False)        # resumes from step 4
    assert int(state_b.step) == 12
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["loss"] for m in metrics(full.out_dir)] == [m["loss"] for m in metrics(killed.out_dir)]


def test_eight_devices_match_one(dataset, tmp_path):
    one, _ = trainer.run(config(dataset, tmp_path / "one", steps=6, mesh="1x1"), progress=False, export=False)
    eight, _ = trainer.run(config(dataset, tmp_path / "eight", steps=6, mesh="8x1"), progress=False, export=False)
    four_two, _ = trainer.run(config(dataset, tmp_path / "fourtwo", steps=6, mesh="4x2"), progress=False,
                              export=False)
    for a, b, c in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), jax.tree.leaves(four_two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5, rtol=1e-4)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from train.config import TrainConfig\nCONFIG = TrainConfig(target='T', data_dir='D', dataset='x')\n")
    cfg = load_config(str(path), ["steps=7", "target_layer_ids=1,2", "confidence_head=false", "lr=1e-3"])
    assert cfg.steps == 7 and cfg.target_layer_ids == (1, 2) and not cfg.confidence_head and cfg.lr == 1e-3
    from dspark_jax.errors import DSparkError

    for bad in (["nope=1"], ["steps=abc"], ["steps"], ["drafter=medusa"]):
        with pytest.raises(DSparkError):
            load_config(str(path), bad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_matches_single_process(dataset, tmp_path):
    sets = [f"target={TIED}", f"data_dir={dataset}", "dataset=count", "steps=4", "batch_size=8", "seq_len=64",
            "num_anchors=8", "block_size=4", "markov_rank=16", "lr=3e-3", "ckpt_every=2", "log_every=2",
            "mesh=4x1", "async_checkpoint=false"]
    env = cpu_env(2)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train.train", "--no-progress", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)] + [a for s in sets + [f"out_dir={tmp_path / 'multi'}"]
                                                          for a in ("--set", s)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    env1 = cpu_env(4)
    single = subprocess.run([sys.executable, "-m", "train.train", "--no-progress"] +
                            [a for s in sets + [f"out_dir={tmp_path / 'single'}"] for a in ("--set", s)],
                            cwd=REPO, env=env1, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    from dspark_jax.safetensors_io import open_folder

    a = open_folder(str(tmp_path / "multi" / "drafter"))
    b = open_folder(str(tmp_path / "single" / "drafter"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), atol=2e-5, rtol=1e-4)
    la = [m["loss"] for m in metrics(tmp_path / "multi")]
    lb = [m["loss"] for m in metrics(tmp_path / "single")]
    np.testing.assert_allclose(la, lb, rtol=1e-4)
