"""The demo corpus: three domains and three disjoint splits built offline from the running
interpreter, well-formed examples (math answers checked by arithmetic, body tasks compile),
the exported chat JSONL, the byte-level tokenizer and its chat template, and the hand-off to
train.data.build."""

import ast
import json
import operator
import os
import re

import numpy as np
import pytest

from dspark_jax.tokenizer import Tokenizer
from train import data
from train.demo import corpus
from train.demo.build_corpus import parse_caps, run
from train.demo.tokenizer import SPECIAL_TOKENS, chat_text, train_tokenizer

CAPS = {"code": (40, 8, 8), "prose": (40, 8, 8), "math": (40, 8, 8)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    man = run(str(root / "data"), str(root / "out"), caps=CAPS, seed=0, vocab_size=1024, progress=False,
              log=lambda *a: None)
    return root, man


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_domains_splits_sizes_and_manifest(built):
    root, man = built
    sources = corpus.load(str(root / "data"))
    assert set(sources) == set(corpus.SPLITS)
    for d in corpus.DOMAINS:
        for i, split in enumerate(corpus.SPLITS):
            assert man["sizes"][d][split] == CAPS[d][i], (d, split)
    for split in corpus.SPLITS:
        rows = list(corpus.iter_examples(str(root / "data"), split))
        assert len(rows) == len(sources[split]) == man["totals"][split]
        assert {r["domain"] for r in rows} == set(corpus.DOMAINS)
    assert man["python"]["stdlib"] and man["sources"]["stdlib"]["files_used"] > 100
    assert man["seed"] == 0 and man["caps"]["code"] == dict(zip(corpus.SPLITS, CAPS["code"]))
    assert corpus.manifest(str(root / "data"))["sizes"] == man["sizes"]
    on_disk = read_json(root / "out" / "manifest.json")
    assert on_disk["sizes"] == man["sizes"] and "tokens" in on_disk


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_splits_are_disjoint_by_source(built):
    root, _ = built
    by_split = {s: read(root / "out" / f"{s}.jsonl") for s in corpus.SPLITS}
    srcs = {s: {r["source"] for r in rows} for s, rows in by_split.items()}
    prompts = {s: {r["messages"][0]["content"] for r in rows} for s, rows in by_split.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not srcs[a] & srcs[b], (a, b)
        assert not prompts[a] & prompts[b], (a, b)
    for s, rows in by_split.items():          # the split is a function of the source id
        assert all(corpus.split_of(r["source"], 0) == s for r in rows)
        assert len(prompts[s]) == len(rows)   # no duplicate prompts


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    assert isinstance(node, ast.BinOp)
    op = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
    return op[type(node.op)](_eval(node.left), _eval(node.right))


def check_math(prompt, answer):
    steps = re.findall(r"(\d+) (\+|-|\*|//|/) (\d+) = (-?\d+)\.", answer)
    assert steps, answer
    for a, op, b, c in steps:
        assert _OPS[op](int(a), int(b)) == int(c), (prompt, answer)
    m = re.fullmatch(r"(?:\d+ (?:\+|-|\*|//|/) \d+ = -?\d+\. )+The answer is (-?\d+)\.", answer)
    assert m, answer
    final = int(m.group(1))
    assert final >= 0
    direct = re.fullmatch(r"What is ([\d +\-*/()]+)\?", prompt)
    if direct:
        assert _eval(ast.parse(direct.group(1), mode="eval").body) == final, (prompt, answer)
    elif prompt.startswith("What is the remainder"):
        a, b = map(int, re.findall(r"\d+", prompt))
        assert a % b == final
    else:                                     # word problems: the steps start from its numbers
        numbers = set(re.findall(r"\d+", prompt))
        assert steps[0][0] in numbers and steps[0][2] in numbers, (prompt, answer)
        if "left" not in prompt and "change" not in prompt and "now" not in prompt:
            assert steps[-1][3] == str(final)
    assert steps[-1][3] == str(final) or prompt.startswith("What is the remainder")


def test_examples_are_well_formed(built):
    root, _ = built
    rows = [r for s in corpus.SPLITS for r in read(root / "out" / f"{s}.jsonl")]
    kinds = {"body": 0, "continue": 0}
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        prompt, answer, domain = user["content"], assistant["content"], r["domain"]
        assert prompt.strip() and answer.strip() and len(answer) <= corpus.MAX_ANSWER_CHARS
        if domain == "math":
            assert r["source"].startswith("generated:math/")
            check_math(prompt, answer)
        elif domain == "code":
            assert r["source"].startswith("stdlib:") and r["source"].endswith(".py")
            assert "```python\n" in prompt and prompt.endswith("\n```")
            code = prompt.split("```python\n", 1)[1][:-4]
            if prompt.startswith("Write the body of `"):
                kinds["body"] += 1
                ast.parse(code + "\n" + answer)          # header + body is a whole function
            else:
                assert prompt.startswith("Continue this Python code from ")
                kinds["continue"] += 1
        else:
            assert r["source"].startswith(("stdlib:", "pydoc_data.topics:"))
            assert answer == " ".join(answer.split()) and re.search(r"[.!?][\"')\]]?$", answer), answer
    assert kinds["body"] and kinds["continue"]


def test_math_generator_is_right_over_many_problems():
    chosen, info = corpus.math_examples({"train": 2000, "validation": 100, "test": 100}, seed=3)
    assert info["unique"] >= 2200
    for s in corpus.SPLITS:
        for e in chosen[s]:
            check_math(e["prompt"], e["answer"])


def test_exports_and_prompt_files(built):
    root, man = built
    out = root / "out"
    for s in corpus.SPLITS:
        full = read(out / f"{s}.jsonl")
        per = [r for d in corpus.DOMAINS for r in read(out / f"{s}.{d}.jsonl")]
        assert sorted(map(json.dumps, full)) == sorted(map(json.dumps, per))
        prompts = read(out / "prompts" / f"{s}.jsonl")
        assert [p["messages"] for p in prompts] == [r["messages"][:1] for r in full]
        assert [p["domain"] for p in prompts] == [r["domain"] for r in full]
        for d in corpus.DOMAINS:
            assert all(p["domain"] == d for p in read(out / "prompts" / f"{s}.{d}.jsonl"))


def test_reproducible(built):
    root, man = built
    examples, man2 = corpus.collect(corpus.Settings(caps=corpus.normalise_caps(CAPS), seed=0))
    assert man2["sizes"] == man["sizes"] and man2["sources"]["stdlib"]["sha256"] == man["sources"]["stdlib"]["sha256"]
    for s in corpus.SPLITS:
        exported = {(r["messages"][0]["content"], r["messages"][1]["content"], r["source"])
                    for r in read(root / "out" / f"{s}.jsonl")}
        assert exported == {(e["prompt"], e["answer"], e["source"]) for e in examples[s]}


def test_tokenizer(built, tmp_path):
    root, _ = built
    tok_dir = str(root / "out" / "tokenizer")
    tok = Tokenizer(tok_dir)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.stop_ids == (2,) and read_json(os.path.join(tok_dir, "generation_config.json"))["eos_token_id"] == 2
    texts = ["def f(x):\n\tif x:\n        return  x + 1   # trailing  \n\n",
             "Héllo wörld — “quotes”, ünïcode ✓ 日本語 🙂", "  leading and trailing spaces  ", "12345 + 678 = 13023.",
             "\r\nwindows\r\nlines", ""]
    texts += [r["messages"][1]["content"] for r in read(root / "out" / "validation.jsonl")]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("1234") == [tok.token_to_id(c) for c in "1234"]     # digits one by one
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    assert tok.apply_chat_template(msgs[:1]) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n")
    ids = tok.encode_chat(msgs[:1])
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1 and ids[-1] == tok.token_to_id("\u010a")
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(msgs[:1])
    # deterministic: the same texts give the same tokenizer.json
    convs = read(root / "out" / "train.jsonl")
    a = train_tokenizer((chat_text(c["messages"]) for c in convs), str(tmp_path / "a"), vocab_size=1024)
    b = train_tokenizer((chat_text(c["messages"]) for c in convs), str(tmp_path / "b"), vocab_size=1024)
    for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(a, fn), "rb") as fa, open(os.path.join(b, fn), "rb") as fb, \
                open(os.path.join(tok_dir, fn), "rb") as fc:
            assert fa.read() == fb.read() == fc.read(), fn


def test_train_data_accepts_the_export(built, tmp_path):
    root, man = built
    out = root / "out"
    tok_dir = str(out / "tokenizer")
    data.build(name="demo", sources={"train": [str(out / "train.jsonl")], "validation": [str(out / "validation.jsonl")]},
               tokenizer_dir=tok_dir, data_dir=str(tmp_path), max_len=1024)
    splits = data.load(str(tmp_path), "demo")
    tok = Tokenizer(tok_dir)
    for split, n in (("train", man["totals"]["train"]), ("validation", man["totals"]["validation"])):
        src = splits[split]
        assert len(src) == n
        domains = set()
        for i in range(len(src)):
            ex = src[i]
            ids, mask = np.asarray(ex["input_ids"]), np.asarray(ex["loss_mask"])
            assert mask.sum() > 0 and mask[:int(ex["prompt_len"])].sum() == 0
            assert list(ids[mask == 1][-2:]) == [2, tok.token_to_id("\u010a")]   # answer + <|im_end|> \n
            domains.add(ex["domain"].decode() if isinstance(ex["domain"], bytes) else ex["domain"])
        assert domains == set(corpus.DOMAINS)


def test_parse_caps():
    assert parse_caps(None) is None
    caps = parse_caps(["10,2,2", "code=5,1,1"])
    assert caps == {"code": (5, 1, 1), "prose": (10, 2, 2), "math": (10, 2, 2)}
    with pytest.raises(Exception):
        parse_caps(["poetry=1,1,1"])
    with pytest.raises(Exception):
        parse_caps(["1,2"])
