"""Command-line conventions: every tool's --help shows each option's default once (never
"None"); serve.generate says "did you mean --chat?" once when a plain prompt's completion
ends at its first token on a target with a chat template; the demo recipe records paths
relative to the repository."""

import argparse
import contextlib
import glob
import importlib
import io
import json
import os
import re
import shutil

import pytest

from dspark_jax.errors import DefaultsFormatter
from serve import generate
from tests.conftest import FIXTURES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIED = os.path.join(FIXTURES, "qwen3_tiny_tied")
HINT = "did you mean --chat?"


def cli_modules() -> list[str]:
    """Every `python -m` tool under serve/ and train/: modules with a main() run as __main__."""
    out = []
    for pattern in ("serve/*.py", "train/*.py", "train/demo/*.py"):
        for path in sorted(glob.glob(os.path.join(REPO, pattern))):
            with open(path) as f:
                text = f.read()
            if "def main(" in text and '__name__ == "__main__"' in text:
                out.append(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    return out


def option_entries(help_text: str) -> dict[str, str]:
    """The help text of each option (its lines joined), by the option's first spelling."""
    entries, current = {}, None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current is not None and line.startswith("   ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_the_tools_are_found():
    mods = cli_modules()
    assert {"serve.generate", "serve.server", "train.train", "train.demo.recipe"} <= set(mods)
    assert len(mods) >= 18


@pytest.mark.parametrize("module", cli_modules())
def test_help_shows_each_default_once(module, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "(default: " in flat, out
    assert "default: None" not in flat and "(default: [])" not in flat, out
    assert REPO not in flat, "a default printed as this machine's absolute path"
    entries = option_entries(out)
    assert entries, out
    for option, text in entries.items():
        assert len(re.findall(r"\bdefault\b", text, re.IGNORECASE)) <= 1, f"{module} {option}: {text}"


def test_generate_help_prints_defaults_of_options_without_help(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    entries = option_entries(capsys.readouterr().out)
    assert entries["--max-new-tokens"].endswith("(default: 64)")
    assert entries["--mesh"].endswith("(default: 1x1)")
    assert "(default: the drafter's)" in entries["--gamma"]
    assert "default" not in entries["--chat"]


def test_formatter_rules():
    p = argparse.ArgumentParser(prog="x", formatter_class=DefaultsFormatter)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--levels", nargs="+", type=int, default=[1, 2], help="levels")
    p.add_argument("--gamma", type=int, default=None, help="block (default: the drafter's)")
    p.add_argument("--share", default="40%", help="share")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--need", required=True, help="needed")
    p.add_argument("--item", action="append", default=[], help="repeatable")
    entries = option_entries(p.format_help())
    assert entries["--n"].endswith("(default: 3)")
    assert entries["--levels"].endswith("levels (default: 1 2)")
    assert entries["--gamma"].endswith("block (default: the drafter's)")
    assert entries["--share"].endswith("share (default: 40%)")
    for name in ("--flag", "--need", "--item"):
        assert "default" not in entries[name], entries[name]


# --- serve.generate: "did you mean --chat?" ----------------------------------------------


def run_json(capsys, *argv) -> tuple[list[dict], str]:
    """serve.generate --json: (records, stderr)."""
    generate.main([*argv, "--json"])
    cap = capsys.readouterr()
    assert HINT not in cap.out
    return [json.loads(line) for line in cap.out.splitlines()], cap.err


def copy_target(root, name: str, stop_id: int, chat_template: bool) -> str:
    """The tiny target with `stop_id` as its stop token, with or without its chat template."""
    folder = str(root / name)
    shutil.copytree(TIED, folder)
    path = os.path.join(folder, "generation_config.json")
    with open(path) as f:
        gen = json.load(f)
    with open(path, "w") as f:
        json.dump({**gen, "eos_token_id": stop_id}, f)
    if not chat_template:
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path) as f:
            tok = json.load(f)
        del tok["chat_template"]
        with open(path, "w") as f:
            json.dump(tok, f)
    return folder


@pytest.fixture(scope="module")
def eos_first(tmp_path_factory):
    """Copies of the tiny chat-template target whose stop token is the greedy first token
    after 'the cat', so a plain prompt's completion ends at its first token."""
    from dspark_jax.tokenizer import Tokenizer

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(["--target", TIED, "--prompt", "the cat", "--max-new-tokens", "1", "--ignore-eos", "--json"])
    stop = json.loads(out.getvalue().splitlines()[0])["token_ids"][0]
    assert stop not in Tokenizer(TIED).stop_ids
    root = tmp_path_factory.mktemp("eos_first")
    return {"stop": stop, "ids": ",".join(map(str, Tokenizer(TIED).encode("the cat"))),
            "chat": copy_target(root, "chat", stop, True), "plain": copy_target(root, "plain", stop, False)}


def test_eos_first_with_a_chat_template_asks_once(capsys, eos_first):
    recs, err = run_json(capsys, "--target", eos_first["chat"], "--prompt", "the cat", "--num-samples", "2",
                         "--max-new-tokens", "4")
    assert [(r["token_ids"], r["finish_reason"]) for r in recs] == [([eos_first["stop"]], "stop")] * 2
    assert err.count(HINT) == 1, err
    assert "2 of 2 completions ended at their first token" in err


@pytest.mark.parametrize("case", ["with --chat", "no chat template", "token ids", "not at the first token"])
def test_no_chat_hint(capsys, eos_first, case):
    argv = {"with --chat": ["--target", eos_first["chat"], "--prompt", "the cat", "--chat"],
            "no chat template": ["--target", eos_first["plain"], "--prompt", "the cat"],
            "token ids": ["--target", eos_first["chat"], "--prompt-ids", eos_first["ids"]],
            "not at the first token": ["--target", TIED, "--prompt", "the cat"]}[case]
    recs, err = run_json(capsys, *argv, "--max-new-tokens", "4")
    if case in ("no chat template", "token ids"):
        assert recs[0]["token_ids"] == [eos_first["stop"]]  # ended at its first token, yet no hint
    if case == "not at the first token":
        assert len(recs[0]["token_ids"]) > 1
    assert HINT not in err, err


# --- the demo recipe's record ------------------------------------------------------------


def absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


def test_recipe_records_repository_relative_paths(tmp_path):
    from train.demo import recipe

    rec = recipe.recipe_record(recipe.parse_args([]))
    assert absolute_paths(rec) == []
    drafter = rec["drafter"]
    assert (drafter["target"], drafter["data_dir"], drafter["out_dir"]) == (
        "artifacts/demo/target", "work/demo/data", "work/demo/runs/dspark")
    assert os.path.isdir(os.path.join(REPO, drafter["target"]))
    scratch = str(tmp_path / "scratch")
    outside = recipe.recipe_record(recipe.parse_args(["--work", scratch]))
    assert outside["drafter"]["data_dir"] == os.path.join(scratch, "data")  # outside the repository: as given


def test_committed_recipe_has_no_machine_paths():
    from train.demo import recipe

    with open(os.path.join(REPO, "artifacts", "demo", "RECIPE.json")) as f:
        committed = json.load(f)
    assert absolute_paths(committed) == []
    fresh = recipe.recipe_record(recipe.parse_args([]))
    for key in ("target", "data_dir", "out_dir"):
        assert committed["drafter"][key] == fresh["drafter"][key]
