"""Training guards: each trap of a training run ends in one clear line (exit 2 from the
CLI) before anything broken is written, and the bookkeeping around resumes is exact."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dspark_jax import target
from dspark_jax.drafters.folders import STS_FILE
from dspark_jax.errors import DSparkError
from tests.conftest import FIXTURES, cpu_env
from tests.helpers import make_block_drafter, write_block_drafter
from train import data, evaluate, memory, step as step_lib, trainer
from train.config import TrainConfig

TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")        # vocabulary 384
UNTIED = os.path.join(FIXTURES, "qwen3_tiny_untied")    # vocabulary 512, another tokenizer.json
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "artifacts", "demo", "target")  # vocabulary 2048


def chats(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            start = int(rng.integers(0, 50))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count from {start}"},
                                             {"role": "assistant",
                                              "content": " ".join(str(start + k) for k in range(12))}]}) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    chats(root / "train.jsonl", 24)
    chats(root / "val.jsonl", 8, seed=1)
    return root


def build(root, name, tokenizer):
    data.build(name=name, sources={"train": [str(root / "train.jsonl")], "validation": [str(root / "val.jsonl")]},
               tokenizer_dir=tokenizer, data_dir=str(root / "data"))
    return str(root / "data")


@pytest.fixture(scope="module")
def tied(root):
    return build(root, "tied", TIED)


def config(data_dir, dataset, out, **kw):
    base = dict(target=TIED, data_dir=data_dir, dataset=dataset, steps=2, batch_size=8, seq_len=64, num_anchors=8,
                block_size=4, markov_rank=16, lr=3e-3, out_dir=str(out), ckpt_every=2, log_every=1,
                async_checkpoint=False)
    base.update(kw)
    return TrainConfig(**base)


def train_cli(cfg, tmp_path):
    sets = [a for k, v in json.loads(cfg.to_json()).items()
            for a in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]
    env = cpu_env(1)
    return subprocess.run([sys.executable, "-m", "train.train", "--no-progress"] + sets, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc):
    """The CLI's stderr ends in exactly one `train.train: error:` line and no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def checkpoint_steps(out):
    folder = os.path.join(out, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def logged_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_build_is_quiet_and_records_its_tokenizer(root, capfd):
    build(root, "quiet", TIED)
    out, err = capfd.readouterr()
    for chatter in ("Downloading and preparing", "downloaded and prepared", "Using custom data configuration"):
        assert chatter not in out + err, out + err
    assert re.search(r"warning: the validation split of 'quiet' has 8 example\(s\), fewer than 32", err), err
    rec = json.load(open(os.path.join(data.dataset_path(str(root / "data"), "quiet"), data.RECORD)))
    assert rec["vocab_size"] <= 384 and len(rec["tokenizer_sha256"]) == 64


def test_dataset_of_another_tokenizer_is_refused(root, tied, tmp_path):
    # ids fit the untied target's vocabulary, but the tokenizer is not its own: only the record tells
    with pytest.raises(DSparkError, match=r"dataset 'tied' was tokenized by .*tokenizer.json differs"):
        trainer.run(config(tied, "tied", tmp_path / "a", target=UNTIED), progress=False)
    untied = build(root, "untied", UNTIED)
    with pytest.raises(DSparkError, match=r"larger than the target's vocabulary 384"):
        trainer.run(config(untied, "untied", tmp_path / "b"), progress=False)
    for run in ("a", "b"):
        assert checkpoint_steps(tmp_path / run) == [] and not (tmp_path / run / "drafter").exists()


def test_old_dataset_with_ids_past_the_vocabulary_is_refused(root, tmp_path):
    demo = build(root, "demo_tok", DEMO)
    os.remove(os.path.join(data.dataset_path(demo, "demo_tok"), data.RECORD))     # as built before the record
    train = data.load(demo, "demo_tok")["train"]
    assert max(int(np.max(train[i]["input_ids"])) for i in range(len(train))) >= 384
    with pytest.raises(DSparkError, match=r"token id \d+, outside the target's vocabulary \[0, 384\)"):
        trainer.run(config(demo, "demo_tok", tmp_path / "run", batch_size=24), progress=False)
    assert checkpoint_steps(tmp_path / "run") == [] and not (tmp_path / "run" / "drafter").exists()


def test_non_finite_loss_stops_the_run_before_any_checkpoint_of_it(tied, tmp_path):
    # checkpoints every step, logs only at the end: the check before each save must catch it
    cfg = config(tied, "tied", tmp_path / "run", lr=1e30, steps=8, ckpt_every=1, log_every=100)
    line = one_error_line(train_cli(cfg, tmp_path))
    m = re.search(r"not finite at step (\d+)", line)
    assert m, line
    bad = int(m.group(1))
    assert 1 <= bad <= 8 and "nothing exported" in line
    assert all(s < bad for s in checkpoint_steps(cfg.out_dir)), (bad, checkpoint_steps(cfg.out_dir))
    assert not os.path.exists(os.path.join(cfg.out_dir, "drafter"))


def test_step_over_the_memory_limit_is_refused_before_the_first_step(tied, tmp_path):
    cfg = config(tied, "tied", tmp_path / "run", memory_limit_mb=1)
    line = one_error_line(train_cli(cfg, tmp_path))
    assert re.search(r"needs about [\d.]+ MiB per device \(.*; from the compiled step\) but a device has 1.0 MiB "
                     r"\(memory_limit_mb\); lower batch_size \(8\), seq_len \(64\)", line), line
    assert checkpoint_steps(cfg.out_dir) == [] and not os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl"))


def test_state_over_the_memory_limit_is_refused_before_it_is_allocated(root, tmp_path):
    demo = build(root, "demo_state", DEMO)     # the demo target's parameters alone are over 5 MiB
    cfg = config(demo, "demo_state", tmp_path / "run", target=DEMO, memory_limit_mb=5)
    with pytest.raises(DSparkError, match=r"per device \(drafter params \+ grads .*, target [\d.]+ MiB; "
                                          r"from the eval_shape\) but a device has 5.0 MiB"):
        trainer.run(cfg, progress=False)
    assert checkpoint_steps(cfg.out_dir) == []


def test_memory_estimate_counts_one_batch_of_activations(tied, tmp_path):
    small = config(tied, "tied", tmp_path / "s")
    mesh, tcfg, tparams, drafter, state, train_step, loader = trainer.setup(small)
    tx = step_lib.optimizer(small)
    a = memory.abstract_estimate(small, drafter, tcfg, tx, tparams, mesh)
    b = memory.abstract_estimate(small.replace(batch_size=16), drafter, tcfg, tx, tparams, mesh)
    # parameters and optimizer state do not depend on the batch; the activations scale with it
    assert a.parts["drafter params + grads"] == b.parts["drafter params + grads"] > 0
    assert 1.5 < b.parts["activations"] / a.parts["activations"] <= 2.05
    compiled = memory.compiled_estimate(train_step, state, tparams, trainer.global_batch(loader.batch(0), mesh))
    assert compiled is not None and compiled.peak > a.parts["drafter params + grads"] + a.parts["optimizer"]
    assert memory.device_limit(small, mesh)[0] > compiled.peak      # this host runs the tests' step


def test_resume_with_other_parameter_shapes_is_one_line(tied, tmp_path):
    cfg = config(tied, "tied", tmp_path / "run")
    trainer.run(cfg, progress=False, export=False)
    with pytest.raises(DSparkError, match=r"draft_layers 1 there, 2 now.*start fresh use a new out_dir"):
        trainer.run(cfg.replace(draft_layers=2, steps=4), progress=False)


def test_continuing_a_calibrated_run(tied, tmp_path, capsys):
    cfg = config(tied, "tied", tmp_path / "run")
    trainer.run(cfg, progress=False)
    drafter_dir = os.path.join(cfg.out_dir, "drafter")
    with open(os.path.join(drafter_dir, STS_FILE), "w") as f:
        json.dump({"temperatures": [1.0] * 4}, f)
    capsys.readouterr()
    trainer.run(cfg.replace(steps=4), progress=False)
    out = capsys.readouterr().out
    assert "resuming from step 2 of 4" in out
    assert f"moved the old {STS_FILE}" in out
    assert not os.path.exists(os.path.join(drafter_dir, STS_FILE))
    assert os.path.exists(os.path.join(drafter_dir, trainer.STALE_STS))
    assert logged_steps(cfg.out_dir) == [1, 2, 3, 4]


def test_log_is_cut_back_when_the_first_checkpoint_was_lost(tied, tmp_path):
    cfg = config(tied, "tied", tmp_path / "run")
    os.makedirs(cfg.out_dir)
    # killed while the first checkpoint was being written: rows logged, no checkpoint kept
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 9.0}) + "\n" + json.dumps({"step": 2, "loss": 8.0}) + '\n{"step": ')
    trainer.run(cfg, progress=False, export=False)
    assert logged_steps(cfg.out_dir) == [1, 2]


def test_small_validation_split_warns_at_evaluate_time(tied, tmp_path, capfd):
    tcfg, tparams = target.load(TIED)
    drafter, dparams = make_block_drafter(tcfg, taps=(0,))
    folder = write_block_drafter(tmp_path / "drafter", TIED, tparams, drafter, dparams)
    capfd.readouterr()
    evaluate.main(["--target", TIED, "--draft", folder, "--data-dir", tied, "--dataset", "tied",
                   "--split", "validation", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    err = capfd.readouterr().err
    assert "warning: split 'validation' of 'tied' has 8 example(s), fewer than 32" in err, err
