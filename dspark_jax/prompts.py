"""Turning what users type (text, chat JSON, token ids) into prompt token lists."""

from __future__ import annotations

import json
from typing import Sequence

from dspark_jax.errors import DSparkError


def parse_ids(text: str) -> list[int]:
    """`"1,2,3"` -> [1, 2, 3]."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise DSparkError(f"--prompt-ids takes comma-separated integers; got '{text}'") from None


def messages_of(obj, where: str) -> list[dict]:
    """A chat in any of the accepted JSON shapes -> [{role, content}, ...].

    Accepted: a list of messages, {"messages": [...]}, or DeepSpec's prompt-file form
    {"turns": [str, ...]} whose entries are successive user turns (answers come from
    regeneration).
    """
    if isinstance(obj, dict) and "messages" in obj:
        obj = obj["messages"]
    elif isinstance(obj, dict) and "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DSparkError(f"{where}: 'turns' must be a list of strings")
        obj = [{"role": "user", "content": t} for t in turns]
    if not isinstance(obj, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj):
        raise DSparkError(f"{where}: expected a chat as a list of {{role, content}} messages, "
                          "{\"messages\": [...]} or {\"turns\": [...]}")
    return obj


def read_prompt_file(path: str) -> list[str | list[dict]]:
    """One prompt per non-empty line: plain text, or a JSON chat (see messages_of)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DSparkError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise DSparkError(f"prompt file {path} is not UTF-8 text") from None
    out: list = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped[0] in "[{":
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError:
                out.append(line)
                continue
            out.append(messages_of(obj, f"{path}:{n}"))
        else:
            out.append(line)
    if not out:
        raise DSparkError(f"prompt file {path} holds no prompts")
    return out


def encode_prompts(items: Sequence, tokenizer, chat: bool) -> list[list[int]]:
    """Texts and chats -> token ids. Chats always use the chat template; texts when `chat`,
    else `tokenizer.encode_plain` (a Llama 3 target's BOS first)."""
    ids = []
    for item in items:
        if isinstance(item, list):
            ids.append(tokenizer.encode_chat(item))
        elif chat:
            ids.append(tokenizer.encode_chat([{"role": "user", "content": item}]))
        else:
            ids.append(tokenizer.encode_plain(item))
    return ids
