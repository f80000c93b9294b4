"""What the CPU demo's measurement scripts share: the bundled pair, the prompts and the
load bench's settings at one concurrency, and the stored profile (scripts in this folder
import it by name: `python docs/load_bench_cpu/<script>.py` puts the folder on the path)."""

from __future__ import annotations

from dspark_jax import drafters, load_bench, profile_sps, target
from dspark_jax import prompts as prompt_files
from dspark_jax.serving import GenerateRequest, resolve_folders
from dspark_jax.tokenizer import Tokenizer


def demo_point(concurrency: int, prompt_file: str, sps_file: str):
    """The demo pair and prompts, the load bench's settings at `concurrency` (12 requests
    per client, 32 x U[0.5, 1.5] new tokens, power-of-two buckets) and SPS(B) from
    `sps_file` (measured and stored there when it holds none). Returns (tcfg, tparams,
    drafter, dparams, prompts, settings, sps, draft_time, record)."""
    c = concurrency
    tf, df, kind = resolve_folders(GenerateRequest())
    tcfg, tparams = target.load(tf)
    drafter, dparams = drafters.load(df, tcfg, kind=kind)
    prompts = prompt_files.encode_prompts(prompt_files.read_prompt_file(prompt_file), Tokenizer(tf), False)
    s = load_bench.LoadSettings(concurrency=(c,), requests_per_client=12, prompt_len=max(map(len, prompts)),
                                max_new_tokens=32, length_spread=0.5, buckets="pow2", sps_file=sps_file)
    sps, rec = profile_sps.load_or_profile(tcfg, tparams, slots=c, gamma=drafter.gamma, max_len=s.cache_len,
                                           buckets=s.bucket_set(c, drafter.gamma), tap_layers=drafter.tap_layers,
                                           path=s.sps_file, drafter=drafter, dparams=dparams)
    return tcfg, tparams, drafter, dparams, prompts, s, sps, float(rec.get("draft_seconds", 0.0)), rec


def demo_rounds(engine, record: dict, store: str | None = None) -> dict:
    """The engine's round profile: the one stored in `record` for its policy and buckets,
    else measured now (and saved beside SPS(B) in the profile file `store`, when given)."""
    rounds = profile_sps.stored_rounds(record, engine.policy, engine.buckets, engine.plain_buckets)
    if rounds is None:
        rounds = engine.profile_rounds(save=False)
        if store:
            profile_sps.save_rounds(store, record["key"], engine.policy, rounds)
    return rounds
