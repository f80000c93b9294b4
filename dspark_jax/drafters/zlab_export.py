"""Write a DFlash drafter as a z-lab folder (`DFlashDraftModel`), the layout vLLM and
SGLang load; refuse, in one line, every drafter that folder cannot hold faithfully.

A z-lab folder is read as drafters/zlab.py reads it (z-lab/dflash at ZLAB_REVISION): its
block is the anchor followed by `block_size - 1` mask tokens and its drafts are read at
the mask positions 1..block_size-1. Only a drafter that computes exactly that goes out:
a `ZlabDFlashDrafter` (no sequential head, no confidence head, Qwen3 draft layers
without RoPE scaling, a Qwen3 or Llama 3 target). A DeepSpec DFlash drafter drafts from
block positions 0..gamma-1 (draft 1 is read at the anchor's own position and RoPE
position): no z-lab block reproduces that, so it is refused, as are DSpark drafters
(their Markov/RNN sequential head has no z-lab equivalent) and Eagle3 drafters.

The folder holds config.json (the fields z-lab's class writes: a Qwen3 config of the
draft layers plus `block_size`, `num_target_layers` and `dflash_config {mask_token_id,
target_layer_ids}`, the taps always written out) and model.safetensors with `layers.*`,
`fc`, `hidden_norm` and `norm` (no embedding or LM head: z-lab reads the target's).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from dspark_jax import checkpoints
from dspark_jax.config import Qwen3Config
from dspark_jax.drafters import zlab
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.errors import DSparkError

LAYOUTS = ("deepspec", "zlab")
ZLAB_SUFFIX = "_zlab"   # <out_dir>/drafter_zlab beside the DeepSpec <out_dir>/drafter


def parse_layouts(text: str) -> tuple[str, ...]:
    """"deepspec", "zlab" or both comma-separated -> the layouts, in order, checked."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [n for n in names if n not in LAYOUTS]
    if not names or bad or len(set(names)) != len(names):
        raise DSparkError(f"export_layout must be deepspec, zlab or deepspec,zlab; got '{text}'")
    return names


def zlab_refusal(drafter) -> str | None:
    """Why `drafter` has no faithful z-lab folder (None when it has one)."""
    kind = getattr(drafter, "kind", type(drafter).__name__)
    cfg = getattr(drafter, "cfg", None)
    if kind == "dspark" or getattr(cfg, "markov_rank", 0) > 0:
        return "a DSpark drafter's sequential (Markov/RNN) head has no z-lab equivalent"
    if kind == "eagle3":
        return "an Eagle3 drafter is not a DFlash drafter (z-lab's layout holds DFlash drafters only)"
    if not isinstance(drafter, BlockDrafter):
        return f"a {kind} drafter ({type(drafter).__name__}) is not a DFlash block drafter"
    if cfg.has_confidence:
        return "its confidence head has no z-lab equivalent"
    if type(drafter) is not zlab.ZlabDFlashDrafter:
        return (f"it drafts from block positions 0..{cfg.block_size - 1} (draft 1 at the anchor's own position, "
                f"DeepSpec's convention) but z-lab drafts from the mask positions 1..block_size-1, "
                "a different computation; train it with block_convention=zlab")
    if not isinstance(drafter.tcfg, Qwen3Config):
        return f"its target is a {type(drafter.tcfg).__name__} (z-lab drafters serve Qwen3 and Llama 3 targets)"
    if type(cfg.arch) is not Qwen3Config:
        return f"its draft layers are {type(cfg.arch).__name__} layers (z-lab's are plain Qwen3 layers)"
    return None


def deepspec_refusal(drafter) -> str | None:
    """Why `drafter` has no faithful DeepSpec folder: a z-lab-convention drafter does
    not, since a DeepSpec folder's drafts are read from block positions 0.. on load."""
    if isinstance(drafter, zlab.ZlabDFlashDrafter):
        return ("it drafts from the mask positions 1..block_size-1 (z-lab's convention) but a DeepSpec folder "
                "drafts from block positions 0..")
    return None


def check_exportable(drafter, layouts) -> None:
    """One-line DSparkError unless every layout in `layouts` holds `drafter` faithfully."""
    for layout in layouts:
        why = (zlab_refusal if layout == "zlab" else deepspec_refusal)(drafter)
        if why:
            name = zlab.LAYOUT if layout == "zlab" else "DeepSpec"
            raise DSparkError(f"cannot export this {drafter.kind} drafter in the {name} layout: {why}")


def zlab_hf_config(drafter, dtype: str) -> dict:
    """config.json of a z-lab folder for a faithful `drafter` (fields as z-lab's class
    saves them; `dflash_config.target_layer_ids` always written, never left to derive)."""
    cfg, arch = drafter.cfg, drafter.cfg.arch
    n = arch.num_hidden_layers
    return {
        "architectures": [zlab.ZLAB_ARCH], "model_type": "qwen3",
        "block_size": cfg.block_size, "num_target_layers": drafter.tcfg.num_hidden_layers,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": n, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads, "head_dim": arch.head_dim, "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta, "rope_scaling": None,
        "max_position_embeddings": arch.max_position_embeddings, "attention_bias": arch.attention_bias,
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "layer_types": ["full_attention"] * n, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": n, "dtype": dtype,
    }


def save_zlab(folder: str, drafter, params, *, dtype: str = "float32") -> str:
    """Write `drafter` (parameters `params`) to `folder` in z-lab's layout, tensors in
    `dtype` (float32 or bfloat16); refuses unfaithful drafters first. Returns folder."""
    check_exportable(drafter, ("zlab",))
    if dtype not in ("float32", "bfloat16"):
        raise DSparkError(f"export dtype must be float32 or bfloat16; got '{dtype}'")
    np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16
    tensors = checkpoints.to_tensors(params, prefix="", dtype=np_dtype)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(zlab_hf_config(drafter, dtype), f, indent=2, sort_keys=True)
    checkpoints.save_tensors(tensors, folder)
    return folder


def export_folder(draft: str, target: str, out: str, layout: str = "zlab", *, dtype: str = "float32") -> str:
    """Load the drafter folder `draft` against the target folder `target` and write it
    to `out` in `layout` (only "zlab" is written here; train.train writes DeepSpec)."""
    from dspark_jax import drafters
    from dspark_jax import target as target_lib

    if layout != "zlab":
        raise DSparkError(f"--layout {layout}: only zlab is exported from a folder (train.train writes deepspec)")
    if os.path.abspath(draft) == os.path.abspath(out):
        raise DSparkError(f"--out {out} is the drafter folder itself; name another folder")
    tcfg, _ = target_lib.load(target)
    drafter, params = drafters.load(draft, tcfg, dtype="float32")
    return save_zlab(out, drafter, params, dtype=dtype)
