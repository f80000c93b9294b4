"""Building what the server serves: target, tokenizer, drafter, policy and engine.

Folders resolve as `serve.generate` resolves them (the bundled demo pair by default),
and the policy is `serving.choose_policy`'s: production when a profile of this backend,
model pair, mesh and slot count exists, else fixed gamma. The engine has `slots` rows
of `max_len` positions (prompt plus completion); by default max_len is the model's
context, capped at 2048.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from dspark_jax.errors import DSparkError

WARMUPS = ("none", "rounds", "full")


@dataclasses.dataclass
class ServeOptions:
    target: str | None = None
    draft: str | None = None
    drafter: str | None = None
    policy: str | None = None
    sps_file: str | None = None
    mesh: str = "1x1"
    slots: int = 8
    max_len: int | None = None
    max_queue: int = 256
    dtype: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    buckets: str = "auto"
    warmup: str = "rounds"
    # 0: every admission is a prefill pass. Chunked admission (64) can hand a cancelled
    # request's next tokens to the request seated after it in that slot (engine issue).
    prefill_chunk: int = 64
    rounds_per_call: int = 4


@dataclasses.dataclass
class Served:
    engine: object
    tokenizer: object
    model_name: str
    max_len: int
    vocab_size: int
    policy: str
    warmup: Callable[[object], None] | None


def build(opts: ServeOptions, say: Callable[[str], None] = print) -> Served:
    """Load the models and construct the engine (nothing is compiled yet)."""
    from dspark_jax import drafters, mesh as mesh_lib, target
    from dspark_jax.engine import Engine
    from dspark_jax.serving import GenerateRequest, choose_policy, resolve_folders
    from dspark_jax.tokenizer import Tokenizer

    if opts.slots < 1 or opts.max_queue < 0:
        raise DSparkError(f"need --slots >= 1 and --max-queue >= 0; got {opts.slots}, {opts.max_queue}")
    if opts.warmup not in WARMUPS:
        raise DSparkError(f"unknown warm-up '{opts.warmup}' (choose from {', '.join(WARMUPS)})")
    mesh = mesh_lib.make_mesh(opts.mesh)
    tfolder, dfolder, kind = resolve_folders(GenerateRequest(target=opts.target, draft=opts.draft,
                                                             drafter=opts.drafter))
    tcfg, tparams = target.load(tfolder, opts.dtype)
    tokenizer = Tokenizer(tfolder)
    drafter = dparams = None
    if dfolder is not None:
        drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, dtype=opts.dtype)
    max_len = opts.max_len or min(tcfg.max_position_embeddings, 2048)
    if not 2 <= max_len <= tcfg.max_position_embeddings:
        raise DSparkError(f"--max-len must be in [2, {tcfg.max_position_embeddings}] (the model's positions); "
                          f"got {max_len}")
    request = GenerateRequest(policy=opts.policy, sps_file=opts.sps_file, mesh=opts.mesh, max_new_tokens=max_len - 1)
    policy, costs = choose_policy(request, tcfg, drafter, mesh, opts.slots, [[0]],
                                  lambda event: say(event["line"]) if event.get("kind") == "notice" else None)
    gamma = drafter.gamma if drafter is not None and policy != "none" else 0
    stop_ids = tokenizer.stop_ids
    engine = Engine(tcfg, tparams, drafter, dparams, slots=opts.slots, max_len=max_len, policy=policy,
                    buckets=bucket_set(opts.buckets, opts.slots, gamma), prefill_chunk=opts.prefill_chunk,
                    rounds_per_call=opts.rounds_per_call, max_stop_ids=max(4, len(stop_ids)), mesh=mesh,
                    **(costs or {}))
    if engine.notice:
        say(engine.notice)
    name = opts.served_model_name or ("dspark-demo" if opts.target is None else
                                      os.path.basename(os.path.normpath(tfolder)))
    return Served(engine, tokenizer, name, max_len, tcfg.vocab_size, policy, warmup_for(opts.warmup, max_len))


def bucket_set(choice: str, slots: int, gamma: int) -> tuple[int, ...] | None:
    """Budget buckets: "pow2" (profiles.budget_buckets), "full" (one bucket, one round
    program) or "auto" (full on CPU, where compiling dominates and a small model's pass
    costs about the same at any budget; pow2 elsewhere)."""
    import jax

    from dspark_jax.engine import profiles

    if choice not in ("auto", "pow2", "full"):
        raise DSparkError(f"unknown bucket set '{choice}' (choose from auto, pow2, full)")
    if choice == "full" or (choice == "auto" and jax.default_backend() == "cpu"):
        return (slots * (1 + gamma),)
    return profiles.budget_buckets(slots, gamma)


def warmup_for(mode: str, max_len: int) -> Callable[[object], None] | None:
    """The engine thread's warm-up: "rounds" compiles every round program and the prefill
    passes of short prompts; "full" adds the prefill passes of every prompt width;
    "none" compiles each program when a request first needs it."""
    if mode == "none":
        return None
    lens = [1]
    if mode == "full":
        w = 16
        while w < max_len:
            lens.append(w * 2 if w * 2 <= max_len else max_len)
            w *= 2
    return lambda engine: engine.warmup(prompt_lens=lens)
