"""The demo report's markdown tables, pure functions of its numbers (no model, no jax):
tau per domain with the old pair's rows, the drafters, plain vs DSpark speed per domain,
and the engine's load bench read back from its results.json."""

from __future__ import annotations

import json
import os

import numpy as np

from dspark_jax.errors import DSparkError

KINDS = ("eagle3", "dflash", "dspark")
DOMAINS = ("math", "code", "prose")
POLICY_NAMES = {"fixed": "fixed gamma", "production": "production"}
NO_SPECULATION = "none"
FIXED = ("mtp1", "fixed")
SCHEDULED = ("threshold", "algorithm1", "production")
POLICY_ORDER = (NO_SPECULATION,) + FIXED + SCHEDULED
ROW_KEYS = ("mode", "policy", "concurrency", "throughput", "per_user", "tau")
FIGURES = (("throughput_vs_per_user.png", "Figure 7 shape: aggregate throughput against per-user tokens/s"),
           ("budget_vs_concurrency.png", "Figure 8 shape: mean verification budget against concurrency"))


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table1(results: dict, before: dict | None = None) -> str:
    """tau per domain per drafter and temperature, DSpark's gain over each baseline, and
    (when `before` is given) the old pair's tau per drafter as rows labelled before."""
    lines = [_row(("temperature", "drafter") + DOMAINS + ("mean",)), _row(("---", "---") + ("---:",) * 4)]
    for temp in sorted(results, key=float):
        for kind in KINDS:
            taus = [results[temp][kind]["domains"][d]["tau"] for d in DOMAINS]
            lines.append(_row([temp, kind] + [f"{t:.2f}" for t in taus] + [f"{np.mean(taus):.2f}"]))
        ds = np.array([results[temp]["dspark"]["domains"][d]["tau"] for d in DOMAINS])
        for base in ("dflash", "eagle3"):
            b = np.array([results[temp][base]["domains"][d]["tau"] for d in DOMAINS])
            gains = [f"{100 * (x / y - 1):+.0f}%" for x, y in zip(ds, b)]
            lines.append(_row([temp, f"DSpark vs {base}"] + gains + [f"{100 * (ds.mean() / b.mean() - 1):+.0f}%"]))
        old = (before or {}).get("tau", {}).get(temp, {})
        for kind in (k for k in KINDS if k in old):
            taus = [old[kind][d] for d in DOMAINS]
            lines.append(_row([temp, f"before: {kind}"] + [f"{t:.2f}" for t in taus] + [f"{np.mean(taus):.2f}"]))
    return "\n".join(lines)


def speed_table(speed: list[dict], before: dict | None = None) -> str:
    """Plain vs DSpark tokens/s per user, one row per (batch, prompt group), then the old
    pair's rows (its tokens/s were summed over the batch, so divided by the batch here)."""
    lines = [_row(("batch", "prompts", "DSpark policy", "plain tok/s per user", "DSpark tok/s per user", "speedup",
                   "tau")),
             _row(("---:", "---", "---") + ("---:",) * 4)]
    for s in speed:
        lines.append(_row((s["batch"], f"{s['prompts']} ({s['n_prompts']})", POLICY_NAMES[s.get("policy", "fixed")],
                           f"{s['plain_tokens_per_second_per_user']:.1f}",
                           f"{s['dspark_tokens_per_second_per_user']:.1f}", f"{s['speedup']:.2f}x", f"{s['tau']:.2f}")))
    described = (before or {}).get("pair", {}).get("speed_prompts", {})
    for s in (before or {}).get("speed", []):
        b = s["batch"]
        lines.append(_row((b, f"before: {described.get(str(b), 'old pair')}", POLICY_NAMES["fixed"],
                           f"{s['plain_tokens_per_second'] / b:.1f}", f"{s['dspark_tokens_per_second'] / b:.1f}",
                           f"{s['speedup']:.2f}x", f"{s['tau']:.2f}")))
    return "\n".join(lines)


def drafter_steps(recipe: dict, kind: str):
    """(training steps, flops per step or None) of one drafter from RECIPE.json: the
    per-drafter `drafters` entry, else the older schema's shared `drafter_steps`."""
    entry = recipe.get("drafters", {}).get(kind)
    if entry is not None:
        return entry.get("steps"), entry.get("flops_per_step")
    return recipe.get("drafter_steps"), None


def drafters_table(rep: dict, recipe: dict) -> str:
    """Per drafter: own parameters (embeddings and LM head left out), as a share of the
    target's, checkpoint size, training steps and training compute."""
    lines = [_row(("drafter", "own parameters", "of the target", "file MB", "steps", "training PFLOP")),
             _row(("---",) + ("---:",) * 5)]
    total = rep["target"]["params"]
    for kind in KINDS:
        d = rep["drafters"][kind]
        steps, flops = drafter_steps(recipe, kind)
        compute = f"{steps * flops / 1e15:.2f}" if steps is not None and flops is not None else "n/a"
        lines.append(_row((kind, f"{d['params'] / 1e6:.2f} M", f"{100 * d['params'] / total:.1f}%",
                           f"{d['file_mb']:.1f}", "?" if steps is None else steps, compute)))
    return "\n".join(lines)


def _shown(path: str, repo: str) -> str:
    """A path inside the repository relative to its root; any other path as given."""
    rel = os.path.relpath(os.path.abspath(path), repo)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def bench_command(settings: dict, meta: dict, bench_dir: str, repo: str) -> str:
    """The `python -m serve.load_bench` command line that the recorded settings stand for.
    results.json does not record a prompt file: the folder's prompts.jsonl stands in when
    it has one, else the recorded random-prompt length."""
    words = ["python -m serve.load_bench"]
    for key, flag in (("target", "--target"), ("draft", "--draft")):
        if meta.get(key):
            words.append(f"{flag} {_shown(meta[key], repo)}")
    prompts = os.path.join(bench_dir, "prompts.jsonl")
    if os.path.exists(prompts):
        words.append(f"--prompt-file {_shown(prompts, repo)}")
    elif settings.get("prompt_len") is not None:
        words.append(f"--prompt-len {settings['prompt_len']}")
    irrelevant = {"rate": "poisson" not in settings.get("modes", ()),
                  "threshold": "threshold" not in settings.get("policies", ())}
    for key, flag in (("concurrency", "--concurrency"), ("policies", "--policy"), ("modes", "--mode"),
                      ("requests_per_client", "--requests-per-client"), ("max_new_tokens", "--max-new-tokens"),
                      ("length_spread", "--length-spread"), ("temperature", "--temperature"), ("rate", "--rate"),
                      ("threshold", "--threshold"), ("seed", "--seed"), ("max_len", "--max-len"),
                      ("buckets", "--buckets"), ("repeats", "--repeats"), ("prefill_chunk", "--prefill-chunk"),
                      ("rounds_per_call", "--rounds-per-call"), ("lag", "--lag"), ("sps_file", "--sps-file")):
        value = settings.get(key)
        if value is not None and not irrelevant.get(key):
            words.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    if os.path.exists(prompts) and not settings.get("stop_ids"):
        words.append("--ignore-eos")
    if settings.get("device_time") is False:
        words.append("--no-device-time")
    words.append(f"--out-dir {_shown(bench_dir, repo)}")
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + len(word) > 96:
            lines.append("  " + word)
        else:
            lines[-1] += " " + word
    return " \\\n".join(lines)


def read_bench(bench_dir: str) -> dict | None:
    """bench_dir/results.json as written by serve.load_bench, or None when there is none."""
    path = os.path.join(bench_dir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} is not JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or any(k not in r for k in ROW_KEYS) for r in rows):
        raise DSparkError(f"{path} is not a load-bench results.json (needs rows with {', '.join(ROW_KEYS)})")
    return data


def best_policies(rows: list[dict]) -> list[dict]:
    """Per (mode, concurrency): the best scheduled policy by throughput against the best
    fixed one and against no speculation (None where a group did not run)."""
    by: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["mode"], r["concurrency"]), {})[r["policy"]] = r
    out = []
    for (mode, c), pol in sorted(by.items()):
        best = {name: max((pol[p] for p in group if p in pol), key=lambda r: r["throughput"], default=None)
                for name, group in (("scheduled", SCHEDULED), ("fixed", FIXED), ("none", (NO_SPECULATION,)))}
        out.append({"mode": mode, "concurrency": c, **best})
    return out


def _ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['throughput'] / b['throughput']:.2f}" if a and b and b["throughput"] > 0 else "-"


def _policy(r: dict | None) -> tuple[str, str]:
    return (r["policy"], f"{r['throughput']:.1f}") if r else ("-", "-")


def load_bench_section(bench_dir: str, md_dir: str, repo: str) -> str:
    """The load bench's table, the scheduled-vs-fixed comparison, its two figures (linked
    relative to md_dir) and its command; one line naming the command when it has not run."""
    data = read_bench(bench_dir)
    shown = _shown(bench_dir, repo)
    if data is None:
        return (f"No load bench at `{shown}/results.json`; make it with `python -m serve.load_bench "
                f"--concurrency 1 2 4 8 --policy {' '.join(POLICY_ORDER)} --out-dir {shown}` "
                "(settings: docs/load_bench_cpu/README.md).")
    order = {p: i for i, p in enumerate(POLICY_ORDER)}
    rows = sorted(data["rows"], key=lambda r: (r["mode"], order.get(r["policy"], len(order)), r["concurrency"]))
    meta = data.get("meta", {})
    readme = f"\n`{shown}/README.md` describes the run." if os.path.exists(os.path.join(bench_dir, "README.md")) else ""
    lines = [f"From `{shown}/results.json` ({meta.get('title', 'untitled run')}), made by the command below.{readme}",
             "", "```bash",
             bench_command(data.get("settings", {}), meta, bench_dir, repo), "```", "",
             _row(("mode", "policy", "concurrency", "per-user tok/s", "throughput tok/s", "tau")),
             _row(("---", "---") + ("---:",) * 4)]
    lines += [_row((r["mode"], r["policy"], r["concurrency"], f"{r['per_user']:.1f}", f"{r['throughput']:.1f}",
                    f"{r['tau']:.2f}")) for r in rows]
    lines += ["", "Best scheduled policy (threshold, algorithm1, production) against the best fixed one",
              "(mtp1, fixed) and against no speculation, by throughput:", "",
              _row(("mode", "concurrency", "best scheduled", "tok/s", "best fixed", "tok/s", "scheduled / fixed",
                    "none tok/s", "scheduled / none")),
              _row(("---", "---:", "---", "---:", "---", "---:", "---:", "---:", "---:"))]
    for b in best_policies(rows):
        lines.append(_row((b["mode"], b["concurrency"], *_policy(b["scheduled"]), *_policy(b["fixed"]),
                           _ratio(b["scheduled"], b["fixed"]), _policy(b["none"])[1],
                           _ratio(b["scheduled"], b["none"]))))
    for name, alt in FIGURES:
        if os.path.exists(os.path.join(bench_dir, name)):
            lines += ["", f"![{alt}]({os.path.relpath(os.path.join(bench_dir, name), md_dir)})"]
    return "\n".join(lines)


def pooled_speed(batch: int, prompts: str, rows, policy: str = "fixed") -> dict:
    """One speed-table row from speedup.compare rows of one batch size: tokens per user
    (a call's tokens over its batch) summed over the calls, over their summed seconds (a
    call's tokens over its tokens/s). tau is pooled over all rounds."""
    def per_user(tps):
        return sum(r.tokens / r.batch for r in rows) / sum(r.tokens / t for r, t in zip(rows, tps))

    plain, spec = per_user([r.plain_tps for r in rows]), per_user([r.spec_tps for r in rows])
    rounds = sum(r.rounds for r in rows)
    return {"batch": batch, "prompts": prompts, "policy": policy, "n_prompts": sum(r.batch for r in rows),
            "plain_tokens_per_second_per_user": plain, "dspark_tokens_per_second_per_user": spec,
            "speedup": spec / plain, "tau": sum(r.tau * r.rounds for r in rows) / rounds if rounds else 0.0}
