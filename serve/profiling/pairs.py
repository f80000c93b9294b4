"""Which models a profile measures: loaded pairs, or full-size presets with random weights."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import target
from dspark_jax.errors import DSparkError
from serve.profiling import roofline as rl


# ----------------------------------------------------------------------------- models

@dataclasses.dataclass
class Pair:
    tcfg: object
    tparams: object
    drafter: object   # BlockDrafter
    dparams: object
    meta: dict        # run-level facts (source, paths, names, random_weights ...)


def preset_config(name: str, dtype: str):
    from dspark_jax import config as qcfg
    from dspark_jax import config_gemma4 as gcfg

    table = {"qwen3-4b": qcfg.qwen3_4b, "qwen3-8b": qcfg.qwen3_8b, "qwen3-14b": qcfg.qwen3_14b,
             "qwen3-tiny": qcfg.qwen3_tiny, "gemma4-12b": gcfg.gemma4_12b, "gemma4-tiny": gcfg.gemma4_tiny}
    if name not in table:
        raise DSparkError(f"unknown preset '{name}'; choose one of {', '.join(PRESET_NAMES)}")
    return table[name](dtype=dtype)

from serve.profiling.device import _pseudo_random

PRESET_NAMES = ("qwen3-4b", "qwen3-8b", "qwen3-14b", "gemma4-12b", "qwen3-tiny", "gemma4-tiny")
DRAFT_LAYERS, DRAFT_RANK = 5, 256


def default_taps(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` target layers spread over 1 .. L-3 (Qwen3-4B: 1, 9, 17, 25, 33)."""
    lo, hi = (1, num_layers - 3) if num_layers >= 6 else (0, max(num_layers - 2, 0))
    if count <= 1 or hi <= lo:
        return (lo,)
    return tuple(sorted({int(round(lo + (hi - lo) * k / (count - 1))) for k in range(count)}))


def random_drafter(tcfg, gamma: int, layers: int | None = None, seed: int = 1, mesh=None):
    """A DSpark drafter with random weights shaped like the Qwen3-4B recipe (5 layers,
    5 taps, block 7, Markov rank 256, confidence head); 1 layer / 2 taps below 12 layers."""
    drafter = drafter_for(tcfg, gamma, layers)
    shapes, axes = drafter.param_shapes_and_axes()
    return drafter, random_tree(shapes, axes, mesh, seed)


def drafter_for(tcfg, gamma: int, layers: int | None = None):
    """The BlockDrafter (no parameters) that `random_drafter` fills with random weights."""
    from dspark_jax.config import Qwen3Config
    from dspark_jax.drafters.config import DrafterConfig
    from dspark_jax.drafters.dspark import BlockDrafter

    big = tcfg.num_hidden_layers >= 12
    layers = layers or (DRAFT_LAYERS if big else 1)
    if isinstance(tcfg, Qwen3Config):
        arch = tcfg.replace(num_hidden_layers=layers)
    else:  # Gemma 4: Qwen3-shaped draft layers over the target's width and vocabulary
        arch = Qwen3Config(vocab_size=tcfg.vocab_size, hidden_size=tcfg.hidden_size,
                           intermediate_size=tcfg.intermediate_size, num_hidden_layers=layers,
                           num_attention_heads=tcfg.num_attention_heads,
                           num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
                           max_position_embeddings=tcfg.max_position_embeddings, dtype=tcfg.dtype)
    cfg = DrafterConfig(arch=arch, target_layer_ids=default_taps(tcfg.num_hidden_layers, 5 if big else 2),
                        block_size=max(7, gamma), mask_token_id=tcfg.vocab_size - 1,
                        markov_rank=DRAFT_RANK if big else 16, num_target_layers=tcfg.num_hidden_layers)
    return BlockDrafter(cfg, tcfg, gamma)


def random_tree(shapes, axes, mesh, seed: int = 0):
    """Parameters of the given shapes, generated on device already sharded: vectors
    (norm weights, biases) are ones, matrices small pseudo-random values. One compiled
    generator per distinct (shape, dtype, sharding); the salt is a runtime argument."""
    from dspark_jax import mesh as mesh_lib

    leaves, treedef = jax.tree.flatten(shapes)
    shardings = jax.tree.leaves(mesh_lib.tree_shardings(axes, shapes, mesh)) if mesh is not None else \
        [None] * len(leaves)
    makers: dict = {}
    out = []
    for i, (s, sh) in enumerate(zip(leaves, shardings)):
        key = (tuple(s.shape), np.dtype(s.dtype).name, sh)
        if key not in makers:
            def make(salt, shape=tuple(s.shape), dtype=s.dtype):
                if len(shape) <= 1:
                    return jnp.ones(shape, dtype)
                return _pseudo_random(shape, salt, dtype)
            makers[key] = jax.jit(make, out_shardings=sh)
        out.append(makers[key](jnp.uint32((seed * 7919 + i) & 0xFFFFFFFF)))
    return jax.tree.unflatten(treedef, out)


def load_pair(*, target_dir: str | None, draft_dir: str | None, preset: str | None, dtype: str | None,
              gamma: int | None, mesh, draft_layers: int | None = None) -> Pair:
    """The pair to profile: bundled (default), folders, or a preset with random weights."""
    from dspark_jax import drafters
    from dspark_jax.drafters.dspark import BlockDrafter
    from dspark_jax.serving import BUNDLED_DIR, bundled_folder

    meta = {"preset": preset, "target_path": target_dir, "draft_path": draft_dir, "random_weights": False,
            "random_drafter": False}
    if preset is not None:
        if target_dir or draft_dir:
            raise DSparkError("--preset takes random weights: drop --target / --draft, or drop --preset")
        tcfg = preset_config(preset, dtype or "bfloat16")
        shapes, axes = target.param_shapes_and_axes(tcfg)
        tparams = None  # generated after the memory check (run_profile)
        meta.update(source="preset", model_name=preset, random_weights=True, random_drafter=True,
                    target_shapes=(shapes, axes))
        g = gamma or 7
        drafter, dparams = None, None
        return Pair(tcfg, tparams, drafter, {"gamma": g, "layers": draft_layers}, meta)
    source = "folders"
    if target_dir is None:
        target_dir, source = bundled_folder("target"), "bundled"
        if target_dir is None:
            raise DSparkError(f"no bundled pair at {BUNDLED_DIR}: pass --target DIR [--draft DIR] or --preset NAME")
        draft_dir = draft_dir or bundled_folder("dspark")
    tcfg, tparams = target.load(target_dir, dtype)
    tparams = target.shard(tcfg, tparams, mesh)
    meta.update(source=source, target_path=target_dir, draft_path=draft_dir,
                model_name=os.path.basename(os.path.normpath(target_dir)))
    if draft_dir is None:
        drafter, dparams = random_drafter(tcfg, gamma or 7, draft_layers, mesh=mesh)
        meta["random_drafter"] = True
    else:
        held_gamma = gamma
        if held_gamma is None:  # default 7, capped at the drafter's block size
            from dspark_jax import checkpoints

            held_gamma = min(7, int(checkpoints.read_config(draft_dir).get("block_size", 7)))
        drafter, dparams = drafters.load(draft_dir, tcfg, gamma=held_gamma, dtype=dtype)
        if not isinstance(drafter, BlockDrafter):
            raise DSparkError(f"{draft_dir}: serve.profile measures block drafters (DSpark / DFlash); "
                              f"this folder holds a {drafter.kind} drafter")
        dparams = drafter.shard(dparams, mesh)
    return Pair(tcfg, tparams, drafter, dparams, meta)


def model_meta(tcfg, drafter, name: str) -> dict:
    def cfg_dict(c):
        d = dataclasses.asdict(c)
        return json_safe(d)

    shapes, _ = target.param_shapes_and_axes(tcfg)
    n_t = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    item = rl.itemsize(tcfg.dtype)
    out = {"target": {"type": type(tcfg).__name__, "name": name, "config": cfg_dict(tcfg), "num_params": n_t,
                      "weight_bytes": n_t * item}}
    if drafter is not None:
        dshapes, _ = drafter.param_shapes_and_axes()
        n_d = sum(math.prod(s.shape) for s in jax.tree.leaves(dshapes))
        dcfg = cfg_dict(drafter.cfg)
        out["drafter"] = {"kind": drafter.kind, "gamma": drafter.gamma, "block_size": drafter.cfg.block_size,
                          "tap_layers": list(drafter.tap_layers), "config": dcfg, "num_params": n_d,
                          "weight_bytes": n_d * rl.itemsize(drafter.cfg.arch.dtype),
                          "sts_temperatures": list(drafter.sts_temperatures) if drafter.sts_temperatures else None}
    return out


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
