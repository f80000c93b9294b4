"""The demo pair's report: the pair, tau per domain (Table 1 shape), acceptance,
calibration, plain vs DSpark speed per domain, and the engine's load bench.

    python -m train.demo.report            # reads artifacts/demo; writes docs/demo_report.md

Every measured number comes from the committed artifacts (target, drafters, STS file,
held-out test prompts under artifacts/demo/prompts) through the real speculation step.
The rows labelled before come from docs/demo_report_before.json (the previous pair's
report); the load bench section reads a `python -m serve.load_bench` output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors
from train.demo.report_tables import (DOMAINS, KINDS, drafters_table, load_bench_section, pooled_speed, speed_table,
                                      table1)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ART = os.path.join(REPO, "artifacts", "demo")
BEFORE = os.path.join(REPO, "docs", "demo_report_before.json")
EMBEDDINGS = ("embed_tokens", "lm_head")


def load_examples(tokenizer, per_domain: int) -> list[dict]:
    from dspark_jax.prompts import read_prompt_file

    out = []
    for domain in DOMAINS:
        path = os.path.join(ART, "prompts", f"test.{domain}.jsonl")
        if not os.path.exists(path):
            raise DSparkError(f"missing {path}: run python -m train.demo.recipe --stage corpus")
        for chat in read_prompt_file(path)[:per_domain]:
            ids = tokenizer.encode_chat(chat if isinstance(chat, list) else [{"role": "user", "content": chat}])
            out.append({"input_ids": np.asarray(ids), "prompt_len": len(ids), "domain": domain})
    return out


def plot_acceptance(path: str, results: dict) -> None:
    from train.evaluation import _pyplot

    plt = _pyplot()
    temps = sorted(results, key=float)
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 3.6), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for kind in KINDS:
            rate = [np.nan if v is None else v for v in results[temp][kind]["all"]["conditional_acceptance"]]
            ax.plot(np.arange(1, len(rate) + 1), rate, marker="o", label=f"{kind} (tau {results[temp][kind]['all']['tau']:.2f})")
        ax.set(title=f"temperature {temp}", xlabel="draft position k", ylabel="P(accept k | 1..k-1 accepted)",
               ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path`, or {} when the file is absent."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} is not valid JSON ({what}): {e}") from None
    if not isinstance(data, dict):
        raise DSparkError(f"{path} is not a JSON object ({what})")
    return data


def count_params(params, exclude=()) -> int:
    """Parameters of a loaded drafter's pytree, leaving out leaves whose path names any of
    `exclude` (its copies of the target's embedding and LM head)."""
    import jax

    return sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if not any(name in jax.tree_util.keystr(path) for name in exclude))


def measure_speed(tcfg, tparams, drafter, dparams, examples: list[dict], *, per_domain: int, max_new_tokens: int,
                  repeats: int, stop_ids=(), sps_file: str | None = None, progress=None) -> list[dict]:
    """Plain vs DSpark tokens/s per user at temperature 0, in one process: each domain's
    first `per_domain` test prompts at batch 1 (each prompt its own generation), all of
    them together, and the same prompts mixed across domains at batch 8. DSpark runs at
    fixed depth gamma and, where `sps_file` holds a profile of the pair at that batch, with
    the production scheduler over the profile's budget buckets. Every speedup.compare call
    alternates plain and DSpark runs; the prompts run in domain order math, code, prose,
    math, ... so drift over the run reaches every domain alike."""
    from dspark_jax import generation, serving
    from serve import speedup

    groups = [[(d, list(e["input_ids"])) for e in examples if e["domain"] == d][:per_domain] for d in DOMAINS]
    mixed = [item for trio in zip(*groups) for item in trio]

    def schedules(batch):
        out = [("fixed", None)]
        max_len = generation.cache_length(max(len(p) for _, p in mixed), max_new_tokens, drafter.gamma)
        costs = serving.profile_costs(sps_file, tcfg, drafter, batch, max_len) if sps_file else None
        if costs is not None:
            out.append(("production", ("production", costs)))
        return out

    def bench(prompts, batch, schedule):
        return speedup.compare(tcfg, tparams, drafter, dparams, prompts, batch=batch, max_new_tokens=max_new_tokens,
                               repeats=repeats, stop_ids=stop_ids, schedule=schedule, progress=progress)

    rows = []
    for policy, schedule in schedules(1):
        ones = [(d, bench([p], 1, schedule)) for d, p in mixed]
        rows += [pooled_speed(1, d, [r for dd, r in ones if dd == d], policy) for d in DOMAINS]
        rows.append(pooled_speed(1, "all three", [r for _, r in ones], policy))
    for policy, schedule in schedules(8):
        eights = [bench([p for _, p in mixed[i:i + 8]], 8, schedule) for i in range(0, len(mixed) - 7, 8)]
        if eights:
            rows.append(pooled_speed(8, "mixed", eights, policy))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo.report", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--per-domain", type=int, default=48, help="held-out test prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for the report and figures/ (default: docs/ in the repository)")
    p.add_argument("--skip-speed", action="store_true", help="skip the plain vs speculative timing")
    p.add_argument("--speed-prompts", type=int, default=8, help="test prompts per domain in the speed table")
    p.add_argument("--speed-repeats", type=int, default=2, help="timed runs of each configuration (the median)")
    p.add_argument("--sps-file", default=None,
                   help="round profile for the production rows of the speed table (default: the load bench "
                        "folder's sps_profile.json; none there: fixed depth only)")
    p.add_argument("--load-bench", default=None,
                   help="serve.load_bench output folder (default: docs/load_bench_cpu in the repository)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(REPO, "docs")
    args.load_bench = args.load_bench or os.path.join(REPO, "docs", "load_bench_cpu")
    args.sps_file = args.sps_file or os.path.join(args.load_bench, "sps_profile.json")
    if not os.path.exists(args.sps_file):
        args.sps_file = None
    with cli_errors("train.demo.report"):
        if args.speed_prompts < 1 or args.speed_repeats < 1:
            raise DSparkError("--speed-prompts and --speed-repeats must be >= 1")
        from tqdm import tqdm

        from dspark_jax import calibration as cal, drafters, target
        from dspark_jax.tokenizer import Tokenizer
        from train import evaluation

        recipe = read_json(os.path.join(ART, "RECIPE.json"), "the recipe record")
        old = read_json(BEFORE, "the previous pair's report")
        tfolder = os.path.join(ART, "target")
        tcfg, tparams = target.load(tfolder)
        tok = Tokenizer(tfolder)
        examples = load_examples(tok, args.per_domain)
        loaded = {k: drafters.load(os.path.join(ART, k), tcfg) for k in KINDS}
        results, rollouts = {}, {}
        bar = tqdm(total=2 * len(KINDS) * len(examples), desc="report rollouts", unit="prompt")
        for temp in (0.0, 1.0):
            key = f"{temp:g}"
            results[key] = {}
            for kind in KINDS:
                drafter, dparams = loaded[kind]
                ro = evaluation.collect(tcfg, tparams, drafter, dparams, examples, max_new_tokens=args.max_new_tokens,
                                        temperature=temp, batch_size=args.batch_size, stop_ids=tok.stop_ids,
                                        progress=bar.update)
                rollouts[(key, kind)] = ro
                results[key][kind] = evaluation.jsonable(evaluation.report(ro))
        bar.close()
        figs = os.path.join(args.out, "figures")
        os.makedirs(figs, exist_ok=True)
        plot_acceptance(os.path.join(figs, "demo_acceptance.png"), results)
        # calibration of DSpark's confidence head before and after STS (temperature 1 rollouts)
        ro = rollouts[("1", "dspark")]
        z = ro.logits()
        temps = ro.temperatures if ro.temperatures is not None else np.ones(ro.gamma)
        before = cal.position_metrics(cal.sigmoid(z), ro.accepted, ro.depth)
        after = cal.position_metrics(cal.apply_sts(z, temps), ro.accepted, ro.depth)
        evaluation.plot_reliability(os.path.join(figs, "demo_reliability.png"),
                                    {"raw": cal.sigmoid(z), "STS": cal.apply_sts(z, temps)}, ro.accepted, ro.depth,
                                    title="DSpark prefix survival, held-out test prompts, temperature 1")
        speed = []
        if not args.skip_speed:
            n = min(args.speed_prompts, args.per_domain)
            calls = 2 * (len(DOMAINS) * n + len(DOMAINS) * n // 8)  # batch 1, then batch 8; fixed and production
            with tqdm(total=args.speed_repeats * calls, desc="speed", unit="run") as bar:
                speed = measure_speed(tcfg, tparams, *loaded["dspark"], examples, per_domain=n,
                                      max_new_tokens=args.max_new_tokens, repeats=args.speed_repeats,
                                      stop_ids=tok.stop_ids, sps_file=args.sps_file, progress=bar.update)
        rep = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count()},
               "prompts_per_domain": args.per_domain, "max_new_tokens": args.max_new_tokens, "gamma": ro.gamma,
               "tau": {t: {k: {d: results[t][k]["domains"][d]["tau"] for d in DOMAINS} for k in KINDS}
                       for t in results},
               "conditional_acceptance": {t: {k: results[t][k]["all"]["conditional_acceptance"] for k in KINDS}
                                          for t in results},
               "calibration": {"sts_temperatures": temps.tolist(), "before": before, "after": after},
               "speed_repeats": args.speed_repeats, "speed": speed,
               "target": {"params": tcfg.num_params()},
               "drafters": {k: {"params": count_params(loaded[k][1], EMBEDDINGS),
                                "file_mb": os.path.getsize(os.path.join(ART, k, "model.safetensors")) / 1e6}
                            for k in KINDS}}
        evaluation.write_json(os.path.join(args.out, "demo_report.json"), rep)
        write_markdown(os.path.join(args.out, "demo_report.md"), rep, results, recipe=recipe, before=old,
                       load_bench=args.load_bench)
        print(table1(results, old))


def _pooled(metrics: dict, name: str) -> str:
    m = metrics["prefix_pooled"]
    return f"{m[name]:.3f}" if m.get(name) is not None else "n/a"


def write_markdown(path: str, rep: dict, results: dict, *, recipe: dict, before: dict, load_bench: str) -> str:
    """Write the report's markdown to `path` (figures linked relative to its folder) from
    the measured numbers, the recipe record, the previous pair's report ({} for none) and
    a load-bench folder; returns the text."""
    cal_rows = ["| position | ECE raw | ECE STS | AUC raw | AUC STS |", "| ---: | ---: | ---: | ---: | ---: |"]
    for k, (b, a) in enumerate(zip(rep["calibration"]["before"]["prefix"], rep["calibration"]["after"]["prefix"]), 1):
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
        cal_rows.append(f"| {k} | {fmt(b['ece'])} | {fmt(a['ece'])} | {fmt(b['auc'])} | {fmt(a['auc'])} |")
    tcfg = recipe.get("target", {})
    old = before.get("pair")
    old_text = (f"\nRows labelled before are the previous pair's (`docs/demo_report_before.json`):\ntarget "
                f"{old['target_params'] / 1e6:.2f} M parameters, {old['layers']} layers x {old['hidden']}; "
                f"{old['note']}.\n" if old else "")
    speed_note = "" if rep["speed"] else "\nNot measured in this run (`--skip-speed`).\n"
    before_note = ("\nThe before rows come from the previous pair's report, whose tokens/s were summed over\n"
                   "the batch (divided by the batch here)." if before.get("speed") else "")
    text = f"""# The bundled demo pair: report

Regenerate with `python -m train.demo.report` (reads `artifacts/demo` only). Rebuild the
artifacts from scratch with `python -m train.demo.recipe` (see its docstring per stage).
Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPU cores, no accelerator.

## The pair

Target: Qwen3 architecture, {tcfg.get('num_hidden_layers', '?')} layers, hidden {tcfg.get('hidden_size', '?')}, \
vocabulary {recipe.get('vocab', '?')}, {rep['target']['params'] / 1e6:.2f} M parameters.
Drafters: one draft layer each, gamma = {rep['gamma']}, trained on the target's own answers.
Own parameters leave out the embeddings and the LM head (`embed_tokens`, `lm_head`).

{drafters_table(rep, recipe)}
{chr(10) + recipe['compute_rule'] + chr(10) if recipe.get('compute_rule') else ''}{old_text}
Held-out test prompts: {rep['prompts_per_domain']} per domain, {rep['max_new_tokens']} new tokens, \
full verification depth.

## tau per domain (tokens committed per round, bonus included)

{table1(results, before)}

![conditional acceptance](figures/demo_acceptance.png)

## DSpark confidence calibration (temperature 1, prefix survival a_k)

STS temperatures (fit on the validation split): {[round(t, 3) for t in rep['calibration']['sts_temperatures']]}.
Pooled ECE {_pooled(rep['calibration']['before'], 'ece')} raw -> {_pooled(rep['calibration']['after'], 'ece')} with STS;
pooled AUC {_pooled(rep['calibration']['before'], 'auc')} -> {_pooled(rep['calibration']['after'], 'auc')}.

{chr(10).join(cal_rows)}

![reliability](figures/demo_reliability.png)

## Plain vs DSpark per user on this CPU (temperature 0)

One process; a request ends at the end of its turn or after {rep['max_new_tokens']} new tokens.
At batch 1 each test prompt is its own generation: `serve.speedup.compare` alternates
plain and DSpark runs of it ({rep['speed_repeats']} timed runs each, the median), and a row's
tokens/s per user is its prompts' total tokens over their total seconds; "all three"
pools the three domains' runs. Batch 8 runs the same prompts mixed across domains, 8 to a
batch (a call's tokens over 8 per user). DSpark policy: fixed gamma verifies all {rep['gamma']} drafts
every round; production is the paper's scheduler over the round profile's budget buckets
(rows only where the profile file has this pair at that batch).{before_note}
{speed_note}
{speed_table(rep['speed'], before)}

## The engine under load (Figures 7 and 8)

{load_bench_section(load_bench, os.path.dirname(os.path.abspath(path)), REPO)}
"""
    with open(path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
