"""The demo chat corpus: code, prose and math conversations built offline, reproducibly.

Sources (nothing is downloaded; everything ships with the running interpreter):

* code:  the interpreter's standard library sources (`sysconfig.get_paths()["stdlib"]`,
         `*.py`, test suites / site-packages / idlelib / encodings / huge files skipped),
         parsed with `ast`: "Continue this Python code from <module>" (the next statements
         as answer) and "Write the body of `<qualname>` from <module>" (the real body).
* prose: `pydoc_data.topics` (the language reference topics bundled for `help()`) and the
         docstrings of the same stdlib modules, read with `ast.get_docstring` (no module is
         imported): "Explain <topic> in Python.", "What does `<module>.<name>` do?" and
         "Continue: <first sentence(s)>".
* math:  generated arithmetic and word problems with worked answers
         ("12 * 7 = 84. 84 - 19 = 65. The answer is 65."), from a fixed seed.

Each example is one conversation (user prompt, assistant answer) with features `prompt`,
`answer`, `domain` ("code" | "prose" | "math") and `source` (where it came from: a stdlib
module path, a pydoc topic, a generated problem). Splits are decided by a hash of `source`
(90/5/5), so a module's code and docstrings always land in the same split and the splits
never share a source. Within a (domain, split) examples are ranked by a seeded hash and
capped; a split's content does not depend on the other splits' caps.

    build(data_dir, caps={"code": (6000, 300, 300), ...}, seed=0)  -> dataset directory
    manifest(data_dir)              -> sources, seeds, caps and sizes (also metadata.json)
    export_jsonl(data_dir, out)     -> {split}.jsonl, {split}.{domain}.jsonl (chat JSONL)
    prompts_jsonl(data_dir, out)    -> prompts/{split}[.{domain}].jsonl (user turns only)

The dataset is a TFDS array_record build read back with `as_data_source()` (no TensorFlow).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
import sys
import warnings

import tensorflow_datasets as tfds

from dspark_jax.errors import DSparkError
from train.demo.math_problems import MATH_TEMPLATES, math_examples
from train.demo.sources import (  # noqa: F401  split_of is re-exported
    DEFAULT_SEED,
    MAX_FILE_BYTES,
    SPLITS,
    SPLIT_FRACTIONS,
    SKIP_DIRS,
    _code_examples,
    _defs,
    _docstring_examples,
    _hash,
    _read_source,
    _topic_examples,
    module_name,
    pydoc_topics,
    split_of,
    stdlib_dir,
    stdlib_files,
)

VERSION = "1.0.0"
DOMAINS = ("code", "prose", "math")
DEFAULT_CAPS = {"code": (6000, 300, 300), "prose": (6000, 300, 300), "math": (6000, 300, 300)}
MAX_ANSWER_CHARS = 400
MAX_PROMPT_CHARS = 1000
FEATURES = ("prompt", "answer", "domain", "source")


# ----------------------------------------------------------------------------- collection

@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the corpus (the builder config carries the same fields)."""
    caps: tuple = tuple((d, DEFAULT_CAPS[d]) for d in DOMAINS)   # ((domain, (train, val, test)), ...)
    seed: int = DEFAULT_SEED
    max_answer_chars: int = MAX_ANSWER_CHARS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_file_bytes: int = MAX_FILE_BYTES

    def caps_of(self, domain: str) -> dict:
        return dict(zip(SPLITS, dict(self.caps)[domain]))


def _percentile(values, q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return float(v[k])


def _stats(values) -> dict:
    values = list(values)
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(sum(values) / len(values), 1),
            "p50": _percentile(values, 50), "p95": _percentile(values, 95), "max": max(values)}


def normalise_caps(caps) -> tuple:
    """None | {domain: (train, val, test)} | (train, val, test) -> ((domain, caps), ...)."""
    full = dict(DEFAULT_CAPS)
    if caps is None:
        pass
    elif isinstance(caps, dict):
        for d, c in caps.items():
            if d not in DOMAINS:
                raise DSparkError(f"unknown domain '{d}' in caps (expected one of {', '.join(DOMAINS)})")
            full[d] = c
    else:
        full = {d: caps for d in DOMAINS}
    out = []
    for d in DOMAINS:
        c = tuple(int(x) for x in full[d])
        if len(c) != 3 or min(c) < 0:
            raise DSparkError(f"caps for {d} must be three non-negative counts (train, validation, test); got {c}")
        out.append((d, c))
    return tuple(out)


def collect(settings: Settings = Settings(), progress: bool = False):
    """({split: [example, ...]}, manifest): the whole corpus, in memory, deterministic."""
    seed, ma, mp = settings.seed, settings.max_answer_chars, settings.max_prompt_chars
    root = stdlib_dir()
    files, skipped = stdlib_files(root, settings.max_file_bytes)
    pools = {d: {s: [] for s in SPLITS} for d in ("code", "prose")}
    digest = hashlib.sha256()
    unparsable, used_files = 0, 0
    it = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc="stdlib modules", unit="file")
    for rel in it:
        src = _read_source(os.path.join(root, rel))
        if src is None:
            unparsable += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                unparsable += 1
                continue
        used_files += 1
        digest.update(rel.encode() + b"\0" + src.encode() + b"\0")
        mod, source = module_name(rel), f"stdlib:{rel}"
        split = split_of(source, seed)
        lines = src.split("\n")
        defs = _defs(tree)
        for ex in _code_examples(rel, mod, defs, lines, seed, ma, mp):
            pools["code"][split].append(dict(ex, domain="code", source=source))
        for ex in _docstring_examples(rel, mod, tree, defs, seed, ma, mp):
            pools["prose"][split].append(dict(ex, domain="prose", source=source))
    if used_files == 0:
        raise DSparkError(f"no readable Python sources under the standard library directory {root}; "
                          "the demo corpus needs an interpreter that ships its .py files")
    topics = pydoc_topics()
    if topics is not None:
        for name in sorted(topics):
            source = f"pydoc_data.topics:{name}"
            split = split_of(source, seed)
            for ex in _topic_examples(name, topics[name], seed, ma, mp):
                pools["prose"][split].append(dict(ex, domain="prose", source=source))

    chosen = {}
    available = {}
    for domain, by_split in pools.items():
        # a prompt seen twice (copied docstrings, identical snippets) is kept once, in the split
        # of the source whose key sorts first, so splits never share a prompt
        first = {}
        for split in SPLITS:
            for ex in by_split[split]:
                if ex["prompt"] not in first or ex["key"] < first[ex["prompt"]][1]["key"]:
                    first[ex["prompt"]] = (split, ex)
        dedup = {s: [] for s in SPLITS}
        for split, ex in first.values():
            dedup[split].append(ex)
        available[domain] = {s: len(dedup[s]) for s in SPLITS}
        caps = settings.caps_of(domain)
        chosen[domain] = {s: sorted(dedup[s], key=lambda e: (_hash(seed, "pick", e["key"]), e["key"]))[:caps[s]]
                          for s in SPLITS}
    math_chosen, math_info = math_examples(settings.caps_of("math"), seed)
    chosen["math"] = math_chosen
    available["math"] = {s: len(math_chosen[s]) for s in SPLITS}

    examples = {s: [] for s in SPLITS}
    for domain in DOMAINS:
        for s in SPLITS:
            for ex in chosen[domain][s]:
                examples[s].append({
                    "prompt": ex["prompt"], "answer": ex["answer"], "domain": domain, "source": ex["source"],
                    "kind": ex["kind"], "key": f"{domain}|{hashlib.sha256(ex['prompt'].encode()).hexdigest()[:20]}"})

    sizes = {d: {s: len(chosen[d][s]) for s in SPLITS} for d in DOMAINS}
    manifest = {
        "dataset": "demo_corpus",
        "version": VERSION,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable, "stdlib": root},
        "sources": {
            "stdlib": {"files_found": len(files) + sum(skipped.values()), "files_used": used_files,
                       "files_unparsable": unparsable, **skipped, "skip_dirs": sorted(SKIP_DIRS),
                       "max_file_bytes": settings.max_file_bytes, "sha256": digest.hexdigest()},
            "pydoc_data_topics": len(topics) if topics is not None else None,
            "math": {"templates": list(MATH_TEMPLATES), **math_info},
        },
        "seed": seed,
        "split": {"fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
                  "rule": "sha256(f'{seed}\\x1fsplit\\x1f{source}') as a fraction of 2**64, cut at the fractions"},
        "selection": "per (domain, split): rank by sha256(seed, 'pick', example key), keep the first cap; "
                     "math: generation order from random.Random(seed)",
        "caps": {d: settings.caps_of(d) for d in DOMAINS},
        "max_answer_chars": settings.max_answer_chars,
        "max_prompt_chars": settings.max_prompt_chars,
        "available": available,
        "sizes": sizes,
        "totals": {s: sum(sizes[d][s] for d in DOMAINS) for s in SPLITS},
        "sources_per_split": {d: {s: len({e["source"] for e in chosen[d][s]}) for s in SPLITS} for d in DOMAINS},
        "answer_chars": {d: _stats(len(e["answer"]) for s in SPLITS for e in chosen[d][s]) for d in DOMAINS},
        "kinds": {d: _kind_counts(e["kind"] for s in SPLITS for e in chosen[d][s]) for d in DOMAINS},
    }
    return examples, manifest


def _kind_counts(kinds) -> dict:
    out: dict = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- TFDS builder

@dataclasses.dataclass
class DemoCorpusConfig(tfds.core.BuilderConfig):
    caps: tuple = tuple((d, DEFAULT_CAPS[d]) for d in DOMAINS)
    seed: int = DEFAULT_SEED
    max_answer_chars: int = MAX_ANSWER_CHARS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_file_bytes: int = MAX_FILE_BYTES

    def settings(self) -> Settings:
        return Settings(caps=tuple((d, tuple(c)) for d, c in self.caps), seed=self.seed,
                        max_answer_chars=self.max_answer_chars, max_prompt_chars=self.max_prompt_chars,
                        max_file_bytes=self.max_file_bytes)


class DemoCorpus(tfds.core.GeneratorBasedBuilder):
    """Demo chat conversations (code, prose, math) from the Python standard library and
    generated arithmetic; see train/demo/corpus.py."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in FEATURES}),
            metadata=tfds.core.MetadataDict(),
            description=__doc__.split("\n\n")[0],
        )

    def _split_generators(self, dl_manager):
        examples, man = collect(self.builder_config.settings(), progress=getattr(self, "_progress", False))
        man["config"] = self.builder_config.name
        self.info.metadata["manifest"] = man
        return {split: self._generate_examples(examples[split]) for split in SPLITS}

    def _generate_examples(self, examples):
        for ex in examples:
            yield ex["key"], {k: ex[k] for k in FEATURES}


def config_name(settings: Settings) -> str:
    """py311-default for the default settings, py311-<hash> otherwise."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    if settings == Settings():
        return f"{py}-default"
    blob = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    return f"{py}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def make_config(caps=None, seed: int = DEFAULT_SEED, **kw) -> DemoCorpusConfig:
    settings = Settings(caps=normalise_caps(caps), seed=seed, **kw)
    return DemoCorpusConfig(name=config_name(settings), version=VERSION, caps=settings.caps, seed=settings.seed,
                            max_answer_chars=settings.max_answer_chars, max_prompt_chars=settings.max_prompt_chars,
                            max_file_bytes=settings.max_file_bytes,
                            description="demo corpus " + json.dumps(dict(settings.caps)))


def build(data_dir: str, caps=None, seed: int = DEFAULT_SEED, progress: bool = False, **kw) -> str:
    """Build (or reuse) the corpus under data_dir; returns the dataset directory."""
    builder = DemoCorpus(config=make_config(caps, seed, **kw), data_dir=data_dir, file_format="array_record")
    builder._progress = progress
    from tensorflow_datasets.core.utils import tqdm_utils

    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(progress)
    try:
        builder.download_and_prepare()
    finally:
        tfds.display_progress_bar(was)
    return str(builder.data_dir)


def dataset_dir(data_dir: str, name: str | None = None) -> str:
    """The directory of a built corpus: data_dir itself, or data_dir/demo_corpus/<name>/<version>
    (name may be left out when only one corpus was built there)."""
    if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    root = os.path.join(data_dir, "demo_corpus")
    if name is None:
        names = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                       if os.path.exists(os.path.join(root, n, VERSION, "dataset_info.json")))
        if len(names) != 1:
            raise DSparkError(f"{'no demo corpus' if not names else 'several demo corpora'} under {data_dir}"
                              f"{' (' + ', '.join(names) + '); name one' if names else '; build it first'}")
        name = names[0]
    path = os.path.join(root, name, VERSION)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise DSparkError(f"no demo corpus '{name}' under {data_dir} (expected {path})")
    return path


def load(data_dir: str, name: str | None = None) -> dict:
    """{split: random-access source} of a built corpus (no TensorFlow)."""
    return tfds.builder_from_directory(dataset_dir(data_dir, name)).as_data_source()


def manifest(data_dir: str, name: str | None = None) -> dict:
    """The manifest recorded with a built corpus (metadata.json next to the data)."""
    with open(os.path.join(dataset_dir(data_dir, name), "metadata.json"), encoding="utf-8") as f:
        return json.load(f)["manifest"]


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def iter_examples(data_dir: str, split: str, name: str | None = None, batch: int = 512):
    """Examples of one split as dicts of str, in the dataset's (deterministic) order."""
    src = load(data_dir, name)[split]
    n = len(src)
    for i in range(0, n, batch):
        idx = list(range(i, min(n, i + batch)))
        rows = src.__getitems__(idx) if hasattr(src, "__getitems__") else [src[j] for j in idx]
        for row in rows:
            yield {k: _text(row[k]) for k in FEATURES}


def _write_jsonl(path: str, rows) -> int:
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _export(data_dir, out_dir, name, make_row) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split in SPLITS:
        rows = list(iter_examples(data_dir, split, name))
        written[f"{split}.jsonl"] = _write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), map(make_row, rows))
        for domain in DOMAINS:
            fn = f"{split}.{domain}.jsonl"
            written[fn] = _write_jsonl(os.path.join(out_dir, fn),
                                       (make_row(r) for r in rows if r["domain"] == domain))
    return written


def export_jsonl(data_dir: str, out_dir: str, name: str | None = None) -> dict:
    """Write {split}.jsonl and {split}.{domain}.jsonl as chat JSONL (what train/data.py reads):
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "domain": ..., "source": ...}.
    Returns {file name: lines}."""
    return _export(data_dir, out_dir, name, lambda r: {
        "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
        "domain": r["domain"], "source": r["source"]})


def prompts_jsonl(data_dir: str, out_dir: str, name: str | None = None) -> dict:
    """Write user-only prompt files (for regenerating answers with a target):
    {"messages": [{"role": "user", ...}], "domain": ..., "source": ...}. Returns {file name: lines}."""
    return _export(data_dir, out_dir, name, lambda r: {
        "messages": [{"role": "user", "content": r["prompt"]}], "domain": r["domain"], "source": r["source"]})
