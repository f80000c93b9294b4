"""Loading a drafter folder: the layout is recognised here (DeepSpec, z-lab DFlash,
EAGLE-3, DeepSeek-V4 `mtp.*`, Gemma 4) and the folder goes to its loader; DeepSpec block
drafters load here. Writing one: drafters/folders.py.

A DeepSpec drafter folder's config.json is the target's config copied (so `model_type`
still says `qwen3`, or `llama` for a Llama 3 target, whose draft layers are Llama layers);
`architectures` tells the drafter kind. Tensor names carry no `model.`
prefix. The drafter reuses the target's embedding table and LM head at run time; the
copies in the folder are written on export (other engines expect them) and ignored on
load.
"""

from __future__ import annotations

import os

import jax

from dspark_jax import checkpoints
from dspark_jax.drafters.config import DrafterConfig, check_fits_target
from dspark_jax.drafters import eagle3_layout, zlab
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.drafters.folders import check_gamma, read_sts
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder

KINDS = ("dspark", "dflash", "eagle3", "mtp1")


def architecture_kind(hf: dict, path: str) -> str:
    archs = " ".join(hf.get("architectures") or [])
    if "Eagle3" in archs:
        return "eagle3"
    if "DSpark" in archs or "DFlash" in archs:
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
        rank = hf.get("markov_rank", text.get("markov_rank", 256 if "DSpark" in archs else 0))
        return "dspark" if int(rank) > 0 else "dflash"
    raise DSparkError(f"{path}: architectures {hf.get('architectures')} is not a drafter "
                      "(expected Qwen3DSparkModel, Qwen3DFlashModel, Qwen3Eagle3Model, "
                      "Gemma4DSparkModel, Gemma4DFlashModel, Gemma4Eagle3Model, z-lab's DFlashDraftModel "
                      "or EAGLE-3's LlamaForCausalLMEagle3)")


def block_config(hf: dict, path: str, dtype: str | None = None) -> DrafterConfig:
    if hf.get("model_type") == "llama":   # written for a Llama 3 target: Llama draft layers (no q/k norms)
        from dspark_jax.config_llama import LlamaConfig

        arch = LlamaConfig.from_hf(hf, path, dtype)
    else:
        arch = checkpoints.qwen3_config(hf, path, dtype)
    archs = " ".join(hf.get("architectures") or [])
    if "target_layer_ids" not in hf:
        raise DSparkError(f"{path}: missing field target_layer_ids")
    mask = hf.get("mask_token_id")
    if mask is None or not 0 <= int(mask) < arch.vocab_size:
        raise DSparkError(f"{path}: mask_token_id {mask} is not a token of the {arch.vocab_size}-token vocabulary")
    return DrafterConfig(
        arch=arch, target_layer_ids=tuple(int(i) for i in hf["target_layer_ids"]),
        block_size=int(hf.get("block_size", 7)), mask_token_id=int(mask),
        markov_rank=int(hf.get("markov_rank", 256 if "DSpark" in archs else 0)),
        markov_head_type=hf.get("markov_head_type", "vanilla"),
        enable_confidence_head=bool(hf.get("enable_confidence_head", "DSpark" in archs)),
        confidence_head_with_markov=bool(hf.get("confidence_head_with_markov", True)),
        num_anchors=int(hf.get("num_anchors", 512)),
        num_target_layers=int(hf.get("num_target_layers", 0)))


def load(folder: str, tcfg, *, kind: str = "auto", gamma: int | None = None, dtype: str | None = None):
    """(drafter, params) from a DeepSpec or z-lab DFlash folder, checked against the
    target config; the params are device arrays (see target.load).

    kind: "auto" (what the folder holds), "dspark", "dflash", "eagle3", or "mtp1" (any
    drafter folder used with one draft token per round).
    """
    drafter, params = _load(folder, tcfg, kind=kind, gamma=gamma, dtype=dtype)
    return drafter, jax.device_put(params)


def _load(folder: str, tcfg, *, kind: str, gamma: int | None, dtype: str | None):
    hf = checkpoints.read_config(folder)
    path = os.path.join(folder, "config.json")
    if zlab.claims(hf, path):  # z-lab's layout: a DFlash drafter whatever else it says
        if kind not in ("auto", "dflash", "mtp1"):
            raise DSparkError(f"--drafter {kind} was asked for but {folder} holds a dflash drafter "
                              f"({zlab.LAYOUT} layout)")
        return zlab.load_zlab(folder, tcfg, gamma=1 if kind == "mtp1" else gamma, dtype=dtype or tcfg.dtype,
                              hf=hf)
    if eagle3_layout.claims(hf, path):  # the EAGLE / SpecForge layout: an Eagle3 drafter
        if kind not in ("auto", "eagle3", "mtp1"):
            raise DSparkError(f"--drafter {kind} was asked for but {folder} holds an eagle3 drafter "
                              f"({eagle3_layout.LAYOUT} layout)")
        return eagle3_layout.load_eagle_layout(folder, tcfg, gamma=1 if kind == "mtp1" else gamma,
                                               dtype=dtype or tcfg.dtype, hf=hf)
    if hf.get("model_type") == "deepseek_v4":  # DeepSeek's mtp.* DSpark layout (drafters/deepseek_v4_layout.py)
        from dspark_jax.drafters import deepseek_v4_layout

        return deepseek_v4_layout.load_folder(folder, tcfg, kind=kind, gamma=gamma, dtype=dtype or tcfg.dtype, hf=hf)
    held = architecture_kind(hf, path)
    if kind == "mtp1":
        gamma = 1
    elif kind not in ("auto", held):
        raise DSparkError(f"--drafter {kind} was asked for but {folder} holds a {held} drafter")
    dtype = dtype or tcfg.dtype
    from dspark_jax.drafters import gemma4_drafter

    if gemma4_drafter.is_gemma4_folder(hf):
        if held == "eagle3":  # its loader refuses a non-Gemma Eagle3 name
            from dspark_jax.drafters.gemma4_eagle3 import load_gemma4_eagle3

            return load_gemma4_eagle3(folder, tcfg, gamma=gamma, dtype=dtype, hf=hf)
        return gemma4_drafter.load_gemma4_drafter(folder, tcfg, gamma=gamma, dtype=dtype, hf=hf)
    if isinstance(tcfg, gemma4_drafter.Gemma4Config):
        raise DSparkError(f"{folder} holds a Qwen3 drafter ({' '.join(hf.get('architectures') or [])}); "
                          "the target is a Gemma 4 model")
    if held == "eagle3":
        from dspark_jax.drafters import eagle3

        return eagle3.load_eagle3(folder, tcfg, gamma=gamma, dtype=dtype)
    cfg = block_config(hf, path, dtype)
    check_fits_target(cfg, tcfg, folder)
    drafter = BlockDrafter(cfg, tcfg, check_gamma(gamma, cfg.block_size, folder), read_sts(folder))
    template, _ = drafter.param_shapes_and_axes()
    params = checkpoints.load_tree(open_folder(folder), template, prefix="", dtype=cfg.arch.jnp_dtype,
                                   folder=folder)
    return drafter, params
