"""A small byte-level BPE tokenizer for the demo pair, trained with the `tokenizers` library.

    train_tokenizer(texts, out_dir, vocab_size=4096)

writes a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json (a Qwen-style
chat template, eos `<|im_end|>`, pad `<|endoftext|>`), special_tokens_map.json and
generation_config.json (`eos_token_id` = id of `<|im_end|>`). Special tokens get ids 0..3.
Pre-tokenisation follows Qwen2 (digits one by one, which helps arithmetic), then byte-level
mapping; there is no normaliser, so decoding gives back exactly the text that was encoded.
Training is deterministic for a given sequence of texts.
"""

from __future__ import annotations

import json
import os

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer pattern: contractions, letter runs, single digits, punctuation runs, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def chat_text(messages: list[dict]) -> str:
    """Training text of a conversation: the template's words without its special tokens, so
    that `user`, `assistant` and the newlines around them get merged tokens too."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def _new_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(texts_iter, out_dir: str, vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int = 2048) -> str:
    """Train a byte-level BPE on an iterable of strings and write the folder; returns out_dir."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts_iter, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    })
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": list(SPECIAL_TOKENS)})
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "eos_token_id": tok.token_to_id(EOS_TOKEN), "pad_token_id": tok.token_to_id(PAD_TOKEN)})
    return out_dir


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def token_stats(tokenizer_dir: str, conversations) -> dict:
    """Token counts of chat conversations rendered with the folder's template:
    {domain: {"conversation": {n, mean, p50, p95, max}, "answer": {...}}, plus "all"}."""
    import jinja2
    from tokenizers import Tokenizer

    from train.demo.corpus import _stats

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
            json.load(f)["chat_template"])
    convs = list(conversations)
    full = [template.render(messages=c["messages"], add_generation_prompt=False) for c in convs]
    answers = [c["messages"][-1]["content"] for c in convs]
    n_full = [len(e.ids) for e in tok.encode_batch(full, add_special_tokens=False)] if full else []
    n_ans = [len(e.ids) for e in tok.encode_batch(answers, add_special_tokens=False)] if answers else []
    out = {}
    for domain in sorted({c.get("domain", "") for c in convs}) + ["all"]:
        idx = [i for i, c in enumerate(convs) if domain == "all" or c.get("domain", "") == domain]
        out[domain] = {"conversation": _stats(n_full[i] for i in idx), "answer": _stats(n_ans[i] for i in idx)}
    return out
