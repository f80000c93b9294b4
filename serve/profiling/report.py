"""Side-by-side comparison of backend profiles: Markdown tables and PNG plots.

The expected per-user speedup of DSpark on a backend, for a measured tau (mean tokens
committed per speculation round, bonus included), is

    L = (T_draft + T_verify) / tau      seconds per token with DSpark
    speedup = T_decode / L              against plain decoding's step time

with T_draft = propose + context ingest, T_verify = the verification step at
q_len = 1 + gamma and T_decode = the plain decode step, all at the same batch and
context of the same profile. Acceptance and sampling work and the host loop are not in
these numbers, so it is an upper estimate of what `serve.bench` measures end to end.
"""

from __future__ import annotations

import os
from typing import Sequence

from serve.profiling.schema import Profile, read_profile

PLOTS = ("step_time_vs_batch.png", "verify_ratio_vs_qlen.png", "sps.png", "time_over_floor.png",
         "speedup_vs_batch.png")


def _f(x, spec=".2f", none="–") -> str:
    return none if x is None else format(x, spec)


def _num(x: float) -> str:
    """Three significant figures without exponents for the usual range."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _memory_kind(p: Profile) -> str:
    return "device" if str(p.memory.get("source", "")).startswith("device") else "host RSS"


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _table(head: Sequence[str], rows: list[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(head) - 1)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def short_names(profiles: Sequence[Profile]) -> list[str]:
    """`A: <device>`, `B: ...`: one letter per file plus the device, used in tables and legends."""
    def device(p):
        b = p.backend
        if b.get("platform") == "cpu":
            return f"CPU x{p.host.get('cpu_count', '?')} cores"
        n = b.get("devices_used") or 1
        return f"{b.get('device_kind', '?')}{f' x{n}' if n > 1 else ''}"
    return [f"{chr(65 + i)}: {device(p)} ({p.run.get('dtype', '?')}, {p.model_name})"
            for i, p in enumerate(profiles)]


def speedup_rows(p: Profile, tau: float) -> list[dict]:
    """Per (batch, context) with decode, verify(1 + gamma) and drafter measured."""
    g = int(p.run.get("gamma", 0))
    out = []
    for dec in sorted((s for s in p.steps if s.kind == "decode"), key=lambda s: (s.context, s.batch)):
        ver = p.step("verify", dec.batch, dec.context, 1 + g)
        dr = p.drafter_at(dec.batch, dec.context)
        if ver is None or dr is None:
            continue
        latency = (dr.draft_ms + ver.time_ms) / tau
        out.append({"batch": dec.batch, "context": dec.context, "decode_ms": dec.time_ms, "draft_ms": dr.draft_ms,
                    "verify_ms": ver.time_ms, "latency_ms": latency, "speedup": dec.time_ms / latency,
                    "tokens_per_s_user": 1e3 / latency, "plain_tokens_per_s_user": 1e3 / dec.time_ms})
    return out


def _ref_context(p: Profile) -> int | None:
    ctx = sorted({s.context for s in p.steps})
    return ctx[0] if ctx else None


# ----------------------------------------------------------------------------- Markdown

def markdown(profiles: Sequence[Profile], paths: Sequence[str], tau: float, plots: Sequence[str] = (),
             note: str | None = None) -> str:
    names = short_names(profiles)
    lines = ["# Backend comparison: DSpark step costs", ""] + ([f"> {note}", ""] if note else []) + [
             f"Rendered by `python -m serve.report` from {len(profiles)} profile(s); tau = {tau:g} "
             "(mean tokens committed per speculation round, bonus included) for the speedup estimate.",
             "Each time is the median of the timed calls; `x floor` is time / roofline floor, the floor being "
             "max(bytes / measured bandwidth, FLOPs / measured matmul rate) with both rates measured in the "
             "same run (see `serve/profiling/roofline.py` for what is counted).", ""]
    # backends
    lines += ["## Backends", ""]
    rows = []
    for name, p, path in zip(names, profiles, paths):
        b, cal, t = p.backend, p.calibration, p.models.get("target", {})
        bw = cal.get("memory_bandwidth", {}).get("bytes_per_s")
        fs = cal.get("matmul", {}).get("flops_per_s")
        d = p.models.get("drafter", {})
        rows.append([name, f"`{os.path.basename(path)}`", b.get("device_description") or b.get("device_kind"),
                     b.get("platform"), f"{b.get('devices_used')}/{b.get('device_count')}", p.run.get("mesh"),
                     p.run.get("dtype"),
                     f"{p.model_name} ({_f(t.get('num_params', 0) / 1e9, '.2f')}B"
                     f"{', random weights' if p.run.get('random_weights') else ''})",
                     f"{d.get('kind', '–')} {d.get('config', {}).get('arch', {}).get('num_hidden_layers', '?')}L, "
                     f"gamma {p.run.get('gamma')}" + (" (random)" if p.run.get("random_drafter") else ""),
                     f"{b.get('jax_version')}", _f(bw and bw / 1e9, ".1f"), _f(fs and fs / 1e12, ".3f"),
                     f"{_bytes(p.memory.get('peak_bytes'))} ({_memory_kind(p)})",
                     p.status + (f": {p.error}" if p.error else ""), p.created[:10]])
    lines += _table(["", "file", "device", "platform", "devices used/seen", "mesh", "dtype", "target", "drafter",
                     "jax", "bandwidth GB/s", "matmul TFLOP/s", "peak memory", "status", "date"], rows,
                    ["---"] * 10 + ["---:", "---:", "---:", "---", "---"])
    lines.append("")

    # decode step time vs batch
    contexts = sorted({s.context for p in profiles for s in p.steps})
    batches = sorted({s.batch for p in profiles for s in p.steps})
    lines += ["## Decode step time vs batch (q_len 1, ms; x floor)", ""]
    for ctx in contexts:
        rows = []
        for b in batches:
            cells = []
            for p in profiles:
                s = p.step("decode", b, ctx, 1)
                cells.append("–" if s is None else f"{s.time_ms:.3f} (x{s.roofline.time_over_floor:.1f})")
            if any(c != "–" for c in cells):
                rows.append([b] + cells)
        if rows:
            lines += [f"Context {ctx}:", ""] + _table(["batch"] + names, rows) + [""]

    # verification cost ratio
    lines += ["## Verification step: time relative to plain decode, by query length", "",
              "verify(q_len) / decode at the same batch and context (verification also taps the drafter's "
              "feature layers). Smallest context of each profile.", ""]
    qs = sorted({s.q_len for p in profiles for s in p.steps if s.kind == "verify"})
    head, cols = ["q_len"], []
    for name, p in zip(names, profiles):
        ctx = _ref_context(p)
        for b in sorted({s.batch for s in p.steps if s.context == ctx}):
            head.append(f"{name.split(':')[0]} b{b} c{ctx}")
            cols.append((p, b, ctx))
    rows = []
    for q in qs:
        row = [q]
        for p, b, ctx in cols:
            v, d = p.step("verify", b, ctx, q), p.step("decode", b, ctx, 1)
            row.append("–" if v is None or d is None else f"{v.time_ms / d.time_ms:.2f}")
        rows.append(row)
    if rows:
        lines += _table(head, rows) + [""]

    # time / floor, all steps
    lines += ["## Step time against the roofline floor", ""]
    keys = sorted({(s.context, s.batch, s.kind != "decode", s.q_len) for p in profiles for s in p.steps})
    rows = []
    for ctx, b, is_verify, q in keys:
        kind = "verify" if is_verify else "decode"
        row = [kind, b, ctx, q]
        for p in profiles:
            s = p.step(kind, b, ctx, q)
            row.append("–" if s is None else
                       f"{s.time_ms:.3f} / {s.roofline.floor_ms:.3f} = x{s.roofline.time_over_floor:.1f} "
                       f"({s.roofline.bound[0]})")
        rows.append(row)
    lines += ["time ms / floor ms = ratio (m = memory-bound floor, c = compute-bound floor)", ""]
    lines += _table(["step", "batch", "context", "q_len"] + names, rows) + [""]

    # drafter
    lines += ["## Drafter (ms): parallel pass, sequential head, context ingest", "",
              "parallel = block_hidden + base logits; head = propose - parallel (Markov head, confidences, "
              "sampling, in a lax.scan); ingest = appending 1 + gamma positions of context K/V.", ""]
    dkeys = sorted({(d.context, d.batch) for p in profiles for d in p.drafter})
    rows = []
    for ctx, b in dkeys:
        row = [b, ctx]
        for p in profiles:
            d = p.drafter_at(b, ctx)
            row.append("–" if d is None else f"{d.parallel_ms:.3f} + {d.head_ms:.3f} + {d.ingest_ms:.3f} "
                       f"= {d.draft_ms:.3f} (x{d.roofline.time_over_floor:.1f})")
        rows.append(row)
    if rows:
        lines += _table(["batch", "context"] + names, rows) + [""]

    # SPS
    lines += ["## SPS(B): packed verification steps per second at a budget of B tokens", ""]
    budgets = sorted({r.budget for p in profiles for r in p.sps})
    rows = []
    for bud in budgets:
        row = [bud]
        for p in profiles:
            r = next((r for r in p.sps if r.budget == bud), None)
            row.append("–" if r is None else
                       f"{_num(r.sps)} ({_num(bud * r.sps)} tok/s, x{r.roofline.time_over_floor:.1f})")
        rows.append(row)
    if rows:
        slots = ["/".join(str(x) for x in sorted({r.slots for r in p.sps})) or "–" for p in profiles]
        lines += [f"Slots per profile: {', '.join(f'{n.split(chr(58))[0]} {s}' for n, s in zip(names, slots))}. "
                  "Cell: steps/s (B x steps/s, x floor).", ""]
        lines += _table(["B"] + names, rows) + [""]

    # prefill
    pre = sorted({(r.batch, r.length) for p in profiles for r in p.prefill})
    if pre:
        lines += ["## Prefill throughput (tokens/s; x floor)", ""]
        rows = []
        for b, n in pre:
            row = [b, n]
            for p in profiles:
                r = next((r for r in p.prefill if (r.batch, r.length) == (b, n)), None)
                row.append("–" if r is None else f"{_num(r.tokens_per_s)} (x{r.roofline.time_over_floor:.1f})")
            rows.append(row)
        lines += _table(["batch", "prompt tokens"] + names, rows) + [""]

    # speedup
    lines += [f"## Expected per-user speedup of DSpark at tau = {tau:g}", "",
              "L = (T_draft + T_verify) / tau against plain decoding's T_decode (ms per token); "
              "T_draft = propose + ingest, T_verify = verification at q_len 1 + gamma.", ""]
    rows = []
    for name, p in zip(names, profiles):
        for r in speedup_rows(p, tau):
            rows.append([name, r["batch"], r["context"], f"{r['decode_ms']:.3f}", f"{r['draft_ms']:.3f}",
                         f"{r['verify_ms']:.3f}", f"{r['latency_ms']:.3f}", f"**{r['speedup']:.2f}x**",
                         f"{r['plain_tokens_per_s_user']:.1f} -> {r['tokens_per_s_user']:.1f}"])
    if rows:
        lines += _table(["backend", "batch", "context", "T_decode", "T_draft", "T_verify", "L", "speedup",
                         "tokens/s per user"], rows, ["---"] + ["---:"] * 8) + [""]
    else:
        lines += ["(no profile has decode, verify(1 + gamma) and drafter at a common batch and context)", ""]

    # compile
    lines += ["## Compile times (s)", ""]
    rows = []
    for name, p in zip(names, profiles):
        cs = [s.compile_s for s in p.steps] + [r.compile_s for r in p.sps] + [r.compile_s for r in p.prefill] + \
             [v for d in p.drafter for v in d.compile_s.values()]
        if cs:
            cs = sorted(cs)
            rows.append([name, len(cs), f"{cs[len(cs) // 2]:.1f}", f"{cs[-1]:.1f}", f"{sum(cs):.0f}"])
    if rows:
        lines += _table(["backend", "programs", "median", "max", "total"], rows) + [""]

    # skipped
    skipped = [(name, s) for name, p in zip(names, profiles) for s in p.skipped]
    if skipped:
        lines += ["## Skipped", ""]
        lines += _table(["backend", "what", "batch", "context", "q_len/B", "reason"],
                        [[n, s.what, _f(s.batch, "d"), _f(s.context, "d"), _f(s.q_len, "d"), s.reason]
                         for n, s in skipped], ["---"] * 6) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(x)[0]}]({x})" for x in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def plot_all(profiles: Sequence[Profile], out_dir: str, tau: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = short_names(profiles)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. step time vs batch, one panel per context
    contexts = sorted({s.context for p in profiles for s in p.steps})[:4] or [0]
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        for i, (name, p) in enumerate(zip(names, profiles)):
            g = 1 + int(p.run.get("gamma", 0))
            for kind, q, style in (("decode", 1, "o-"), ("verify", g, "s--")):
                pts = sorted((s.batch, s.time_ms) for s in p.steps if s.kind == kind and s.context == ctx
                             and s.q_len == q)
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[i % len(colors)],
                            label=f"{name.split(':')[0]} {kind}{'' if kind == 'decode' else f' q{q}'}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"context {ctx}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Step time vs batch — " + "; ".join(names), fontsize=7)
    save(fig, PLOTS[0])

    # 2. verify / decode vs q_len (smallest context of each profile)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, p) in enumerate(zip(names, profiles)):
        ctx = _ref_context(p)
        for j, b in enumerate(sorted({s.batch for s in p.steps if s.context == ctx})):
            d = p.step("decode", b, ctx, 1)
            pts = sorted((s.q_len, s.time_ms / d.time_ms) for s in p.steps
                         if d is not None and s.kind == "verify" and s.batch == b and s.context == ctx)
            if pts:
                ax.plot(*zip(*pts), ["o-", "s--", "^:", "d-."][j % 4], color=colors[i % len(colors)],
                        label=f"{name.split(':')[0]} batch {b}, ctx {ctx}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("query length (1 + verified drafts)")
    ax.set_ylabel("verify time / decode time")
    ax.set_title("Verification cost relative to plain decode", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, PLOTS[1])

    # 3. SPS curves
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, p) in enumerate(zip(names, profiles)):
        for slots in sorted({r.slots for r in p.sps}):
            pts = sorted((r.budget, r.sps) for r in p.sps if r.slots == slots)
            ax.plot(*zip(*pts), "o-", color=colors[i % len(colors)],
                    label=f"{name.split(':')[0]} {slots} slots, ctx {p.sps[0].context}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("verification budget B (tokens per step)")
    ax.set_ylabel("steps / s")
    ax.set_title("SPS(B)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if any(p.sps for p in profiles):
        ax.legend(fontsize=7)
    save(fig, PLOTS[2])

    # 4. time / floor vs batch
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, p) in enumerate(zip(names, profiles)):
        ctx = _ref_context(p)
        g = 1 + int(p.run.get("gamma", 0))
        for kind, q, style in (("decode", 1, "o-"), ("verify", g, "s--")):
            pts = sorted((s.batch, s.roofline.time_over_floor) for s in p.steps
                         if s.kind == kind and s.context == ctx and s.q_len == q)
            if pts:
                ax.plot(*zip(*pts), style, color=colors[i % len(colors)],
                        label=f"{name.split(':')[0]} {kind}{'' if kind == 'decode' else f' q{q}'}, ctx {ctx}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("time / roofline floor")
    ax.set_title("Distance from the roofline (1 = at the floor)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save(fig, PLOTS[3])

    # 5. expected speedup vs batch
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, p) in enumerate(zip(names, profiles)):
        rows = speedup_rows(p, tau)
        for j, ctx in enumerate(sorted({r["context"] for r in rows})):
            pts = sorted((r["batch"], r["speedup"]) for r in rows if r["context"] == ctx)
            ax.plot(*zip(*pts), ["o-", "s--", "^:", "d-."][j % 4], color=colors[i % len(colors)],
                    label=f"{name.split(':')[0]} ctx {ctx}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("expected per-user speedup")
    ax.set_title(f"DSpark vs plain decoding at tau = {tau:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, PLOTS[4])
    return written


def render(paths: Sequence[str], out_dir: str, tau: float = 3.2, plots: bool = True, note: str | None = None) -> dict:
    """Read profiles, write <out_dir>/report.md and the PNGs; returns what was written."""
    from dspark_jax.errors import DSparkError

    if tau <= 0:
        raise DSparkError(f"--tau must be > 0; got {tau}")
    if not paths:
        raise DSparkError("no profile given")
    profiles = [read_profile(p) for p in paths]
    os.makedirs(out_dir, exist_ok=True)
    written = plot_all(profiles, out_dir, tau) if plots else []
    md = markdown(profiles, paths, tau, written, note)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    return {"markdown": md_path, "plots": [os.path.join(out_dir, x) for x in written]}
