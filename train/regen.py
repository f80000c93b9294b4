"""Regeneration: answer every user turn of a prompt set with the target's own sampling."""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from dspark_jax import generation, prompts as prompts_lib, target
from dspark_jax.engine import Engine
from dspark_jax.errors import DSparkError
from dspark_jax.tokenizer import Tokenizer

CHUNK_BATCHES = 8   # prompts per engine (and per progress write), in batches


def read_prompt_set(path: str) -> list[tuple[list[dict], str]]:
    """(user-turn messages, domain) per conversation; assistant turns are dropped."""
    out = []
    for item in prompts_lib.read_prompt_file(path):
        domain = ""
        if isinstance(item, str):
            msgs = [{"role": "user", "content": item}]
        else:
            msgs = [m for m in item if m["role"] != "assistant"]
        out.append((msgs, domain))
    # keep per-line domains of JSON records when present
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) if line.strip()[:1] in "[{" else None for line in f if line.strip()]
    for i, obj in enumerate(lines[:len(out)]):
        if isinstance(obj, dict) and "domain" in obj:
            out[i] = (out[i][0], str(obj["domain"]))
    return out


def _read_progress(path: str, settings: dict) -> dict:
    """Answers of an interrupted run with the same settings: {(turn, index): text}."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.endswith("\n")]   # a torn last line is dropped
    if not lines or lines[0] != {"settings": settings}:
        return done
    for rec in lines[1:]:
        done[(rec["turn"], rec["i"])] = rec["content"]
    return done


def _files_stamp(folder: str) -> list:
    """(name, size, mtime) of a model folder's files: a replaced model is another model."""
    return sorted([n, os.path.getsize(os.path.join(folder, n)), os.stat(os.path.join(folder, n)).st_mtime_ns]
                  for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def _answer(tcfg, tparams, drafter, dparams, prompts, seeds, tok, args, bar) -> list[str]:
    """One chunk of prompts through a fresh engine of args.batch_size slots (continuous
    batching: a slot takes the next prompt as soon as its answer ends); the answers' text."""
    stop_ids = tok.stop_ids
    gamma = drafter.gamma if drafter is not None else 0
    max_len = generation.cache_length(max(len(p) for p in prompts), args.max_new_tokens, gamma)
    engine = Engine(tcfg, tparams, drafter, dparams, slots=args.batch_size, max_len=max_len,
                    policy="fixed" if drafter is not None else "none", max_stop_ids=max(1, len(stop_ids)),
                    buckets=(args.batch_size * (1 + gamma),))
    rids = [engine.submit(p, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed % 2**32, stop_ids=stop_ids,
                          on_tokens=lambda rid, toks, fin: fin and bar.update(1))
            for p, seed in zip(prompts, seeds)]
    engine.run_until_done()
    out = []
    for rid in rids:
        r = engine.result(rid)
        if r.error is not None:
            raise DSparkError(r.error)
        out.append(tok.decode([t for t in r.token_ids if t not in stop_ids]))
    return out


def holdout(rows: list, fraction: float) -> tuple[list, list]:
    """(validation, train): the first `fraction` of the rows (at least one when there are
    two or more) held out for validation, the rest for training."""
    n_val = max(1, int(len(rows) * fraction)) if len(rows) > 1 else 0
    return rows[:n_val], rows[n_val:]


def regenerate(args) -> int:
    """Answer every user turn through the engine, args.batch_size requests at a time with
    continuous batching; answers are appended to <out>.progress after each chunk of
    CHUNK_BATCHES x batch_size prompts, so a killed run resumes from its last chunk (same
    settings: same answers)."""
    tcfg, tparams = target.load(args.target)
    tok = Tokenizer(args.target)
    convs = read_prompt_set(args.prompts)
    if args.limit:
        convs = convs[:args.limit]
    if not convs:
        raise DSparkError(f"{args.prompts} holds no prompts")
    drafter = dparams = None
    if args.draft:
        from dspark_jax import drafters

        drafter, dparams = drafters.load(args.draft, tcfg)
    done = [[] for _ in convs]      # regenerated messages so far
    settings = {k: getattr(args, k) for k in ("prompts", "max_new_tokens", "temperature", "top_k", "top_p",
                                                "seed", "limit", "draft")} | {"target": _files_stamp(args.target)}
    progress_path = args.out + ".progress"
    answered = _read_progress(progress_path, settings)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not answered:
        with open(progress_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
    max_turns = max(sum(m["role"] == "user" for m in c) for c, _ in convs)
    bar = tqdm(total=sum(sum(m["role"] == "user" for m in c) for c, _ in convs), desc="regenerate", unit="answer")
    for turn in range(max_turns):
        todo = []
        for i, (msgs, _) in enumerate(convs):
            users = [m for m in msgs if m["role"] == "user"]
            if turn < len(users):
                history = done[i] + [m for m in msgs if m["role"] == "system" and turn == 0] + [users[turn]]
                done[i] = history
                todo.append(i)
        ids = {i: tok.encode_chat(done[i])[-(tcfg.max_position_embeddings - args.max_new_tokens - 16):]
               for i in todo}
        chunk = CHUNK_BATCHES * args.batch_size
        for start in range(0, len(todo), chunk):
            rows = todo[start:start + chunk]
            if all((turn, i) in answered for i in rows):
                for i in rows:
                    done[i] = done[i] + [{"role": "assistant", "content": answered[(turn, i)]}]
                bar.update(len(rows))
                continue
            answers = _answer(tcfg, tparams, drafter, dparams, [ids[i] for i in rows],
                              [args.seed * 7919 + turn * 104729 + i for i in rows], tok, args, bar)
            with open(progress_path, "a", encoding="utf-8") as f:
                for i, answer in zip(rows, answers):
                    done[i] = done[i] + [{"role": "assistant", "content": answer}]
                    f.write(json.dumps({"turn": turn, "i": i, "content": answer}) + "\n")
    bar.close()
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        for (msgs, domain), conv in zip(convs, done):
            f.write(json.dumps({"messages": conv, "domain": domain}) + "\n")
    os.replace(args.out + ".tmp", args.out)
    os.remove(progress_path)
    if args.name:
        from train import data

        if not args.data_dir:
            raise DSparkError("--name needs --data-dir")
        base = os.path.splitext(args.out)[0]
        with open(args.out) as f:
            validation, train = holdout(f.readlines(), args.val_fraction)
        with open(base + ".train.jsonl", "w") as f:
            f.writelines(train)
        sources = {"train": [base + ".train.jsonl"]}
        if validation:
            with open(base + ".validation.jsonl", "w") as f:
                f.writelines(validation)
            sources["validation"] = [base + ".validation.jsonl"]
        data.build(name=args.name, sources=sources, tokenizer_dir=args.target, data_dir=args.data_dir)
    return len(convs)
