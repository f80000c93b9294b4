"""`python -m serve.generate`: output records, and bad input -> one line, exit status 2."""

import json
import os
import subprocess
import sys

import pytest

from serve import generate
from tests.conftest import FIXTURES

TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv):
    generate.main(list(argv))
    return capsys.readouterr().out


def test_json_records_plain_decoding(capsys):
    out = run_cli(capsys, "--target", TIED, "--prompt-ids", "1,2,3", "--prompt", "the cat",
                  "--max-new-tokens", "6", "--json", "--ignore-eos", "--num-samples", "2")
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:
        assert len(r["token_ids"]) == 6 and r["rounds"] == 5 and r["tau"] == 1.0
        assert set(r) >= {"text", "accepted_per_position", "tokens_per_second"}
    # greedy: both samples of one prompt agree
    assert recs[0]["token_ids"] == recs[1]["token_ids"]


def test_text_mode_streams_and_summarises(capsys):
    out = run_cli(capsys, "--target", TIED, "--prompt", "Hello", "--chat", "--max-new-tokens", "5")
    assert "[prompt 0 sample 0]" in out and out.strip().splitlines()[-1].startswith("-- drafter none  tau")


@pytest.mark.parametrize("argv,needle", [
    (["--prompt-ids", ""], "prompt 0 is empty"),
    (["--drafter", "none"], "no prompt given"),
    (["--prompt", "  "], "prompt 0 is empty"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt-ids", "1", "--mesh", "8by1"], "DATAxMODEL"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be"),
    (["--prompt-ids", "1", "--top-p", "0"], "top-p must be"),
    (["--prompt-ids", "1", "--prompt-file", "/nonexistent/p.txt"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        generate.main(["--target", TIED] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_unknown_drafter_and_missing_target_subprocess(tmp_path):
    for argv, needle in [(["--target", TIED, "--drafter", "medusa", "--prompt-ids", "1"], "invalid choice"),
                         (["--target", str(tmp_path), "--prompt-ids", "1"], "missing")]:
        proc = subprocess.run([sys.executable, "-m", "serve.generate", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
