"""The load benchmark's report: the table (results.md), the frontier of scheduled against
fixed policies, the two plots (Figure 7 and 8 shapes) and results.json, written and read
back (several runs' files merge into one report)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from dspark_jax.engine import SCHEDULED as SCHEDULED_POLICIES
from dspark_jax.errors import DSparkError
from serve.load_points import LABELS, POLICIES, LoadRow, LoadSettings


def frontier(rows: Sequence[LoadRow]) -> list[dict]:
    """Per (mode, concurrency): the best scheduled policy's median throughput against the
    best fixed policy's (no speculation, MTP-1, fixed gamma, threshold), as a ratio of
    medians and as the range of per-repeat ratios (repeat i of both ran back to back)."""
    by: dict[tuple[str, int], dict[str, LoadRow]] = {}
    for r in rows:
        by.setdefault((r.mode, r.concurrency), {})[r.policy] = r
    out = []
    for (mode, c), pol in sorted(by.items()):
        sched = [r for p, r in pol.items() if p in SCHEDULED_POLICIES]
        fixed = [r for p, r in pol.items() if p not in SCHEDULED_POLICIES]
        if not sched or not fixed:
            continue
        best_s, best_f = (max(group, key=lambda r: r.throughput) for group in (sched, fixed))
        paired = [a / b for a, b in zip(best_s.repeat_throughputs, best_f.repeat_throughputs) if b > 0]
        out.append({"mode": mode, "concurrency": c, "scheduled": best_s.policy, "scheduled_tps": best_s.throughput,
                    "fixed": best_f.policy, "fixed_tps": best_f.throughput,
                    "ratio": best_s.throughput / best_f.throughput if best_f.throughput > 0 else 0.0,
                    "paired_min": min(paired, default=0.0), "paired_max": max(paired, default=0.0)})
    return out


def markdown(rows: Sequence[LoadRow], title: str = "Load benchmark") -> str:
    lines = [f"### {title}", "",
             "| mode | policy | concurrency | throughput tok/s | per-user tok/s | mean verified B | "
             "mean bucket | tau | host exposed | device idle | requests |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        spread = f" ({r.throughput_min:.0f}-{r.throughput_max:.0f})" if r.runs > 1 else ""
        lines.append(f"| {r.mode} | {LABELS.get(r.policy, r.policy)} | {r.concurrency} | {r.throughput:.1f}{spread} | "
                     f"{r.per_user:.1f} | {r.mean_verified:.2f} | {r.mean_budget:.2f} | {r.tau:.2f} | "
                     f"{r.host_exposed_frac:.3f} | {r.device_idle_frac:.3f} | "
                     f"{r.requests}{f' ({r.errors} failed)' if r.errors else ''} |")
    check = frontier(rows)
    if check:
        lines += ["", "Scheduled vs fixed policies (best of each group at each point; ratio of medians, "
                      "and the range of per-repeat ratios):", "",
                  "| mode | concurrency | best scheduled | tok/s | best fixed | tok/s | ratio | per-repeat |",
                  "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
        for f in check:
            lines.append(f"| {f['mode']} | {f['concurrency']} | {LABELS[f['scheduled']]} | {f['scheduled_tps']:.1f} | "
                         f"{LABELS[f['fixed']]} | {f['fixed_tps']:.1f} | {f['ratio']:.3f} | "
                         f"{f['paired_min']:.3f}-{f['paired_max']:.3f} |")
    return "\n".join(lines)


def plot(rows: Sequence[LoadRow], out_dir: str) -> list[str]:
    """throughput_vs_per_user.png (Figure 7 shape) and budget_vs_concurrency.png (Figure 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    series = {}
    for r in rows:
        series.setdefault((r.mode, r.policy), []).append(r)
    styles = {"closed": "-o", "poisson": "--s"}
    colors = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(POLICIES)}
    for name, x_of, y_of, xlabel, ylabel in (
            ("throughput_vs_per_user.png", lambda r: r.per_user, lambda r: r.throughput,
             "per-user tokens/s", "aggregate throughput (tokens/s)"),
            ("budget_vs_concurrency.png", lambda r: r.concurrency, lambda r: r.mean_verified,
             "concurrency", "mean verification budget B (tokens/round)")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for (mode, policy), pts in series.items():
            pts = sorted(pts, key=lambda r: r.concurrency)
            ax.plot([x_of(r) for r in pts], [y_of(r) for r in pts], styles.get(mode, "-o"),
                    color=colors.get(policy), label=f"{LABELS.get(policy, policy)} ({mode})")
            if name.startswith("throughput"):
                for r in pts:
                    ax.annotate(str(r.concurrency), (x_of(r), y_of(r)), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        if name.startswith("budget"):
            ax.set_xticks(sorted({r.concurrency for r in rows}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def read(paths: Sequence[str]) -> tuple[list[LoadRow], dict, dict]:
    """The rows of earlier runs' results.json files (a folder stands for its results.json),
    for one table and one pair of plots: a sweep run one level per process, say. Returns
    the rows, the first file's settings and its meta; a point found twice is an error."""
    rows, seen, first = [], set(), None
    for path in paths:
        file = os.path.join(path, "results.json") if os.path.isdir(path) else path
        try:
            with open(file) as f:
                data = json.load(f)
            names = {f.name for f in dataclasses.fields(LoadRow)}
            found = [LoadRow(**{**{k: v for k, v in r.items() if k in names},
                                "repeat_throughputs": tuple(r.get("repeat_throughputs", ()))}) for r in data["rows"]]
        except FileNotFoundError:
            raise DSparkError(f"no load-bench results at {file}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DSparkError(f"{file} is not a load-bench results.json ({type(e).__name__}: {e})") from None
        for r in found:
            if (r.mode, r.policy, r.concurrency) in seen:
                raise DSparkError(f"{file}: {r.mode} {r.policy} c={r.concurrency} is already in an earlier file")
            seen.add((r.mode, r.policy, r.concurrency))
        rows += found
        first = first or data
    order = {p: i for i, p in enumerate(POLICIES)}
    rows.sort(key=lambda r: (r.mode, order.get(r.policy, len(order)), r.concurrency))
    return rows, first.get("settings", {}) if first else {}, first.get("meta", {}) if first else {}


def write(rows: Sequence[LoadRow], settings: LoadSettings | dict, out_dir: str, meta: dict | None = None) -> dict:
    """results.json, results.md and the two plots under out_dir; returns their paths and,
    under "table", the markdown written to results.md."""
    os.makedirs(out_dir, exist_ok=True)
    title = "Load benchmark" + (f": {meta.get('title')}" if meta and meta.get("title") else "")
    md = markdown(rows, title)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as f:
        fields = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
        json.dump({"settings": fields, "meta": meta or {}, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(md + "\n")
    paths["plots"] = plot(rows, out_dir)
    paths["table"] = md
    return paths
