"""Where the demo corpus comes from: stdlib code and docstrings, and pydoc topics (the
generated math problems: math_problems.py; the whole picture: corpus.py)."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
import tokenize

DEFAULT_SEED = 0
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
MAX_FILE_BYTES = 200_000

# Directories of the standard library that are not library code worth learning from.
SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "turtledemo",
    "__pycache__", "lib-dynload", "pydoc_data", "encodings", "ensurepip",
})


# ----------------------------------------------------------------------------- helpers

def _hash(*parts) -> int:
    """A stable 64-bit hash (independent of PYTHONHASHSEED and of the platform)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _rng(*parts) -> random.Random:
    return random.Random(_hash(*parts))


def split_of(source: str, seed: int = DEFAULT_SEED, fractions=SPLIT_FRACTIONS) -> str:
    """The split a source id belongs to: a seeded hash, cut at the split fractions."""
    u = _hash(seed, "split", source) / 2.0 ** 64
    edge = 0.0
    for split, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return split
    return SPLITS[-1]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'`(*])")


def sentences(text: str) -> list[str]:
    """Split whitespace-normalised text into sentences (a heuristic, good enough here)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(0).rstrip())
        out.append(text[start:end].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def take_sentences(sents: list[str], limit: int) -> str:
    """As many whole leading sentences as fit in `limit` characters ('' if not even one)."""
    out, n = [], 0
    for s in sents:
        add = len(s) + (1 if out else 0)
        if n + add > limit:
            break
        out.append(s)
        n += add
    return " ".join(out)


def normalise(text: str) -> str:
    return " ".join(text.split())


def is_prose(text: str) -> bool:
    """Whether normalised text reads like English prose rather than code, tables or lists."""
    if len(text) < 20 or len(text.split()) < 4:
        return False
    if any(tok in text for tok in (">>>", "::=", "```", "-->", "|---")):
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) >= 0.8 and (text[0].isalnum() or text[0] in "\"'`(")


def _ends_sentence(text: str) -> bool:
    return bool(re.search(r"[.!?][\"')\]]?$", text))


# ----------------------------------------------------------------------------- stdlib

def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None, max_file_bytes: int = MAX_FILE_BYTES):
    """(used relative paths sorted, {reason: count} of skipped .py files) of the stdlib."""
    root = root or stdlib_dir()
    used, skipped = [], {"skipped_dir": 0, "too_large": 0}
    for d, dirs, files in os.walk(root):
        keep = []
        for x in dirs:
            if x in SKIP_DIRS or x.startswith(("config-", "test_")) or x.endswith("_test"):
                if x not in ("site-packages", "dist-packages"):   # third-party code is not counted
                    for _, _, fs in os.walk(os.path.join(d, x)):
                        skipped["skipped_dir"] += sum(f.endswith(".py") for f in fs)
            else:
                keep.append(x)
        dirs[:] = sorted(keep)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            if f.startswith(("test_", "_sysconfigdata")):
                skipped["skipped_dir"] += 1
            elif os.path.getsize(os.path.join(d, f)) > max_file_bytes:
                skipped["too_large"] += 1
            else:
                used.append(rel)
    return sorted(used), skipped


def module_name(rel: str) -> str:
    """'json/decoder.py' -> 'json.decoder'; 'json/__init__.py' -> 'json'."""
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _read_source(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        enc, _ = tokenize.detect_encoding(iter(raw.splitlines(True)).__next__)
        return raw.decode(enc)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None


_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _blocks(node):
    """The statements (and except / case clauses) directly inside a node: the only children
    a class, a function or another statement can be nested in."""
    return [c for c in ast.iter_child_nodes(node) if isinstance(c, _BLOCKS)]


def _defs(tree):
    """(qualname, node) of every class and function, in source order."""
    out = []

    def visit(node, prefix):
        for child in _blocks(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{prefix}.{child.name}" if prefix else child.name
                out.append((q, child))
                visit(child, q)
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _statement_ends(node) -> list[int]:
    """The last line of every statement nested in `node` (not of `node` itself)."""
    out, todo = [], _blocks(node)
    while todo:
        child = todo.pop()
        if isinstance(child, ast.stmt):
            out.append(child.end_lineno)
        todo.extend(_blocks(child))
    return out


def _node_lines(node, lines):
    """The node's source lines (decorators included) dedented to its own indentation, and the
    line number of its first line; None if the block is not cleanly indented."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    block = lines[start - 1:node.end_lineno]
    if not block:
        return None
    first = block[0]
    indent = first[:len(first) - len(first.lstrip())]
    out = []
    for line in block:
        line = line.rstrip()
        if not line:
            out.append("")
        elif line.startswith(indent):
            out.append(line[len(indent):])
        else:  # a multi-line string at a lower indentation: cannot be dedented cleanly
            return None
    return out, start


def _code_examples(rel, mod, defs, lines, seed, max_answer, max_prompt):
    """Continuation and body-writing tasks for every class and function of one module
    (`defs`: its `_defs`)."""
    out = []
    for qual, node in defs:
        got = _node_lines(node, lines)
        if got is None or not node.body:
            continue
        block, start = got
        if "\t" in "".join(block):
            continue
        body_at = node.body[0].lineno - start              # index of the first body line
        if body_at <= 0:                                    # `def f(): return 1` on one line
            continue
        # statement ends relative to the block: where prompts may stop and answers may end
        ends = sorted({e - start + 1 for e in _statement_ends(node)})
        key = f"{rel}|{qual}"

        # 1) write the body of a short function
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            header, body = "\n".join(block[:body_at]).rstrip(), "\n".join(block[body_at:]).rstrip()
            trivial = body.strip() in ("pass", "...") or len(node.body) == 1 and isinstance(
                node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant)
            if (not trivial and len(body) <= max_answer and body_at <= 8 and len(header) <= max_prompt
                    and len(block) - body_at <= 25):
                out.append({
                    "prompt": f"Write the body of `{qual}` from {mod}:\n```python\n{header}\n```",
                    "answer": body, "kind": "body", "key": key + "|body"})

        # 2) continue from a statement boundary inside a longer class or function
        if len(block) < 6:
            continue
        cuts = [c for c in [body_at] + ends if body_at <= c <= body_at + 12 and c < len(block) - 1]
        if not cuts:
            continue
        rng = _rng(seed, "cut", key)
        cut = rng.choice(cuts)
        prompt_lines = block[:cut]
        while prompt_lines and not prompt_lines[-1].strip():
            prompt_lines.pop()
        nxt = cut
        while nxt < len(block) and not block[nxt].strip():
            nxt += 1
        stops = [e for e in ends + [len(block)] if e > nxt]
        answer = ""
        for e in sorted(set(stops)):
            text = "\n".join(block[nxt:e]).rstrip()
            if len(text) > max_answer or e - nxt > 40:
                break
            answer = text
            if e - nxt >= 3 and rng.random() < 0.5:          # a natural stopping point
                break
        prompt_code = "\n".join(prompt_lines)
        if not answer.strip() or not prompt_code or len(prompt_code) > max_prompt:
            continue
        out.append({"prompt": f"Continue this Python code from {mod}:\n```python\n{prompt_code}\n```",
                    "answer": answer, "kind": "continue", "key": key + "|continue"})
    return out


def _docstring_paragraphs(doc: str) -> list[str]:
    """The leading prose paragraphs of a docstring (flush-left lines), normalised."""
    paras = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        plines = para.split("\n")
        if any(line[:1].isspace() for line in plines):        # indented: a list or code
            break
        text = normalise(para)
        if not is_prose(text):
            break
        paras.append(text)
    return paras


_ASK_FUNCTION = ("What does `{q}` do?", "Explain what `{q}` does.", "Describe `{q}`.")
_ASK_CLASS = ("What is `{q}`?", "Describe the class `{q}`.", "What is `{q}` used for?")
_ASK_MODULE = ("What is the `{q}` module for?", "Describe the Python module `{q}`.",
               "What does the `{q}` module do?")


def _docstring_examples(rel, mod, tree, defs, seed, max_answer, max_prompt):
    out = []
    nodes = [("", tree)] + defs
    for qual, node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        paras = _docstring_paragraphs(doc)
        if not paras:
            continue
        name = f"{mod}.{qual}" if qual else mod
        key = f"{rel}|{qual}"
        rng = _rng(seed, "doc", key)
        asks = _ASK_MODULE if not qual else _ASK_CLASS if isinstance(node, ast.ClassDef) else _ASK_FUNCTION
        answer = take_sentences(sentences(paras[0]), max_answer)
        if len(answer) >= 25 and _ends_sentence(answer):
            out.append({"prompt": rng.choice(asks).format(q=name), "answer": answer,
                        "kind": "explain", "key": key + "|explain"})
        sents = sentences(" ".join(paras[:2]))
        if len(sents) >= 2:
            k = 1 if len(sents) < 4 else rng.choice((1, 2))
            lead = " ".join(sents[:k])
            rest = take_sentences(sents[k:], max_answer)
            if rest and len(lead) <= max_prompt and _ends_sentence(rest) and len(lead.split()) >= 4:
                out.append({"prompt": f"Continue: {lead}", "answer": rest, "kind": "continue",
                            "key": key + "|continue"})
    return out


# ----------------------------------------------------------------------------- pydoc topics

def _topic_paragraphs(text: str):
    """(kind, indent, text) of a pydoc topic: kind is 'title', 'para'."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        plines = [line.rstrip() for line in para.split("\n") if line.strip()]
        if not plines:
            continue
        if (len(plines) == 2 and len(plines[1]) >= 3 and len(set(plines[1].strip())) == 1
                and plines[1].strip()[0] in "*=-^~+#"):
            out.append(("title", 0, plines[0].strip()))
            continue
        indent = min(len(line) - len(line.lstrip()) for line in plines)
        out.append(("para", indent, "\n".join(line[indent:] for line in plines)))
    return out


_SKIP_PARA = ("Changed in version", "New in version", "Added in version", "Deprecated since", "Note:",
              "See also", "-[", "[", "*", "+", "|", "Footnotes")
_ASK_TOPIC = ("Explain {t} in Python.", "What should I know about {t} in Python?",
              "Describe {t} in Python.")
_ASK_TERM = ("Explain `{t}` in Python.", "What does `{t}` do in Python?", "Describe `{t}`.")


def _lower_title(title: str) -> str:
    words = title.split()
    if words and words[0].isalpha() and words[0][:1].isupper() and words[0][1:].islower():
        return title[0].lower() + title[1:]
    return title


def _topic_examples(key_name: str, text: str, seed, max_answer, max_prompt):
    out = []
    paras = _topic_paragraphs(text)
    title, explained = None, False
    for i, (kind, indent, body) in enumerate(paras):
        if kind == "title":
            title, explained = body, False
            continue
        norm = normalise(body)
        key = f"pydoc_data.topics:{key_name}|{i}"
        rng = _rng(seed, "topic", key)
        if indent == 0 and "\n" not in body and len(body) <= 80 and not _ends_sentence(body) \
                and not body.endswith(":") and not body.startswith(_SKIP_PARA) \
                and i + 1 < len(paras) and paras[i + 1][0] == "para" and paras[i + 1][1] > 0:
            # a definition-list term followed by its indented description
            desc = normalise(paras[i + 1][2])
            answer = take_sentences(sentences(desc), max_answer) if is_prose(desc) else ""
            if len(answer) >= 25 and _ends_sentence(answer):
                out.append({"prompt": rng.choice(_ASK_TERM).format(t=body.strip()), "answer": answer,
                            "kind": "term", "key": key + "|term"})
            continue
        if indent > 0 and not is_prose(norm):
            continue
        if norm.startswith(_SKIP_PARA) or not is_prose(norm):
            continue
        sents = sentences(norm)
        if title and not explained and indent == 0:
            explained = True
            answer = take_sentences(sents, max_answer)
            if len(answer) >= 25 and _ends_sentence(answer):
                out.append({"prompt": rng.choice(_ASK_TOPIC).format(t=_lower_title(title)),
                            "answer": answer, "kind": "explain", "key": key + "|explain"})
        if len(sents) >= 2:
            k = 1 if len(sents) < 4 else rng.choice((1, 2))
            lead, rest = " ".join(sents[:k]), take_sentences(sents[k:], max_answer)
            if rest and len(lead) <= max_prompt and _ends_sentence(rest) and len(lead.split()) >= 4:
                out.append({"prompt": f"Continue: {lead}", "answer": rest, "kind": "continue",
                            "key": key + "|continue"})
    return out


def pydoc_topics() -> dict | None:
    """The reference topics bundled with the interpreter (None where a distro strips them)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return dict(topics)
