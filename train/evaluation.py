"""Drafter evaluation and STS calibration on held-out prompts, with the real speculation step.

Rollouts run `dspark_jax.generation.generate(..., trace=True)` at full verification depth
(every draft is verified, so every position's acceptance is observed) and keep, per
round, the drafter's confidences c_1..c_gamma, the verified depth and the accepted count.
From those: tau and per-position conditional acceptance per domain, confidence quality
(ECE / AUC / Brier of a_k against prefix acceptance and of c_k against conditional
acceptance), and Sequential Temperature Scaling (`dspark_jax.calibration.fit_sts`).

Traced confidences are sigmoid(z / t) with the drafter's loaded STS temperatures t (1
without a calibration file); raw head logits are recovered as logit(clip(c)) * t, see
`calibration.confidence_logits` for what the clipping costs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from dspark_jax import calibration as cal
from dspark_jax import generation
from dspark_jax.errors import DSparkError
from dspark_jax.sampling import SamplingParams

ALL = "all"


def has_confidence(drafter) -> bool:
    return bool(getattr(getattr(drafter, "cfg", None), "has_confidence", False))


def loaded_temperatures(drafter) -> np.ndarray | None:
    t = getattr(drafter, "sts_temperatures", None)
    return None if t is None else np.asarray(t[:drafter.gamma], np.float64)


def _domain(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        x = x.decode("utf-8", "replace")
    return str(x) or "unknown"


def held_out_prompts(examples: Iterable[dict], *, max_examples: int = 0,
                     max_prompt_len: int | None = None) -> tuple[list[list[int]], list[str], int]:
    """(prompt ids, domains, number truncated): each example's input_ids[:prompt_len],
    left-truncated to max_prompt_len (the generation prompt sits at the end)."""
    prompts, domains, cut = [], [], 0
    for ex in examples:
        if max_examples and len(prompts) >= max_examples:
            break
        ids = np.asarray(ex["input_ids"]).reshape(-1)[:int(ex["prompt_len"])].tolist()
        if not ids:
            continue
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            ids, cut = ids[-max_prompt_len:], cut + 1
        prompts.append(ids)
        domains.append(_domain(ex.get("domain", "")))
    return prompts, domains, cut


@dataclasses.dataclass
class Rollouts:
    """Per-prompt results and per-round traces of one evaluation run."""

    gamma: int
    domains: list[str]                 # per prompt
    tokens: np.ndarray                 # [P] tokens generated per prompt
    rounds_per_prompt: np.ndarray      # [P]
    prompt: np.ndarray                 # [R] prompt index of each round
    confidences: np.ndarray            # [R, G] as traced (loaded STS applied)
    accepted: np.ndarray               # [R]
    depth: np.ndarray                  # [R]
    temperatures: np.ndarray | None    # loaded STS temperatures [G], None if none
    with_confidence: bool
    truncated: int = 0

    def logits(self) -> np.ndarray:
        """Raw confidence-head logits [R, G] (temperature 1)."""
        return cal.confidence_logits(self.confidences, self.temperatures)

    def subset(self, prompts: np.ndarray) -> "Rollouts":
        keep = np.isin(self.prompt, prompts)
        return dataclasses.replace(self, prompt=self.prompt[keep], confidences=self.confidences[keep],
                                   accepted=self.accepted[keep], depth=self.depth[keep])


def collect(tcfg, tparams, drafter, dparams, examples: Iterable[dict], *, max_new_tokens: int = 64,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 8,
            seed: int = 0, stop_ids: Sequence[int] = (), max_examples: int = 0,
            progress: Callable[[int], None] | None = None) -> Rollouts:
    """Speculative rollouts on the examples' prompts at full verification depth."""
    if drafter is None:
        raise DSparkError("evaluation needs a drafter")
    if batch_size < 1:
        raise DSparkError(f"batch size must be >= 1; got {batch_size}")
    gamma = drafter.gamma
    # largest prompt whose cache (rounded up to 64 slots) still fits the model
    limit = (tcfg.max_position_embeddings // 64) * 64 - max_new_tokens - gamma - 2
    if limit < 1:
        raise DSparkError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the target's "
                          f"{tcfg.max_position_embeddings} positions")
    prompts, domains, cut = held_out_prompts(examples, max_examples=max_examples, max_prompt_len=limit)
    if not prompts:
        raise DSparkError("no prompts to evaluate on")
    order = np.argsort([len(p) for p in prompts], kind="stable")   # similar lengths share a batch
    tokens = np.zeros(len(prompts), np.int64)
    nrounds = np.zeros(len(prompts), np.int64)
    rows: list[tuple[int, dict]] = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].tolist()
        comps = generation.generate(
            tcfg, tparams, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
            sampling=SamplingParams.make(len(idx), temperature, top_k, top_p),
            seeds=[(seed * 1_000_003 + i) % 2**32 for i in idx], stop_ids=stop_ids,
            drafter=drafter, dparams=dparams, gamma=gamma, verify_depth=gamma, trace=True)
        for i, c in zip(idx, comps):
            tokens[i] = len(c.token_ids)
            nrounds[i] = c.rounds
            rows += [(i, r) for r in c.trace]
        if progress is not None:
            progress(len(idx))
    conf = np.asarray([r["confidences"] for _, r in rows], np.float64).reshape(len(rows), gamma)
    return Rollouts(gamma=gamma, domains=domains, tokens=tokens, rounds_per_prompt=nrounds,
                    prompt=np.asarray([i for i, _ in rows], np.int64), confidences=conf,
                    accepted=np.asarray([r["accepted"] for _, r in rows], np.int64),
                    depth=np.asarray([r["verify_depth"] for _, r in rows], np.int64),
                    temperatures=loaded_temperatures(drafter), with_confidence=has_confidence(drafter),
                    truncated=cut)


# ---------------------------------------------------------------------------- reports

def _group(ro: Rollouts, prompts: np.ndarray, bins: int) -> dict:
    sub = ro.subset(prompts)
    rounds = int(ro.rounds_per_prompt[prompts].sum())
    # tau as in Completion.tau, pooled over prompts: the prefill token is in no round
    committed = int((ro.tokens[prompts] - 1).clip(0).sum())
    cond, count = cal.conditional_acceptance(sub.accepted, sub.depth, ro.gamma)
    labels, valid = cal.prefix_outcomes(sub.accepted, sub.depth, ro.gamma)
    with np.errstate(invalid="ignore", divide="ignore"):
        prefix = (labels * valid).sum(0) / valid.sum(0)
    out = {"prompts": int(len(prompts)), "rounds": rounds, "tokens": int(ro.tokens[prompts].sum()),
           "tau": committed / rounds if rounds else float("nan"),
           "mean_accepted": float(sub.accepted.mean()) if sub.accepted.size else float("nan"),
           "conditional_acceptance": cond.tolist(), "conditional_counts": count.tolist(),
           "prefix_acceptance": prefix.tolist()}
    if ro.with_confidence and sub.accepted.size:
        z = sub.logits()
        conf = {"raw": cal.position_metrics(cal.sigmoid(z), sub.accepted, sub.depth, bins)}
        if ro.temperatures is not None:
            conf["sts"] = cal.position_metrics(cal.apply_sts(z, ro.temperatures), sub.accepted, sub.depth, bins)
        out["confidence"] = conf
    return out


def report(ro: Rollouts, bins: int = 15) -> dict:
    """{"all": group, "domains": {name: group}} with each group holding tau, per-position
    conditional / prefix acceptance and (drafters with a confidence head) confidence
    metrics: "raw" at temperature 1, "sts" under the loaded temperatures if any."""
    names = sorted(set(ro.domains))
    dom = np.asarray(ro.domains, dtype=object)
    return {"gamma": ro.gamma,
            "sts_temperatures": None if ro.temperatures is None else ro.temperatures.tolist(),
            "truncated_prompts": ro.truncated,
            ALL: _group(ro, np.arange(len(ro.domains)), bins),
            "domains": {n: _group(ro, np.flatnonzero(dom == n), bins) for n in names}}


def evaluate(tcfg, tparams, drafter, dparams, examples: Iterable[dict], *, max_new_tokens: int = 64,
             temperature: float = 0.0, batch_size: int = 8, bins: int = 15, **kw) -> dict:
    """Rollouts on held-out examples, summarised by `report` (see there)."""
    ro = collect(tcfg, tparams, drafter, dparams, examples, max_new_tokens=max_new_tokens,
                 temperature=temperature, batch_size=batch_size, **kw)
    return report(ro, bins)


def calibrate(ro: Rollouts, *, grid=None, bins: int = 15, holdout_fraction: float = 0.0,
              seed: int = 0) -> tuple[np.ndarray, dict]:
    """Fit STS temperatures on the rollouts; (temperatures [G], before/after report).

    "before" is the drafter as loaded (its STS file if any, else temperature 1). With a
    holdout fraction, whole prompts are held out of the fit and scored separately.
    """
    if not ro.with_confidence:
        raise DSparkError("the drafter has no confidence head; there is nothing to calibrate")
    if not ro.accepted.size:
        raise DSparkError("the rollouts hold no speculation rounds to calibrate on")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DSparkError(f"holdout fraction must be in [0, 1); got {holdout_fraction}")
    n = len(ro.domains)
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 1, int(round(holdout_fraction * n)))
    hold, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    fit_ro = ro.subset(fit)
    if not fit_ro.accepted.size:
        raise DSparkError("the fitting prompts hold no speculation rounds")
    temps = cal.fit_sts(fit_ro.logits(), fit_ro.accepted, fit_ro.depth, grid=grid, bins=bins)
    before = ro.temperatures if ro.temperatures is not None else np.ones(ro.gamma)

    def scored(sub: Rollouts) -> dict:
        z = sub.logits()
        return {"rounds": int(sub.accepted.size), "prompts": int(len(np.unique(sub.prompt))),
                "before": cal.position_metrics(cal.apply_sts(z, before), sub.accepted, sub.depth, bins),
                "after": cal.position_metrics(cal.apply_sts(z, temps), sub.accepted, sub.depth, bins)}

    rep = {"temperatures": temps.tolist(), "before_temperatures": before.tolist(), "bins": bins,
           "fit": scored(fit_ro)}
    if n_hold:
        rep["holdout"] = scored(ro.subset(hold))
    return temps, rep


def write_sts(folder: str, temps, meta: dict | None = None) -> str:
    """Write the drafter folder's STS file (read back by `dspark_jax.drafters.load`)."""
    from dspark_jax.drafters.folders import STS_FILE

    path = os.path.join(folder, STS_FILE)
    with open(path, "w") as f:
        json.dump({"temperatures": [float(t) for t in temps], **(meta or {})}, f, indent=2)
    return path


def jsonable(x):
    """NaN / inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)


def calibration_table(rep: dict, which: str = "fit") -> str:
    """Per-position before/after ECE and AUC of a_k (plus pooled) as text."""
    part = rep[which]
    lines = [f"{which}: {part['rounds']} rounds from {part['prompts']} prompts",
             f"{'k':>4} {'t_k':>7} {'n':>7} {'ECE before':>11} {'ECE after':>10} {'AUC before':>11} {'AUC after':>10}"]
    rows = list(zip(part["before"]["prefix"], part["after"]["prefix"]))
    for k, (b, a) in enumerate(rows, 1):
        lines.append(f"{k:>4} {rep['temperatures'][k - 1]:>7.3f} {a['n']:>7} {b['ece']:>11.4f} {a['ece']:>10.4f} "
                     f"{b['auc']:>11.4f} {a['auc']:>10.4f}")
    b, a = part["before"]["prefix_pooled"], part["after"]["prefix_pooled"]
    lines.append(f"{'all':>4} {'':>7} {a['n']:>7} {b['ece']:>11.4f} {a['ece']:>10.4f} "
                 f"{b['auc']:>11.4f} {a['auc']:>10.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(path: str, conf_sets: dict[str, np.ndarray], accepted, depth, *, bins: int = 15,
                     title: str = "") -> str:
    """Reliability diagrams of the prefix survival a_k = prod c_i against observed prefix
    acceptance: pooled over positions, then one panel per position; one line per entry
    of conf_sets ({label: per-step confidences [R, G]}, e.g. before / after STS)."""
    plt = _pyplot()
    g = next(iter(conf_sets.values())).shape[1]
    labels, valid = cal.prefix_outcomes(accepted, depth, g)
    panels = [("all positions", slice(None))] + [(f"position {k + 1}", k) for k in range(g)]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, sel) in zip(axes.flat, panels):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        for label, conf in conf_sets.items():
            a = cal.prefix_survival(conf)
            p, y, m = a[:, sel], labels[:, sel], valid[:, sel]
            x, f, n = cal.reliability_curve(p, y, bins, m)
            ok = n > 0
            ax.plot(x[ok], f[ok], marker="o", ms=3,
                    label=f"{label} (ECE {cal.ece(p, y, bins, m):.3f})")
        ax.set(title=name, xlim=(0, 1), ylim=(0, 1), xlabel="predicted a_k", ylabel="observed")
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_acceptance(path: str, rep: dict, title: str = "") -> str:
    """Per-position conditional acceptance per domain (lines) and tau per domain (bars)."""
    plt = _pyplot()
    groups = [(ALL, rep[ALL])] + sorted(rep["domains"].items())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, grp in groups:
        rate = np.asarray([np.nan if v is None else v for v in grp["conditional_acceptance"]], float)
        k = np.arange(1, rate.size + 1)
        left.plot(k, rate, marker="o", ms=3, lw=2.2 if name == ALL else 1.2,
                  color="black" if name == ALL else None, label=name)
    left.set(xlabel="draft position k", ylabel="P(accept x_k | x_<k accepted)", ylim=(0, 1.02),
             title="conditional acceptance")
    left.set_xticks(np.arange(1, rep["gamma"] + 1))
    left.legend(fontsize=7)
    taus = [g["tau"] if g["tau"] is not None else np.nan for _, g in groups]
    right.bar([n for n, _ in groups], taus, color=["black"] + ["C%d" % (i % 10) for i in range(len(groups) - 1)])
    right.set(ylabel="tau (tokens / round)", title="acceptance length")
    right.tick_params(axis="x", labelrotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------- CLI plumbing

def add_rollout_args(p) -> None:
    """Arguments shared by `train.evaluate` and `train.calibrate`."""
    p.add_argument("--target", required=True, help="target model folder (also the tokenizer)")
    p.add_argument("--draft", required=True, help="drafter folder")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", required=True, help="dataset name given to train.build_data")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-examples", type=int, default=0, help="only the first N examples (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bins", type=int, default=15, help="equal-width bins of the ECE")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")


def rollouts_from_args(args, desc: str, gamma: int | None = None) -> tuple[Rollouts, dict]:
    """Load target, drafter and data named by the CLI arguments and run the rollouts;
    returns (rollouts, run config for the report)."""
    from tqdm import tqdm

    from dspark_jax import drafters, target
    from dspark_jax.sampling import validate
    from dspark_jax.tokenizer import Tokenizer
    from train import data
    from train.loader import check_ids

    validate(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise DSparkError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.bins < 1:
        raise DSparkError(f"--bins must be >= 1; got {args.bins}")
    if args.max_examples < 0:
        raise DSparkError(f"--max-examples must be >= 0; got {args.max_examples}")
    source = data.load(args.data_dir, args.dataset)
    if args.split not in source:
        raise DSparkError(f"dataset '{args.dataset}' has no split '{args.split}' (it has: {', '.join(sorted(source))})")
    source = source[args.split]
    tcfg, tparams = target.load(args.target)
    data.check_tokenizer(args.data_dir, args.dataset, args.target, tcfg.vocab_size)
    drafter, dparams = drafters.load(args.draft, tcfg, gamma=gamma)
    stop_ids = () if args.ignore_eos else Tokenizer(args.target).stop_ids
    n = len(source) if not args.max_examples else min(args.max_examples, len(source))
    data.warn_small_split(n, f"split '{args.split}' of '{args.dataset}'"
                          + (f" (--max-examples {args.max_examples})" if n < len(source) else ""))

    def examples():
        for i in range(n):
            ex = source[i]
            check_ids(np.asarray(ex["input_ids"]), tcfg.vocab_size, f"example {i} of split '{args.split}'")
            yield ex

    with tqdm(total=n, desc=desc, unit="prompt") as bar:
        ro = collect(tcfg, tparams, drafter, dparams, examples(),
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, stop_ids=stop_ids,
                     progress=bar.update)
    run = {"target": args.target, "draft": args.draft, "drafter_kind": drafter.kind,
           "dataset": args.dataset, "split": args.split, "examples": len(ro.domains),
           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
           "top_p": args.top_p, "seed": args.seed, "bins": args.bins}
    return ro, run
