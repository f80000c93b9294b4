"""Chat datasets as TFDS array_record builds, used without TensorFlow.

Input: JSONL files, one conversation per line, as {"messages": [{role, content}, ...]}
with assistant answers (DeepSpec's {"turns": [...]} prompt files hold user turns only:
answer them with `train.regenerate` first). Each conversation is rendered with
the target's chat template and tokenised piece by piece so the loss mask covers exactly
the assistant answers. Output: a TFDS dataset (array_record files) read back through
`as_data_source()`: random access, no TensorFlow.

    build(name="chat", sources={"train": [...], "validation": [...]}, tokenizer_dir=T, data_dir=D)
    splits = load(D, "chat")          # {"train": source, "validation": source}
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from dspark_jax.errors import DSparkError
from dspark_jax.prompts import messages_of

VERSION = "1.0.0"


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


def build(*, name: str, sources: dict[str, list[str]], tokenizer_dir: str, data_dir: str,
          max_len: int = 4096) -> str:
    """Tokenise JSONL files into a TFDS dataset under data_dir; returns its directory."""
    if not sources:
        raise DSparkError("no data files given")
    for paths in sources.values():
        for p in paths:
            if not os.path.exists(p):
                raise DSparkError(f"data file {p} does not exist")
    cfg = ChatConfig(name=name, sources=tuple((k, tuple(v)) for k, v in sources.items()),
                     tokenizer_dir=tokenizer_dir, max_len=max_len, version=VERSION)
    builder = ChatDataset(config=cfg, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def load(data_dir: str, name: str) -> dict:
    """{split: random-access source} of a dataset built by `build` (no TensorFlow)."""
    path = os.path.join(data_dir, "chat_dataset", name, VERSION)
    if not os.path.isdir(path):
        raise DSparkError(f"no dataset '{name}' under {data_dir} (expected {path}); build it with train.build_data")
    return tfds.builder_from_directory(path).as_data_source()
