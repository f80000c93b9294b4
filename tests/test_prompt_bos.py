"""Plain-text prompts on a Llama 3 target start with `<|begin_of_text|>`, as transformers'
`tokenizer(text)` gives them (tokenizer.json's post-processor, add_special_tokens=True);
chats get the one BOS their template writes; a Qwen3 target's prompts are unchanged (no BOS).
The committed Llama fixtures carry a bare TemplateProcessing post-processor; real Llama 3
folders wrap it in a Sequence after ByteLevel, checked on a copy rewritten that way."""

import json
import os
import shutil

import pytest

from dspark_jax import prompts
from dspark_jax.tokenizer import Tokenizer
from serve.http.app import completion_prompts
from tests.conftest import FIXTURES

LLAMA = [os.path.join(FIXTURES, name) for name in ("llama3_tiny_tied", "llama3_tiny_untied")]
QWEN3 = os.path.join(FIXTURES, "qwen3_tiny_tied")
TEXT = "the cat sat on the mat"


def post_processor_ids(folder: str, text: str) -> list[int]:
    """What tokenizer.json's own post-processor makes of `text` (transformers' tokenizer(text))."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(text, add_special_tokens=True).ids


@pytest.mark.parametrize("folder", LLAMA, ids=os.path.basename)
def test_plain_prompt_on_llama3_starts_with_bos(folder):
    tok = Tokenizer(folder)
    bos = tok.token_to_id("<|begin_of_text|>")
    with open(os.path.join(folder, "tokenizer.json")) as f:
        assert json.load(f)["post_processor"]["type"] == "TemplateProcessing"   # the fixture has one
    ids = prompts.encode_prompts([TEXT], tok, chat=False)[0]
    assert ids == [bos] + tok.encode(TEXT) == post_processor_ids(folder, TEXT)
    chat = prompts.encode_prompts([TEXT], tok, chat=True)[0]           # the template's BOS, once
    assert chat[0] == bos and chat.count(bos) == 1
    assert prompts.encode_prompts([[{"role": "user", "content": TEXT}]], tok, chat=False)[0] == chat
    assert completion_prompts(TEXT, tok, vocab_size=tok.vocab_size) == [ids]   # the server's completions


def test_real_llama3_post_processor_layout(tmp_path):
    """Llama 3's tokenizer.json: post_processor = Sequence[ByteLevel, TemplateProcessing]."""
    folder = tmp_path / "llama3"
    shutil.copytree(LLAMA[0], folder)
    with open(folder / "tokenizer.json") as f:
        tj = json.load(f)
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        tj["post_processor"]]}
    with open(folder / "tokenizer.json", "w") as f:
        json.dump(tj, f)
    tok = Tokenizer(str(folder))
    ids = tok.encode_plain(TEXT)
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids[1:] == tok.encode(TEXT)
    assert ids == post_processor_ids(str(folder), TEXT)


def test_qwen3_plain_prompt_is_unchanged():
    tok = Tokenizer(QWEN3)
    assert not tok.plain_special_tokens
    assert prompts.encode_prompts([TEXT], tok, chat=False)[0] == tok.encode(TEXT) == post_processor_ids(QWEN3, TEXT)
