"""DSpark / DFlash drafters for a Gemma 4 target (DeepSpec `Gemma4DSparkModel` layout).

The backbone, heads and the drafter interface are the Qwen3 block drafter's
(backbone.py, heads.py, dspark.py); only the draft layers and the norms change:

- every draft layer is a full-attention Gemma 4 decoder layer of the target's config
  (models/gemma4.py `DecoderLayer`, PLE / MoE / KV sharing switched off): input,
  post-attention, pre- and post-feedforward norms (Gemma 4's `x * weight` RMSNorm), q/k
  norms and a scale-free v norm, the full layers' head size, KV heads, K = V switch and
  (proportional) RoPE, attention scale 1, the tanh-GELU gated MLP and `layer_scalar`;
- `hidden_norm` (after `fc`) and the final `norm` are Gemma 4 norms;
- KV injection as in backbone.py: each layer turns H_ctx (not passed through its input
  norm) into K/V with its own k/v projections, k/v norms and RoPE at the true positions;
- block embeddings come from the target's `embed()` (already times sqrt(d), tap -1) and
  base logits from the target's `logits()` (soft-capped).

Folder layout: config.json is the target's Gemma 4 text config copied (a top-level
`gemma4` config is flattened to its text_config) with `architectures:
["Gemma4DSparkModel"]` (or `Gemma4DFlashModel`), `num_hidden_layers` = draft layers and
the Qwen3 drafters' fields; tensors carry the same names as the Qwen3 drafter's plus the
Gemma layer's extra norms and `layers.{i}.layer_scalar` (loaded as ones when absent).
Gemma4Eagle3Model folders load the Eagle3 chain drafter of gemma4_eagle3.py.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dspark_jax import checkpoints
from dspark_jax.attention import attend
from dspark_jax.config_gemma4 import FULL, MODEL_TYPES, TOP_LEVEL_TYPES, Gemma4Config
from dspark_jax.drafters.backbone import BlockDrafterModule
from dspark_jax.drafters.config import DrafterConfig, check_fits_target
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.drafters.folders import check_gamma, read_sts, save_block_drafter
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache
from dspark_jax.models.gemma4 import DecoderLayer
from dspark_jax.models.gemma4_layers import RMSNorm
from dspark_jax.safetensors_io import open_folder

ARCHITECTURES = {"dspark": "Gemma4DSparkModel", "dflash": "Gemma4DFlashModel"}
EAGLE3_ARCHITECTURE = "Gemma4Eagle3Model"


# ------------------------------------------------------------------------ configuration

def is_gemma4_folder(hf: dict) -> bool:
    """Whether a drafter config.json describes a Gemma 4 drafter."""
    archs = " ".join(hf.get("architectures") or [])
    return "Gemma4" in archs or hf.get("model_type") in MODEL_TYPES


def draft_arch(tcfg: Gemma4Config, num_layers: int) -> Gemma4Config:
    """The draft layers' config: `num_layers` full-attention layers of the target's shape,
    without per-layer inputs, MoE, KV sharing or double-wide MLPs (the embedding and LM
    head are the target's: `tie_word_embeddings` is False as in the saved config.json)."""
    if num_layers < 1:
        raise DSparkError(f"a drafter needs at least one layer; got num_hidden_layers {num_layers}")
    return tcfg.replace(num_hidden_layers=num_layers, layer_types=(FULL,) * num_layers,
                        num_kv_shared_layers=0, use_double_wide_mlp=False, tie_word_embeddings=False,
                        hidden_size_per_layer_input=0, enable_moe_block=False, num_experts=0, top_k_experts=0,
                        moe_intermediate_size=0)


def new_config(tcfg: Gemma4Config, *, num_layers: int, target_layer_ids, **fields) -> DrafterConfig:
    """A DrafterConfig for a fresh Gemma 4 drafter of target `tcfg` (fields: DrafterConfig's)."""
    return DrafterConfig(arch=draft_arch(tcfg, num_layers), target_layer_ids=tuple(target_layer_ids),
                         num_target_layers=tcfg.num_hidden_layers, **fields)


def parse_draft_arch(text: dict, path: str, dtype: str | None = None) -> Gemma4Config:
    """The draft layers' config from a flattened drafter config.json. The copied config
    still lists the target's layer_types / per_layer_config: the full-attention layers'
    shapes are resolved as for the target, then num_hidden_layers of them kept. Raises
    TypeError / ValueError / DSparkError for the caller to put on one line."""
    n_draft = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types")
    n_parse = len(layer_types) if layer_types else int(text.get("num_target_layers") or n_draft)
    full = Gemma4Config.from_hf(dict(text, num_hidden_layers=n_parse, num_kv_shared_layers=0), path, dtype)
    return draft_arch(full, n_draft)


def text_config(hf: dict) -> dict:
    """A Gemma 4 config dict flattened to its text decoder (top-level keys win, except
    model_type, which becomes the text one)."""
    model_type = hf.get("model_type")
    if model_type not in TOP_LEVEL_TYPES or not isinstance(hf.get("text_config"), dict):
        return dict(hf)
    flat = dict(hf["text_config"])
    flat.update({k: v for k, v in hf.items()
                 if k not in ("text_config", "vision_config", "audio_config", "model_type")})
    flat["model_type"] = model_type + "_text"
    return flat


def block_config(hf: dict, path: str, dtype: str | None = None) -> DrafterConfig:
    """DrafterConfig of a Gemma 4 DSpark / DFlash folder's config.json."""
    text = text_config(hf)
    archs = " ".join(hf.get("architectures") or [])
    for key in ("num_hidden_layers", "target_layer_ids"):
        if key not in text:
            raise DSparkError(f"{path}: missing field {key}")
    try:
        arch = parse_draft_arch(text, path, dtype)
        mask = text.get("mask_token_id")
        if mask is None or not 0 <= int(mask) < arch.vocab_size:
            raise DSparkError(f"{path}: mask_token_id {mask} is not a token of the "
                              f"{arch.vocab_size}-token vocabulary")
        dspark = "DSpark" in archs
        return DrafterConfig(
            arch=arch, target_layer_ids=tuple(int(i) for i in text["target_layer_ids"]),
            block_size=int(text.get("block_size", 7)), mask_token_id=int(mask),
            markov_rank=int(text.get("markov_rank", 256 if dspark else 0)),
            markov_head_type=text.get("markov_head_type", "vanilla"),
            enable_confidence_head=bool(text.get("enable_confidence_head", dspark)),
            confidence_head_with_markov=bool(text.get("confidence_head_with_markov", True)),
            num_anchors=int(text.get("num_anchors", 512)),
            num_target_layers=int(text.get("num_target_layers", 0)))
    except (TypeError, ValueError) as e:
        raise DSparkError(f"{path}: a field has the wrong type ({e})") from None
    except DSparkError as e:
        msg = str(e)
        raise DSparkError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def drafter_hf_config(target_hf: dict, cfg: DrafterConfig, num_target_layers: int) -> dict:
    """config.json of a Gemma 4 block drafter: the target's text config plus the drafter fields."""
    hf = text_config(target_hf)
    hf.update(
        architectures=[ARCHITECTURES[cfg.kind]],
        num_hidden_layers=cfg.arch.num_hidden_layers, num_target_layers=num_target_layers,
        block_size=cfg.block_size, target_layer_ids=list(cfg.target_layer_ids),
        mask_token_id=cfg.mask_token_id, num_anchors=cfg.num_anchors, markov_rank=cfg.markov_rank,
        markov_head_type=cfg.markov_head_type, enable_confidence_head=cfg.enable_confidence_head,
        confidence_head_with_markov=cfg.confidence_head_with_markov, tie_word_embeddings=False)
    return hf


# ------------------------------------------------------------------------------ modules

class Gemma4DraftLayer(DecoderLayer):
    """A Gemma 4 decoder layer whose attention also sees injected context K/V."""

    def context_kv(self, ctx, positions):
        return self.self_attn.kv(ctx, positions)

    def __call__(self, x, positions, ctx_k, ctx_v, mask):
        """x [B, Q, D] block states; ctx_k/v [B, S, Hkv, Dh]; mask [B, Q, S + Q]."""
        def mix(q, kv):
            k, v = kv
            wide = jnp.promote_types(ctx_k.dtype, k.dtype)  # the block joins the cache's dtype
            keys = jnp.concatenate([ctx_k.astype(wide), k.astype(wide)], axis=1)
            vals = jnp.concatenate([ctx_v.astype(wide), v.astype(wide)], axis=1)
            return attend(q, keys, vals, mask, scale=1.0)  # q and k are RMS-normed

        return super().__call__(x, positions, None, mix)


class Gemma4BlockDrafterModule(BlockDrafterModule):
    """BlockDrafterModule with Gemma 4 draft layers and norms (same passes, same names)."""

    def make_layer(self, i: int):
        return Gemma4DraftLayer(self.cfg.arch, i, name=f"layers_{i}")

    def make_norm(self):
        return RMSNorm(self.cfg.arch.rms_norm_eps, self.cfg.arch.jnp_dtype)


def check_target(tcfg, where: str) -> None:
    if not isinstance(tcfg, Gemma4Config):
        raise DSparkError(f"{where}: a Gemma 4 drafter needs a Gemma 4 target; the target is "
                          f"{type(tcfg).__name__.removesuffix('Config')}")


@dataclasses.dataclass(frozen=True)
class Gemma4BlockDrafter(BlockDrafter):
    """The block drafter of dspark.py on a Gemma 4 target (static and hashable)."""

    def __post_init__(self):
        check_target(self.tcfg, "gemma4 drafter")
        check_fits_target(self.cfg, self.tcfg, "gemma4 drafter")
        if not 1 <= self.gamma <= self.cfg.block_size:
            raise DSparkError(f"gamma {self.gamma} must be in [1, block size {self.cfg.block_size}]")

    @property
    def module(self) -> Gemma4BlockDrafterModule:
        return Gemma4BlockDrafterModule(self.cfg)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.cfg.arch  # every draft layer is a full-attention layer
        return KVCache.init(num_layers=a.num_hidden_layers, batch=batch, max_len=max_len,
                            kv_heads=a.global_kv_heads, head_dim=a.global_head_dim, dtype=a.jnp_dtype)


# ------------------------------------------------------------------------ folders in/out

def _is_layer_scalar(path: tuple[str, ...]) -> bool:
    return path[-1] == "layer_scalar"


def load_gemma4_drafter(folder: str, tcfg, *, gamma: int | None = None, dtype: str | None = None,
                        hf: dict | None = None):
    """(drafter, params) from a DeepSpec-layout Gemma 4 block drafter folder (a Gemma 4
    Eagle3 folder loads with gemma4_eagle3.load_gemma4_eagle3)."""
    hf = checkpoints.read_config(folder) if hf is None else hf
    path = os.path.join(folder, "config.json")
    check_target(tcfg, folder)
    cfg = block_config(hf, path, dtype or tcfg.dtype)
    check_fits_target(cfg, tcfg, folder)
    drafter = Gemma4BlockDrafter(cfg, tcfg, check_gamma(gamma, cfg.block_size, folder), read_sts(folder))
    return drafter, load_params(folder, drafter.param_shapes_and_axes()[0], cfg.arch.jnp_dtype)


def load_params(folder: str, template, dtype):
    """A Gemma 4 drafter's parameters (no tensor prefix) from a folder; absent
    `layers.{i}.layer_scalar` tensors load as ones (identity)."""
    index = open_folder(folder)
    flat = traverse_util.flatten_dict(template)
    absent = {p for p in flat if _is_layer_scalar(p) and checkpoints.tensor_name(p, "") not in index}
    present = traverse_util.unflatten_dict({p: s for p, s in flat.items() if p not in absent})
    params = traverse_util.flatten_dict(checkpoints.load_tree(index, present, prefix="", dtype=dtype,
                                                              folder=folder))
    for p in absent:
        params[p] = np.ones(flat[p].shape, dtype)
    return traverse_util.unflatten_dict(params)


def save_gemma4_drafter(folder: str, drafter: Gemma4BlockDrafter, params, target_hf: dict, tparams,
                        sts_temperatures=None) -> None:
    """Export in the DeepSpec layout, with copies of the target's embedding and LM head."""
    save_block_drafter(folder, drafter, params, target_hf, tparams, sts_temperatures,
                       hf=drafter_hf_config(target_hf, drafter.cfg, drafter.tcfg.num_hidden_layers))
