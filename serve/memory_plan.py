"""Memory plan of a DeepSeek-V4 target: bytes per device on a mesh, and the smallest slice it fits.

    python -m serve.memory_plan --preset deepseek-v4-flash
    python -m serve.memory_plan --preset deepseek-v4-pro --mesh 1x64 --weights fp8 --json
    python -m serve.memory_plan --target /path/DeepSeek-V4-Flash

Prints the parameter counts, the weights' bytes per device on a (data, model) mesh in
each weight format, the KV cache per token, and for TPU v5e / v5p and H100 the smallest
slice the weights fit on. Nothing is allocated and no device is needed.

Parameter shapes and logical axes come from `jax.eval_shape` of the model's init
(target.param_shapes_and_axes) on one layer of each (attention type, MLP type) pair the
config uses, each counted as often as the config has it (a layer's parameters depend on
nothing else). Each parameter's PartitionSpec is
dspark_jax/mesh.py's logical_to_spec under SERVING_RULES on an AbstractMesh of the
mesh's shape, so bytes per device = bytes / product of the mesh axes it is split over
(experts over `model`: expert parallelism; weights are replicated over `data`).

Weight formats:
  bf16  the parameters as the project loads them with dtype bfloat16 (the modules
        transformers keeps in float32 stay float32); today's footprint, since FP8
        folders are dequantised at load;
  fp8   1-byte weights for what released V4 folders quantise (attention q/kv/o
        projections, the indexer's q projection, routed and shared experts) plus float32
        128 x 128 block scales; the rest as in bf16 (embeddings, head, router, norms,
        compressor / indexer kv, gate and weights projections, hc, sinks, biases);
  fp4   as released: routed experts 4-bit with a 1-byte scale per 32 inputs, the other
        fp8 weights with 1-byte (ue8m0) 128 x 128 block scales.
Smallest slice: the smallest power-of-two chip count, mesh 1xM (data x model), whose
weights take at most --headroom of a chip's memory; what the budget leaves after the
weights is shown as KV-cache tokens per chip (the cache splits over `data` by request,
not over `model`). The rest of memory is for activations and XLA's scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os

import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors

GIB = 2 ** 30
HARDWARE = {"tpu-v5e": 16, "tpu-v5p": 95, "h100": 80}   # GiB of accelerator memory per chip
FORMATS = ("bf16", "fp8", "fp4")
HEADROOM = 0.85
BLOCK, FP4_GROUP = 128, 32
MAX_CHIPS = 4096
_QUANT_ATTN = ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of the model: `count` layers hold one each (1 outside the layers)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple | None
    count: int
    role: str   # "expert" (routed experts), "quant" (other weights FP8 in released folders), "keep"


def _role(path: tuple[str, ...]) -> str:
    p = "/".join(path)
    if path[-2:-1] == ("experts",):
        return "expert"
    if path[-1] == "kernel" and ("/shared_experts/" in p or p.endswith("indexer/q_b_proj/kernel")
                                 or ("/compressor/" not in p and path[-2] in _QUANT_ATTN)):
        return "quant"
    return "keep"


@functools.lru_cache(maxsize=8)
def params(cfg) -> tuple[Param, ...]:
    """Every parameter of the target: eval_shape of one layer per (attention, MLP) kind."""
    import jax

    from dspark_jax import mesh as mesh_lib
    from dspark_jax import target

    kinds: dict[tuple[str, str], int] = {}
    for kind in zip(cfg.layer_types, cfg.mlp_layer_types):
        kinds[kind] = kinds.get(kind, 0) + 1
    keys = list(kinds)
    small = cfg.replace(num_hidden_layers=len(keys), layer_types=tuple(k[0] for k in keys),
                        mlp_layer_types=tuple(k[1] for k in keys))
    shapes, axes = target.param_shapes_and_axes(small)
    axes_by_path = {tuple(k.key for k in p): a for p, a in
                    jax.tree_util.tree_flatten_with_path(axes, is_leaf=mesh_lib._is_axes)[0]}
    out = []
    for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in p)
        count, name = 1, "/".join(path)
        if path[0].startswith("layers_"):
            a, m = keys[int(path[0][len("layers_"):])]
            count, name = kinds[(a, m)], f"layers[{a.split('_')[0]}+{m}]/" + "/".join(path[1:])
        out.append(Param(name, tuple(leaf.shape), str(leaf.dtype), axes_by_path[path], count, _role(path)))
    return tuple(out)


def _matrices(p: Param) -> tuple[int, int, int]:
    """(count, out, in) of the 2-D [out, in] weights a folder stores for this parameter."""
    s, last = p.shape, p.name.split("/")[-2]
    if p.name.endswith("gate_up_proj"):          # [X, 2, I, E]: w1, w3 [I, E] per expert
        return 2 * s[0], s[2], s[3]
    if p.name.endswith("down_proj") and p.role == "expert":   # [X, E, I]: w2 [E, I]
        return s[0], s[1], s[2]
    if last == "o_a_proj":                        # [g, w, r] <- [g * r, w]
        return 1, s[0] * s[2], s[1]
    if last == "o_b_proj":                        # [g, r, E] <- [E, g * r]
        return 1, s[2], s[0] * s[1]
    return 1, math.prod(s[1:]), s[0]              # [in, *out]


def stored_bytes(p: Param, fmt: str) -> int:
    """Bytes of one copy of `p` (all layers) in weight format `fmt` (module docstring)."""
    n = math.prod(p.shape)
    if fmt == "bf16" or p.role == "keep":
        return n * np.dtype(p.dtype).itemsize * p.count
    k, rows, cols = _matrices(p)
    if fmt == "fp4" and p.role == "expert":
        return (n // 2 + k * rows * -(-cols // FP4_GROUP)) * p.count
    scale = 4 if fmt == "fp8" else 1
    return (n + k * -(-rows // BLOCK) * -(-cols // BLOCK) * scale) * p.count


def split(p: Param, mesh) -> int:
    """How many ways `p` is split on `mesh`: the product of its PartitionSpec's mesh axes."""
    from dspark_jax import mesh as mesh_lib

    spec = mesh_lib.logical_to_spec(p.axes, p.shape, mesh, mesh_lib.SERVING_RULES)
    return math.prod(mesh.shape[a] for a in spec if a is not None)


def abstract_mesh(data: int, model: int):
    from jax.sharding import AbstractMesh

    from dspark_jax import mesh as mesh_lib

    return AbstractMesh((data, model), mesh_lib.MESH_AXES)


def bytes_per_device(ps: list[Param], fmt: str, data: int, model: int, unsplit: bool = False) -> int:
    """Weight bytes each device of a data x model mesh holds (`unsplit`: only those of
    parameters the mesh rules leave whole, e.g. where `model` does not divide the axis)."""
    mesh = abstract_mesh(data, model)
    per = ((stored_bytes(p, fmt), split(p, mesh)) for p in ps)
    return sum(-(-b // k) for b, k in per if not unsplit or k == 1)


def counts(cfg, ps: list[Param]) -> dict:
    """Parameter counts (floating parameters; the hash routers' tid2eid tables are not
    counted). Active per token: k of the X routed experts, and not the input embedding
    table (a token reads one row of it); the output head counts. The MTP layer of
    released folders is not part of the model and not counted."""
    floating = [p for p in ps if jnp.issubdtype(p.dtype, jnp.floating)]

    def n(ps_):
        return sum(math.prod(p.shape) * p.count for p in ps_)

    total, routed = n(floating), n(p for p in floating if p.role == "expert")
    embedding = n(p for p in floating if p.name == "embed_tokens/embedding")
    active = total - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total": total, "active": active, "routed_experts": routed, "embedding": embedding}


@functools.lru_cache(maxsize=8)
def cache_per_token(cfg, max_len: int = 1024) -> dict:
    """KV-cache bytes per token per request, by field, from eval_shape of target.init_cache
    (stored in the compute dtype on an accelerator; a CPU keeps float32)."""
    import jax

    from dspark_jax import target

    shapes = jax.eval_shape(lambda: target.init_cache(cfg, 1, max_len))
    item = np.dtype(cfg.dtype).itemsize
    out = {}
    for f in dataclasses.fields(shapes):
        x = getattr(shapes, f.name)
        if jnp.issubdtype(x.dtype, jnp.floating):
            out[f.name] = math.prod(x.shape) * item / max_len
    out["total"] = sum(out.values())
    return out


POWERS_OF_TWO = tuple(2 ** k for k in range(MAX_CHIPS.bit_length()))


def smallest_slice(ps, cfg, fmt: str, hbm_gib: float, headroom: float, cache_token: float) -> dict:
    """The smallest 1xM power-of-two mesh whose weights fit `headroom` of a chip; when none
    does, also the smallest 1xM with M = (odd part of X) * 2^k (experts still divide)."""
    budget = headroom * hbm_gib * GIB
    tried = {}

    def fits(m):
        tried[m] = tried.get(m) or bytes_per_device(ps, fmt, 1, m)
        return tried[m] <= budget

    def row(m):
        w = tried[m]
        return {"chips": m, "mesh": f"1x{m}", "weights_gib": w / GIB, "hbm_frac": w / (hbm_gib * GIB),
                "unsplit_gib": bytes_per_device(ps, fmt, 1, m, unsplit=True) / GIB,
                "kv_tokens_per_chip": max(int((budget - w) // cache_token), 0)}

    best = next((m for m in POWERS_OF_TWO if fits(m)), None)
    out = {"hardware_gib": hbm_gib, "format": fmt, "fit": row(best) if best else None}
    if best is None:
        low = min(tried, key=tried.get)
        out["closest"] = row(low)
        odd = cfg.n_routed_experts // (cfg.n_routed_experts & -cfg.n_routed_experts)
        alt = next((m for m in (odd * 2 ** k for k in range(13)) if m <= MAX_CHIPS and odd > 1 and fits(m)), None)
        out["non_power_of_two"] = row(alt) if alt else None
    return out


def plan(cfg, name: str, formats=FORMATS, mesh: tuple[int, int] | None = None,
         headroom: float = HEADROOM) -> dict:
    """Everything the CLI prints, as one JSON-ready dict."""
    ps = params(cfg)
    cache = cache_per_token(cfg)
    out = {"model": name, "layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts,
           "top_k": cfg.num_experts_per_tok, "params": counts(cfg, ps), "headroom": headroom,
           "weights_total_gib": {f: bytes_per_device(ps, f, 1, 1) / GIB for f in formats},
           "kv_cache_bytes_per_token": cache,
           "slices": [{"hardware": hw, **smallest_slice(ps, cfg, f, gib, headroom, cache["total"])}
                      for hw, gib in HARDWARE.items() for f in formats]}
    if mesh is not None:
        out["mesh"] = {"mesh": f"{mesh[0]}x{mesh[1]}", "gib_per_device": {
            f: bytes_per_device(ps, f, *mesh) / GIB for f in formats}}
    return out


def _slice_cell(s: dict) -> tuple[str, str, str, str]:
    r = s["fit"]
    if r:
        return f"{r['chips']} ({r['mesh']})", f"{r['weights_gib']:.1f}", f"{100 * r['hbm_frac']:.0f}%", \
            f"{r['kv_tokens_per_chip']:,}"
    c, alt = s["closest"], s.get("non_power_of_two")
    note = f"none; {alt['chips']} ({alt['mesh']}) fits" if alt else "none"
    return note, f"{c['weights_gib']:.1f} at {c['chips']}", f"{100 * c['hbm_frac']:.0f}%", "-"


def markdown(p: dict) -> str:
    c, kv = p["params"], p["kv_cache_bytes_per_token"]
    lines = [f"{p['model']}: {c['total'] / 1e9:.2f}B parameters, {c['active'] / 1e9:.2f}B active per token "
             f"({p['top_k']} of {p['experts']} routed experts), {p['layers']} layers",
             "weights in total: " + ", ".join(f"{f} {g:.1f} GiB" for f, g in p["weights_total_gib"].items()),
             f"KV cache: {kv['total'] / 1024:.1f} KiB per token per request ("
             + ", ".join(f"{k} {v / 1024:.1f}" for k, v in kv.items() if k != "total")
             + " KiB), split over data by request, replicated over model"]
    if "mesh" in p:
        lines.append(f"mesh {p['mesh']['mesh']}: " + ", ".join(
            f"{f} {g:.2f} GiB/device" for f, g in p["mesh"]["gib_per_device"].items()))
    lines += ["", f"Smallest slice (weights <= {100 * p['headroom']:.0f}% of a chip; experts over model):", "",
              "| hardware | GiB/chip | weights | chips (mesh) | weights GiB/chip | of HBM | KV tokens that fit |",
              "|---|---:|---|---|---:|---:|---:|"]
    for s in p["slices"]:
        chips, w, frac, kvt = _slice_cell(s)
        lines.append(f"| {s['hardware']} | {s['hardware_gib']} | {s['format']} | {chips} | {w} | {frac} | {kvt} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.memory_plan", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter, epilog=__doc__.split("\n", 2)[2])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset of configs/models/deepseek_v4.py (deepseek-v4-flash, deepseek-v4-pro)")
    src.add_argument("--target", help="a DeepSeek-V4 folder: plan its config.json")
    p.add_argument("--mesh", help="also give bytes per device on this DATAxMODEL mesh, e.g. 1x64")
    p.add_argument("--weights", choices=FORMATS, help="one weight format only (default: all)")
    p.add_argument("--headroom", type=float, default=HEADROOM, help="share of a chip's memory the weights may use")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    with cli_errors("serve.memory_plan"):
        if not 0 < args.headroom <= 1:
            raise DSparkError(f"--headroom must be in (0, 1]; got {args.headroom}")
        from dspark_jax import mesh as mesh_lib

        mesh = mesh_lib.parse_mesh(args.mesh) if args.mesh else None
        if args.target:
            from dspark_jax.checkpoints import read_config
            from dspark_jax.config_deepseek_v4 import DeepseekV4Config

            path = os.path.join(args.target, "config.json")
            if not os.path.isfile(path):
                raise DSparkError(f"--target {args.target}: no config.json there")
            cfg, name = DeepseekV4Config.from_hf(read_config(args.target), path, "bfloat16"), args.target
        else:
            from configs.models.deepseek_v4 import preset

            cfg, name = preset(args.preset), args.preset
        result = plan(cfg, name, (args.weights,) if args.weights else FORMATS, mesh, args.headroom)
        print(json.dumps(result, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
