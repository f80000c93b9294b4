"""Regeneration resumes after a kill from its last finished chunk, with the same answers."""

import json
import os
import types

import pytest

from tests.conftest import FIXTURES
from train import regen

TARGET = os.path.join(FIXTURES, "qwen3_tiny_tied")


def _args(tmp_path, out):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} about {w}"}],
                                               "domain": "math"}) + "\n"
                                   for i, w in enumerate(["sums", "code", "text", "loops"])))
    return types.SimpleNamespace(target=TARGET, draft=None, prompts=str(prompts), out=str(out), max_new_tokens=6,
                                 temperature=1.0, top_k=0, top_p=1.0, seed=3, batch_size=2, limit=0, name=None,
                                 data_dir=None, val_fraction=0.05)


def test_a_killed_regeneration_resumes_with_the_same_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(regen, "CHUNK_BATCHES", 1)   # chunks of one batch: 2 prompts each
    whole = tmp_path / "whole.jsonl"
    regen.regenerate(_args(tmp_path, whole))
    assert not os.path.exists(str(whole) + ".progress")
    assert [len(json.loads(line)["messages"]) for line in whole.read_text().splitlines()] == [2] * 4

    real, calls = regen._answer, []

    def dies_on_the_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    killed = tmp_path / "killed.jsonl"
    monkeypatch.setattr(regen, "_answer", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(_args(tmp_path, killed))
    assert not killed.exists()
    monkeypatch.setattr(regen, "_answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    regen.regenerate(_args(tmp_path, killed))
    assert len(calls) == 2 + 1          # the resumed run answered the chunk left, not the first again
    assert killed.read_text() == whole.read_text()

    # a run killed under other settings leaves progress that is not reused
    calls.clear()
    monkeypatch.setattr(regen, "_answer", dies_on_the_second_chunk)
    other = _args(tmp_path, killed)
    other.seed = 4
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(other)
    monkeypatch.setattr(regen, "_answer", real)
    regen.regenerate(_args(tmp_path, killed))
    assert killed.read_text() == whole.read_text()
