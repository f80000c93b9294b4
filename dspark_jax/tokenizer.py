"""tokenizer.json (via the `tokenizers` library) plus the folder's chat template and stop ids.

Plain-text prompts (`encode_plain`) are encoded as transformers' `tokenizer(text)` encodes
them for a Llama target (`model_type: llama` in the folder's config.json): with
tokenizer.json's post-processor, whose TemplateProcessing puts Llama 3's
`<|begin_of_text|>` first. Other folders (Qwen3: no BOS; Gemma 4) keep the text's own
tokens. Chat templates emit their BOS themselves, so `encode_chat` never adds one.
"""

from __future__ import annotations

import json
import os

from dspark_jax.errors import DSparkError


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """Encode/decode text, render chat templates and report stop tokens of a HF folder."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise DSparkError(f"missing {path} (needed to turn text into tokens; use --prompt-ids to skip it)")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise DSparkError(f"{path} could not be read by the tokenizers library: {str(e).splitlines()[0]}") from None
        self.folder = folder
        tcfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.chat_template = tcfg.get("chat_template")
        template_file = os.path.join(folder, "chat_template.jinja")
        if self.chat_template is None and os.path.exists(template_file):
            with open(template_file) as f:
                self.chat_template = f.read()
        self.eos_token = _token_text(tcfg.get("eos_token"))
        self.bos_token = _token_text(tcfg.get("bos_token"))
        self.pad_token = _token_text(tcfg.get("pad_token"))
        stop = set()
        gen = _read_json(os.path.join(folder, "generation_config.json"))
        for source in (gen.get("eos_token_id"), _read_json(os.path.join(folder, "config.json")).get("eos_token_id")):
            if isinstance(source, int):
                stop.add(source)
            elif isinstance(source, list):
                stop.update(int(s) for s in source)
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            stop.add(self.token_to_id(self.eos_token))
        self.stop_ids = tuple(sorted(stop))
        model_type = _read_json(os.path.join(folder, "config.json")).get("model_type")
        self.plain_special_tokens = model_type == "llama"   # what encode_plain passes as add_special_tokens

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """A plain-text prompt's ids: on a Llama target with the post-processor's special
        tokens (Llama 3: `<|begin_of_text|>` first), as transformers' tokenizer(text)."""
        return self.encode(text, add_special_tokens=self.plain_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a list of {role, content} messages with the folder's Jinja template."""
        if not self.chat_template:
            raise DSparkError(f"{self.folder} has no chat_template (tokenizer_config.json or chat_template.jinja)")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)

        def raise_exception(msg):
            raise DSparkError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise DSparkError(f"chat template of {self.folder} failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))
