"""Chat datasets as TFDS array_record builds, used without TensorFlow.

Input: JSONL files, one conversation per line, as {"messages": [{role, content}, ...]}
with assistant answers (DeepSpec's {"turns": [...]} prompt files hold user turns only:
answer them with `train.regenerate` first). Each conversation is rendered with
the target's chat template and tokenised piece by piece so the loss mask covers exactly
the assistant answers. Output: a TFDS dataset (array_record files) read back through
`as_data_source()`: random access, no TensorFlow.

    build(name="chat", sources={"train": [...], "validation": [...]}, tokenizer_dir=T, data_dir=D)
    splits = load(D, "chat")          # {"train": source, "validation": source}

Each build records the tokenizer it used (`tokenizer_record.json` beside the TFDS
files: the vocabulary size and a hash of tokenizer.json); `check_tokenizer` refuses a
target whose tokenizer differs. A validation split under `MIN_VALIDATION` examples is
reported as a warning when built and when evaluated on. TFDS's own download messages and
progress bars are kept quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from dspark_jax.errors import DSparkError
from dspark_jax.prompts import messages_of

VERSION = "1.0.0"
RECORD = "tokenizer_record.json"
MIN_VALIDATION = 32     # examples; fewer give tau and calibration estimates too noisy to act on


def read_jsonl(path: str):
    """Yield (line number, conversation messages) of a chat JSONL file."""
    if not os.path.exists(path):
        raise DSparkError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DSparkError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            yield n, messages_of(obj, f"{path}:{n}"), (obj.get("domain", "") if isinstance(obj, dict) else "")


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, loss_mask, prompt_len): the mask is 1 on assistant answer tokens (with the
    template's end-of-turn tokens), prompt_len counts the tokens before the first answer."""
    ids, mask = [], []
    rendered = ""
    prompt_len = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not upto.startswith(before):
            raise DSparkError("the chat template is not prefix-stable; cannot locate assistant answers")
        piece = tokenizer.encode(before[len(rendered):])
        ids += piece
        mask += [0] * len(piece)
        if prompt_len is None:
            prompt_len = len(ids)
        answer = tokenizer.encode(upto[len(before):])
        ids += answer
        mask += [1] * len(answer)
        rendered = upto
    if prompt_len is None:
        raise DSparkError("conversation has no assistant answer to train on")
    return np.asarray(ids, np.int32), np.asarray(mask, np.int8), prompt_len


@dataclasses.dataclass
class ChatConfig(tfds.core.BuilderConfig):
    sources: tuple = ()          # ((split, (path, ...)), ...)
    tokenizer_dir: str = ""
    max_len: int = 4096


class ChatDataset(tfds.core.GeneratorBasedBuilder):
    """Tokenised chat conversations with an answer loss mask."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and
    # prepared ..." for every build; nothing is downloaded here.
    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.int8),
            "prompt_len": tfds.features.Scalar(dtype=np.int32),
            "domain": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(paths) for split, paths in self.builder_config.sources}

    def _generate_examples(self, paths):
        from dspark_jax.tokenizer import Tokenizer

        tok = Tokenizer(self.builder_config.tokenizer_dir)
        for path in paths:
            for n, messages, domain in read_jsonl(path):
                ids, mask, prompt_len = tokenize_chat(tok, messages)
                ids, mask = ids[:self.builder_config.max_len], mask[:self.builder_config.max_len]
                if mask.sum() == 0:
                    continue
                yield f"{os.path.basename(path)}:{n}", {"input_ids": ids, "loss_mask": mask,
                                                       "prompt_len": min(prompt_len, len(ids)), "domain": domain}


def tokenizer_record(tokenizer_dir: str) -> dict:
    """What identifies a tokenizer: its folder, vocabulary size and tokenizer.json hash."""
    from dspark_jax.tokenizer import Tokenizer

    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"tokenizer_dir": tokenizer_dir, "vocab_size": Tokenizer(tokenizer_dir).vocab_size,
            "tokenizer_sha256": digest}


@contextlib.contextmanager
def _quiet_tfds():
    """No TFDS progress bars, and its absl lines below ERROR (the builder config dumped as
    "Using custom data configuration", split notes) muted."""
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    was_bar, was_level = getattr(tqdm_utils, "_active", True), absl_logging.get_verbosity()
    tfds.display_progress_bar(False)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_bar)
        absl_logging.set_verbosity(was_level)


def warn_small_split(count: int, what: str) -> None:
    """One warning line on stderr when a validation split is under MIN_VALIDATION."""
    if count < MIN_VALIDATION:
        print(f"warning: {what} has {count} example(s), fewer than {MIN_VALIDATION}: tau, acceptance and "
              "calibration measured on it are noise; give it more prompts (e.g. a larger --val-fraction)",
              file=sys.stderr)


def build(*, name: str, sources: dict[str, list[str]], tokenizer_dir: str, data_dir: str,
          max_len: int = 4096) -> str:
    """Tokenise JSONL files into a TFDS dataset under data_dir; returns its directory."""
    if not sources:
        raise DSparkError("no data files given")
    for paths in sources.values():
        for p in paths:
            if not os.path.exists(p):
                raise DSparkError(f"data file {p} does not exist")
    record = tokenizer_record(tokenizer_dir)
    cfg = ChatConfig(name=name, sources=tuple((k, tuple(v)) for k, v in sources.items()),
                     tokenizer_dir=tokenizer_dir, max_len=max_len, version=VERSION)
    with _quiet_tfds():
        builder = ChatDataset(config=cfg, data_dir=data_dir, file_format="array_record")
    out = str(builder.data_dir)
    if os.path.exists(os.path.join(out, "dataset_info.json")):   # TFDS reuses a built dataset as it is
        old = os.path.join(out, RECORD)
        if os.path.exists(old):
            with open(old) as f:
                if json.load(f)["tokenizer_sha256"] != record["tokenizer_sha256"]:
                    raise DSparkError(f"dataset '{name}' already exists in {out}, tokenized by another tokenizer; "
                                      "use another name or delete that folder")
        print(f"dataset '{name}' already exists in {out}: reused as it is (delete that folder to rebuild it)",
              file=sys.stderr)
        return out
    with _quiet_tfds():
        builder.download_and_prepare()
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump(record, f, indent=2)
    if "validation" in builder.info.splits:
        warn_small_split(builder.info.splits["validation"].num_examples, f"the validation split of '{name}'")
    return out


def dataset_path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "chat_dataset", name, VERSION)


def load(data_dir: str, name: str) -> dict:
    """{split: random-access source} of a dataset built by `build` (no TensorFlow)."""
    path = dataset_path(data_dir, name)
    if not os.path.isdir(path):
        raise DSparkError(f"no dataset '{name}' under {data_dir} (expected {path}); build it with train.build_data")
    with _quiet_tfds():
        return tfds.builder_from_directory(path).as_data_source()


def check_tokenizer(data_dir: str, name: str, target_dir: str, target_vocab: int) -> bool:
    """Refuse (DSparkError) a dataset built with another tokenizer than the target's.

    Returns False for datasets built before the record existed: their token ids are then
    checked against the vocabulary as they are read (`loader.check_ids`)."""
    path = os.path.join(dataset_path(data_dir, name), RECORD)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        rec = json.load(f)
    hint = f"rebuild the dataset with the target's tokenizer (--tokenizer {target_dir}) or train against its target"
    if rec["vocab_size"] > target_vocab:
        raise DSparkError(f"dataset '{name}' was tokenized by {rec['tokenizer_dir']} (vocabulary {rec['vocab_size']}), "
                          f"larger than the target's vocabulary {target_vocab} ({target_dir}); {hint}")
    tok = os.path.join(target_dir, "tokenizer.json")
    if os.path.exists(tok):
        with open(tok, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != rec["tokenizer_sha256"]:
            raise DSparkError(f"dataset '{name}' was tokenized by {rec['tokenizer_dir']}, whose tokenizer.json "
                              f"differs from the target's ({tok}); {hint}")
    return True

