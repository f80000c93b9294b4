"""The demo pair's report: tau per domain (Table 1 shape), acceptance, calibration, speed.

    python -m train.demo.report            # reads artifacts/demo only; writes docs/demo_report.md

Every number comes from the committed artifacts (target, drafters, STS file, held-out
test prompts under artifacts/demo/prompts) through the real speculation step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ART = os.path.join(REPO, "artifacts", "demo")
KINDS = ("eagle3", "dflash", "dspark")
DOMAINS = ("math", "code", "prose")


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


def table1(results: dict) -> str:
    lines = ["| temperature | drafter | " + " | ".join(DOMAINS) + " | mean |",
             "| --- | --- | " + " | ".join("---:" for _ in DOMAINS) + " | ---: |"]
    for temp in sorted(results, key=float):
        for kind in KINDS:
            taus = [results[temp][kind]["domains"][d]["tau"] for d in DOMAINS]
            lines.append(f"| {temp} | {kind} | " + " | ".join(f"{t:.2f}" for t in taus) + f" | {np.mean(taus):.2f} |")
        ds = np.array([results[temp]["dspark"]["domains"][d]["tau"] for d in DOMAINS])
        for base in ("dflash", "eagle3"):
            b = np.array([results[temp][base]["domains"][d]["tau"] for d in DOMAINS])
            gains = " | ".join(f"{100 * (x / y - 1):+.0f}%" for x, y in zip(ds, b))
            lines.append(f"| {temp} | DSpark vs {base} | {gains} | {100 * (ds.mean() / b.mean() - 1):+.0f}% |")
    return "\n".join(lines)


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo.report", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--per-domain", type=int, default=48, help="held-out test prompts per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for the report and figures/ (default: docs/ in the repository)")
    p.add_argument("--skip-speed", action="store_true", help="skip the plain vs speculative timing")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(REPO, "docs")
    with cli_errors("train.demo.report"):
        from tqdm import tqdm

        from dspark_jax import calibration as cal, drafters, target
        from dspark_jax.tokenizer import Tokenizer
        from serve import speedup
        from train import evaluation

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
            drafter, dparams = loaded["dspark"]
            prompts = [list(e["input_ids"]) for e in examples[::max(1, len(examples) // 16)]][:16]
            for b in (1, 8):
                speed.append(speedup.compare(tcfg, tparams, drafter, dparams, prompts, batch=b,
                                             max_new_tokens=args.max_new_tokens, repeats=2))
        rep = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count()},
               "prompts_per_domain": args.per_domain, "max_new_tokens": args.max_new_tokens, "gamma": ro.gamma,
               "tau": {t: {k: {d: results[t][k]["domains"][d]["tau"] for d in DOMAINS} for k in KINDS}
                       for t in results},
               "conditional_acceptance": {t: {k: results[t][k]["all"]["conditional_acceptance"] for k in KINDS}
                                          for t in results},
               "calibration": {"sts_temperatures": temps.tolist(), "before": before, "after": after},
               "speed": [{"batch": r.batch, "plain_tokens_per_second": r.plain_tps,
                          "dspark_tokens_per_second": r.spec_tps, "speedup": r.speedup, "tau": r.tau}
                         for r in speed]}
        evaluation.write_json(os.path.join(args.out, "demo_report.json"), rep)
        write_markdown(os.path.join(args.out, "demo_report.md"), rep, results, speed)
        print(table1(results))


def _pooled(metrics: dict, name: str) -> str:
    m = metrics["prefix_pooled"]
    return f"{m[name]:.3f}" if m.get(name) is not None else "n/a"


def write_markdown(path: str, rep: dict, results: dict, speed) -> None:
    recipe = json.load(open(os.path.join(ART, "RECIPE.json"))) if os.path.exists(os.path.join(ART, "RECIPE.json")) else {}
    cal_rows = ["| position | ECE raw | ECE STS | AUC raw | AUC STS |", "| ---: | ---: | ---: | ---: | ---: |"]
    for k, (b, a) in enumerate(zip(rep["calibration"]["before"]["prefix"], rep["calibration"]["after"]["prefix"]), 1):
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
        cal_rows.append(f"| {k} | {fmt(b['ece'])} | {fmt(a['ece'])} | {fmt(b['auc'])} | {fmt(a['auc'])} |")
    speed_rows = ["| batch | plain tok/s | DSpark tok/s | speedup | tau |", "| ---: | ---: | ---: | ---: | ---: |"]
    speed_rows += [f"| {s['batch']} | {s['plain_tokens_per_second']:.1f} | {s['dspark_tokens_per_second']:.1f} | "
                   f"{s['speedup']:.2f}x | {s['tau']:.2f} |" for s in rep["speed"]]
    text = f"""# The bundled demo pair: report

Regenerate with `python -m train.demo.report` (reads `artifacts/demo` only). Rebuild the
artifacts from scratch with `python -m train.demo.recipe` (see its docstring per stage).
Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPU cores, no accelerator.

Target: Qwen3 architecture, {recipe.get('target', {}).get('num_hidden_layers', '?')} layers,
hidden {recipe.get('target', {}).get('hidden_size', '?')}, vocabulary {recipe.get('vocab', '?')}.
Drafters: one draft layer each, gamma = {rep['gamma']}, identical data (the target's own
answers), steps ({recipe.get('drafter_steps', '?')}) and batch. Held-out test prompts:
{rep['prompts_per_domain']} per domain, {rep['max_new_tokens']} new tokens, full verification depth.

## tau per domain (tokens committed per round, bonus included)

{table1(results)}

![conditional acceptance](figures/demo_acceptance.png)

## DSpark confidence calibration (temperature 1, prefix survival a_k)

STS temperatures (fit on the validation split): {[round(t, 3) for t in rep['calibration']['sts_temperatures']]}.
Pooled ECE {_pooled(rep['calibration']['before'], 'ece')} raw -> {_pooled(rep['calibration']['after'], 'ece')} with STS;
pooled AUC {_pooled(rep['calibration']['before'], 'auc')} -> {_pooled(rep['calibration']['after'], 'auc')}.

{chr(10).join(cal_rows)}

![reliability](figures/demo_reliability.png)

## Plain vs speculative decoding on this CPU (temperature 0)

{chr(10).join(speed_rows)}
"""
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
