"""What `python -m serve.generate` does, as a library function with typed inputs.

Loading (target, tokenizer, drafter), prompt encoding, mesh placement, generation and
the per-completion records all live here so the CLI stays a thin argument parser.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from dspark_jax import generation, prompts as prompts_lib, target
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.join(REPO_ROOT, "artifacts", "demo")


@dataclasses.dataclass
class GenerateRequest:
    target: str | None = None
    draft: str | None = None
    drafter: str | None = None
    prompt: list = dataclasses.field(default_factory=list)
    prompt_file: str | None = None
    prompt_ids: list = dataclasses.field(default_factory=list)
    chat: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    gamma: int | None = None
    verify_depth: int | None = None
    policy: str | None = None
    sps_file: str | None = None
    mesh: str = "1x1"
    dtype: str | None = None
    ignore_eos: bool = False
    trace: bool = False


def bundled_folder(name: str) -> str | None:
    path = os.path.join(BUNDLED_DIR, name)
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def resolve_folders(req: GenerateRequest) -> tuple[str, str | None, str]:
    """(target folder, drafter folder or None, drafter kind) after applying defaults."""
    tfolder = req.target or bundled_folder("target")
    if tfolder is None:
        raise DSparkError(f"no --target given and no bundled pair at {BUNDLED_DIR}; pass --target DIR")
    kind = req.drafter
    dfolder = req.draft
    if kind == "none":
        return tfolder, None, "none"
    if dfolder is None and req.target is None:
        dfolder = bundled_folder(kind or "dspark")
    if dfolder is None:
        if kind not in (None, "none"):
            raise DSparkError(f"--drafter {kind} needs --draft DIR (no bundled {kind} drafter for this target)")
        return tfolder, None, "none"
    return tfolder, dfolder, kind or "auto"


def _encode(req: GenerateRequest, tokenizer) -> tuple[list[list[int]], list[bool]]:
    """Every prompt's token ids, and for each whether it was plain text (a prompt that
    --chat would have put in the chat template)."""
    items: list = list(req.prompt)
    if req.prompt_file:
        items += prompts_lib.read_prompt_file(req.prompt_file)
    if items and tokenizer is None:
        raise DSparkError("text prompts need a tokenizer.json in the target folder; use --prompt-ids")
    for i, text in enumerate(items):
        if isinstance(text, str) and not text.strip():
            raise DSparkError(f"prompt {i} is empty")
    ids = prompts_lib.encode_prompts(items, tokenizer, req.chat) if items else []
    ids += [prompts_lib.parse_ids(s) for s in req.prompt_ids]
    if not ids:
        raise DSparkError("no prompt given: use --prompt, --prompt-file or --prompt-ids")
    return ids, [isinstance(x, str) for x in items] + [False] * len(req.prompt_ids)


def chat_hint(req: GenerateRequest, tokenizer, completions, plain: list[bool]) -> str | None:
    """The line to say once when completions of plain-text prompts ended at their first
    token (a stop token) while the target folder has a chat template and --chat was not
    given: a chat-trained target answers a bare prompt with end-of-turn. None otherwise."""
    if req.chat or tokenizer is None or not tokenizer.chat_template:
        return None
    empty = sum(1 for c, p in zip(completions, plain) if p and c.finish_reason == "stop" and len(c.token_ids) == 1)
    if not empty:
        return None
    lead = ("the completion ended at its first token" if len(completions) == 1
            else f"{empty} of {len(completions)} completions ended at their first token")
    return f"{lead} (a stop token) and the target folder has a chat template: did you mean --chat?"


def run_generate(req: GenerateRequest, emit: Callable[[dict], None], stream: bool = True):
    """Run a generation request; `emit` receives header / text / completion / summary events."""
    from dspark_jax import drafters, mesh as mesh_lib
    from dspark_jax.tokenizer import Tokenizer

    if req.max_new_tokens < 1:
        raise DSparkError(f"--max-new-tokens must be >= 1; got {req.max_new_tokens}")
    if req.num_samples < 1:
        raise DSparkError(f"--num-samples must be >= 1; got {req.num_samples}")
    mesh = mesh_lib.make_mesh(req.mesh)
    tfolder, dfolder, kind = resolve_folders(req)
    tcfg, tparams = target.load(tfolder, req.dtype)
    has_tok = os.path.exists(os.path.join(tfolder, "tokenizer.json"))
    tokenizer = Tokenizer(tfolder) if has_tok else None
    prompt_ids, plain = _encode(req, tokenizer)
    drafter, dparams, gamma = None, None, 0
    if dfolder is not None:
        drafter, dparams = drafters.load(dfolder, tcfg, kind=kind, gamma=req.gamma, dtype=req.dtype)
        gamma = drafter.gamma
    elif req.gamma is not None or req.verify_depth is not None:
        raise DSparkError("--gamma / --verify-depth need a drafter (--draft DIR)")
    stop_ids = () if req.ignore_eos or tokenizer is None else tokenizer.stop_ids

    batch = [(pi, si) for pi in range(len(prompt_ids)) for si in range(req.num_samples)]
    flat_prompts = [prompt_ids[pi] for pi, _ in batch]
    sampling = SamplingParams.make(len(batch), req.temperature, req.top_k, req.top_p)
    seeds = [(req.seed * 1_000_003 + i) % (2**32) for i in range(len(batch))]
    policy, costs = choose_policy(req, tcfg, drafter, mesh, len(batch), flat_prompts, emit)

    streaming = stream and len(batch) == 1 and tokenizer is not None
    got: list[int] = []
    shown = [""]

    def on_tokens(index, tokens, finished):
        got.extend(tokens)
        text = tokenizer.decode(got)
        if text.startswith(shown[0]) and len(text) > len(shown[0]) and "\ufffd" not in text[len(shown[0]):]:
            emit({"kind": "text", "text": text[len(shown[0]):]})
            shown[0] = text

    if streaming:
        emit({"kind": "header", "prompt_index": 0, "sample_index": 0})
    comps = generation.generate(
        tcfg, tparams, flat_prompts, max_new_tokens=req.max_new_tokens, sampling=sampling,
        seeds=seeds, stop_ids=stop_ids, drafter=drafter, dparams=dparams, gamma=gamma,
        verify_depth=req.verify_depth, policy=policy, costs=costs, trace=req.trace, mesh=mesh,
        on_tokens=on_tokens if streaming else None)
    records = []
    for (pi, si), c in zip(batch, comps):
        text = tokenizer.decode(c.token_ids) if tokenizer is not None else None
        rec = {"prompt_index": pi, "sample_index": si, "token_ids": c.token_ids, "text": text,
               "rounds": c.rounds, "tau": round(c.tau, 4), "accepted_per_position": c.accepted_per_position,
               "tokens_per_second": round(c.tokens_per_second, 3), "drafter": "none" if drafter is None else (drafter.kind if kind == "auto" else kind),
               "gamma": gamma, "policy": policy, "finish_reason": c.finish_reason}
        if req.trace:
            rec["trace"] = c.trace
        records.append(rec)
        if not streaming and stream:
            emit({"kind": "header", "prompt_index": pi, "sample_index": si})
            emit({"kind": "text", "text": text if text is not None else " ".join(map(str, c.token_ids))})
        elif streaming and text is not None and len(text) > len(shown[0]) and text.startswith(shown[0]):
            emit({"kind": "text", "text": text[len(shown[0]):]})
        emit({"kind": "completion", "record": rec})
    hint = chat_hint(req, tokenizer, comps, [plain[pi] for pi, _ in batch])
    if hint is not None:
        emit({"kind": "notice", "line": hint})
    rounds = sum(c.rounds for c in comps)
    steady_tok = sum(c.steady_tokens for c in comps)
    steady_secs = max(c.steady_seconds for c in comps)
    if steady_secs > 0:
        n_tok, secs = steady_tok, steady_secs
    else:
        n_tok, secs = sum(len(c.token_ids) for c in comps), max(c.seconds for c in comps)
    tau = sum(len(c.token_ids) - 1 for c in comps) / rounds if rounds else 0.0
    emit({"kind": "summary", "line": f"drafter {records[0]['drafter']}  tau {tau:.2f}  "
          f"tokens/s {n_tok / secs if secs else 0:.1f}  rounds {rounds}  completions {len(comps)}"})
    return records



def profile_costs(sps_file: str | None, tcfg, drafter, slots: int, max_len: int, mesh=None) -> dict | None:
    """The scheduled policies' engine arguments from the profile file's record of this
    backend, model pair, mesh and slot count (any cache length: the closest), or None."""
    from dspark_jax.engine import profiles
    from dspark_jax.engine.costs import stored_costs

    key = profiles.profile_key(tcfg, slots=slots, gamma=drafter.gamma, max_len=max_len, tap_layers=drafter.tap_layers,
                               mesh=mesh if mesh is not None and mesh.size > 1 else None, drafter=drafter)
    return stored_costs(sps_file, key, profiles.budget_buckets(slots, drafter.gamma), any_length=True)


def choose_policy(req: GenerateRequest, tcfg, drafter, mesh, slots: int, prompts, emit) -> tuple[str, dict | None]:
    """(engine policy, its profile costs): `req.policy`, or by default production when a
    profile of this backend, model pair, mesh and batch exists, else fixed gamma (saying
    once which command makes the profile)."""
    from dspark_jax.engine import SCHEDULED

    if drafter is None:
        if req.policy not in (None, "none"):
            raise DSparkError(f"--policy {req.policy} needs a drafter (--draft DIR)")
        return "none", None
    if req.verify_depth is not None:
        if req.policy not in (None, "fixed"):
            raise DSparkError("--verify-depth is the fixed policy's depth; it does not go with --policy "
                              f"{req.policy}")
        return "fixed", None
    if req.policy not in (None,) + SCHEDULED:
        return req.policy, None
    max_len = generation.cache_length(max(len(p) for p in prompts), req.max_new_tokens, drafter.gamma)
    costs = profile_costs(req.sps_file, tcfg, drafter, slots, max_len, mesh)
    command = f"python -m serve.profile_sps --slots {slots}" + (f" --mesh {req.mesh}" if req.mesh != "1x1" else "")
    if costs is None:
        if req.policy is not None:
            raise DSparkError(f"--policy {req.policy} needs a profile of this backend, model pair, mesh and "
                              f"batch; make one with `{command}`")
        emit({"kind": "notice", "line": f"no profile for this backend, model pair and batch: fixed gamma "
                                        f"(`{command}` makes one; then the production scheduler is the default)"})
        return "fixed", None
    return req.policy or "production", costs
