"""The parts of a DeepSpec-layout drafter folder that every layout shares: the STS
calibration file, the gamma check, and the block drafter's export (config.json plus
model.safetensors with copies of the target's embedding and LM head)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np

from dspark_jax import checkpoints
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.errors import DSparkError

STS_FILE = "sts_calibration.json"


def read_sts(folder: str) -> tuple[float, ...] | None:
    """The STS temperatures stored beside a drafter, or None."""
    path = os.path.join(folder, STS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            temps = json.load(f)["temperatures"]
        return tuple(float(t) for t in temps)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DSparkError(f"{path} is not a valid STS calibration (needs a 'temperatures' list)") from None


def check_gamma(gamma: int | None, block_size: int, path: str) -> int:
    gamma = block_size if gamma is None else int(gamma)
    if gamma < 1:
        raise DSparkError(f"gamma must be >= 1; got {gamma}")
    if gamma > block_size:
        raise DSparkError(f"gamma {gamma} is above the drafter's block size {block_size} ({path})")
    return gamma


def drafter_hf_config(target_hf: dict, cfg: DrafterConfig, num_target_layers: int) -> dict:
    """config.json of a block drafter: the target's config plus the drafter fields."""
    hf = copy.deepcopy(target_hf)
    hf.update(
        architectures=["Qwen3DSparkModel" if cfg.markov_rank > 0 else "Qwen3DFlashModel"],
        num_hidden_layers=cfg.arch.num_hidden_layers, num_target_layers=num_target_layers,
        block_size=cfg.block_size, target_layer_ids=list(cfg.target_layer_ids),
        mask_token_id=cfg.mask_token_id, num_anchors=cfg.num_anchors, markov_rank=cfg.markov_rank,
        markov_head_type=cfg.markov_head_type, enable_confidence_head=cfg.enable_confidence_head,
        confidence_head_with_markov=cfg.confidence_head_with_markov, tie_word_embeddings=False,
        intermediate_size=cfg.arch.intermediate_size)
    return hf


def save_block_drafter(folder: str, drafter, params, target_hf: dict, tparams,
                       sts_temperatures=None, hf: dict | None = None) -> None:
    """Export in the DeepSpec layout, with copies of the target's embedding and LM head.

    `hf` overrides the config.json written (other architectures build their own)."""
    os.makedirs(folder, exist_ok=True)
    if hf is None:
        hf = drafter_hf_config(target_hf, drafter.cfg, drafter.tcfg.num_hidden_layers)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    tensors = checkpoints.to_tensors(params, prefix="")
    embed = np.asarray(tparams["embed_tokens"]["embedding"])
    tensors["embed_tokens.weight"] = embed
    head = tparams.get("lm_head")
    tensors["lm_head.weight"] = embed if head is None else np.ascontiguousarray(np.asarray(head["kernel"]).T)
    checkpoints.save_tensors(tensors, folder)
    if sts_temperatures is not None:
        with open(os.path.join(folder, STS_FILE), "w") as f:
            json.dump({"temperatures": [float(t) for t in sts_temperatures]}, f, indent=2)
