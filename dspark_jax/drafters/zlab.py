"""z-lab DFlash drafter folders (`DFlashDraftModel`), served as they are.

The fields and conventions are those of z-lab/dflash's `dflash/model.py` at revision
ZLAB_REVISION (read, not copied):

- config.json is a Qwen3 config of the draft layers with `architectures:
  ["DFlashDraftModel"]`, top-level `block_size` and `num_target_layers`, and a nested
  `dflash_config: {mask_token_id, target_layer_ids}`. Where `target_layer_ids` is absent
  it is derived from `num_target_layers` and the draft layer count (`derive_layer_ids`).
- Weights carry no prefix and no embedding or LM head (both are the target's):
  `layers.{i}.*` (Qwen3 decoder layers), `fc.weight`, `hidden_norm.weight`, `norm.weight`.
- A round's block is the anchor followed by `block_size - 1` mask tokens; the drafts
  are read at the mask positions, so a block of 16 drafts 15 tokens. Context features
  are `hidden_states[layer_id + 1]` of the target, i.e. decoder layer `layer_id`'s
  output, which is what a layer id already means here; attention over context + block
  is not causal.

The network is the DeepSpec DFlash backbone (`BlockDrafter` with no sequential head);
only the config, the checks and the positions drafted from differ. Fields that later
z-lab-style configs carry (ZLAB_NEWER_FIELDS, sliding-window layers) are accepted at
their neutral value and refused by name otherwise; other z-lab classes are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re

from dspark_jax import checkpoints
from dspark_jax.config import Qwen3Config
from dspark_jax.drafters.config import DrafterConfig, check_fits_target
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.drafters.folders import check_gamma, read_sts
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder

ZLAB_REVISION = "44947fbf71114e241c96de194f4b382b5dd330d0"
ZLAB_ARCH = "DFlashDraftModel"
LAYOUT = "z-lab DFlash"
DFLASH_CONFIG_FIELDS = ("mask_token_id", "target_layer_ids")
# field -> the values that change nothing (accepted); any other value is refused by name
ZLAB_NEWER_FIELDS = {
    "input_embedding_scale": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "final_logit_softcapping": (None,),
    "is_causal": (None, False),
}
_ZLAB_CLASS = re.compile(r"DFlash\w*DraftModel")
# tensors that only other layouts hold: (name prefix, the layout it belongs to)
_FOREIGN_TENSORS = (("markov_head.", "DeepSpec DSpark"), ("confidence_head.", "DeepSpec DSpark"),
                    ("midlayer.", "EAGLE-3"), ("d2t", "EAGLE-3"), ("t2d", "EAGLE-3"))


def _archs(hf: dict) -> list[str]:
    return [str(a) for a in hf.get("architectures") or []]


def looks_like(hf: dict) -> str | None:
    """The drafter layout a config.json's fields (not its `architectures`) point to:
    z-lab DFlash, EAGLE-3, DeepSpec Eagle3 or DeepSpec (None: none of them). Every
    layout reader checks its `architectures` against this one classifier."""
    if isinstance(hf.get("dflash_config"), dict):
        return LAYOUT
    if "draft_vocab_size" in hf or "eagle_config" in hf:
        return "EAGLE-3"
    if "ttt_length" in hf:
        return "DeepSpec Eagle3"
    if "target_layer_ids" in hf or "markov_rank" in hf:
        return "DeepSpec"
    return None


def claims(hf: dict, path: str) -> bool:
    """True when config.json names a z-lab DFlash class; a one-line error when its
    `architectures` and its fields name different layouts (either way round)."""
    archs = _archs(hf)
    zlab = [a for a in archs if _ZLAB_CLASS.fullmatch(a)]
    seen = looks_like(hf)
    if not zlab:
        if seen == LAYOUT:
            raise DSparkError(f"{path}: looks like a {LAYOUT} folder (it has dflash_config) but architectures "
                              f"says {archs}; a {LAYOUT} folder says [\"{ZLAB_ARCH}\"]")
        return False
    other = [a for a in zlab if a != ZLAB_ARCH]
    if other:
        raise DSparkError(f"{path}: z-lab class {other[0]} is not supported (only {ZLAB_ARCH}, as of z-lab/dflash "
                          f"{ZLAB_REVISION[:12]})")
    if seen != LAYOUT:
        found = f"looks like a {seen} folder" if seen else "has no dflash_config"
        raise DSparkError(f"{path}: architectures says {ZLAB_ARCH} ({LAYOUT} layout) but the folder {found}; "
                          f"a {LAYOUT} config holds dflash_config {{mask_token_id, target_layer_ids}}")
    return True


def derive_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's default taps: one draft layer reads the middle target layer; n > 1 read
    n layers spread evenly from 1 to L - 3, rounded half to even as Python's round."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    lo, hi = 1, num_target_layers - 3
    return [int(round(lo + i * (hi - lo) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def _neutral(value, neutral: tuple) -> bool:
    """value is one of `neutral`, type included (so False is not 0 and 0 is not None)."""
    return any(value is v or (type(value) is type(v) and value == v) for v in neutral)


def _refuse_unsupported(hf: dict, dcfg: dict, path: str) -> None:
    unknown = sorted(set(dcfg) - set(DFLASH_CONFIG_FIELDS) - set(ZLAB_NEWER_FIELDS))
    if unknown:
        raise DSparkError(f"{path}: dflash_config field {unknown[0]} is not supported (known: "
                          f"{', '.join(DFLASH_CONFIG_FIELDS)})")
    for where, fields in (("", hf), ("dflash_config.", dcfg)):
        for name, neutral in ZLAB_NEWER_FIELDS.items():
            if name in fields and not _neutral(fields[name], neutral):
                raise DSparkError(f"{path}: {where}{name} = {fields[name]!r} is not supported for {LAYOUT} "
                                  f"drafters (only {' or '.join(repr(v) for v in neutral)})")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if sliding:
        raise DSparkError(f"{path}: layer_types '{sliding[0]}' (sliding-window draft layers) is not supported; "
                          "only full_attention")


def zlab_config(hf: dict, path: str, dtype: str | None = None) -> DrafterConfig:
    """DrafterConfig (no sequential head, no confidence head) of a z-lab config.json."""
    dcfg = hf["dflash_config"]
    _refuse_unsupported(hf, dcfg, path)
    arch = checkpoints.qwen3_config(hf, path, dtype)
    for name in ("block_size", "num_target_layers"):
        if not isinstance(hf.get(name), int) or hf[name] < 1:
            raise DSparkError(f"{path}: {name} must be a positive integer; got {hf.get(name)!r}")
    if hf["block_size"] < 2:
        raise DSparkError(f"{path}: block_size {hf['block_size']} drafts nothing (the block is the anchor "
                          "followed by block_size - 1 mask tokens)")
    mask = dcfg.get("mask_token_id")
    if not isinstance(mask, int) or not 0 <= mask < arch.vocab_size:
        raise DSparkError(f"{path}: dflash_config.mask_token_id {mask!r} is not a token of the "
                          f"{arch.vocab_size}-token vocabulary")
    ids = dcfg.get("target_layer_ids")
    if ids is None:
        ids = derive_layer_ids(hf["num_target_layers"], arch.num_hidden_layers)
    return DrafterConfig(arch=arch, target_layer_ids=tuple(int(i) for i in ids), block_size=hf["block_size"],
                         mask_token_id=mask, markov_rank=0, enable_confidence_head=False,
                         num_target_layers=hf["num_target_layers"])


@dataclasses.dataclass(frozen=True)
class ZlabDFlashDrafter(BlockDrafter):
    """A BlockDrafter that drafts from the mask positions: draft k (1-based) is read at
    block position k, so gamma is at most block_size - 1."""

    @property
    def kind(self) -> str:
        return "dflash"

    def block_hidden(self, dparams, tparams, dcache, anchor, start):
        """The full block [anchor, mask x (block_size - 1)] in one pass -> the hidden
        states of its mask positions [B, block_size - 1, D] (draft k at block position k)."""
        return super().block_hidden(dparams, tparams, dcache, anchor, start)[:, 1:]


def check_family(tcfg, folder: str) -> None:
    """z-lab drafters run on Qwen3 and Llama 3 targets (whose config is a Qwen3Config):
    the block embeds with the target's plain embedding table and drafts with its plain LM
    head. Other families (Gemma 4: scaled embedding, soft-capped logits) are refused."""
    if not isinstance(tcfg, Qwen3Config):
        raise DSparkError(f"{folder}: {LAYOUT} drafters are supported for Qwen3 and Llama 3 targets; the target's "
                          f"config is a {type(tcfg).__name__}")


def load_zlab(folder: str, tcfg, *, gamma: int | None, dtype: str, hf: dict):
    """(ZlabDFlashDrafter, params as numpy) from a z-lab DFlash folder, checked against
    the target config; gamma defaults to block_size - 1."""
    path = os.path.join(folder, "config.json")
    check_family(tcfg, folder)
    cfg = zlab_config(hf, path, dtype)
    check_fits_target(cfg, tcfg, folder)
    index = open_folder(folder)
    for name in index:
        for prefix, layout in _FOREIGN_TENSORS:
            if name.startswith(prefix):
                raise DSparkError(f"{folder}: tensor {name} belongs to the {layout} layout, not {LAYOUT}; "
                                  "check the folder's architectures")
    drafts = cfg.block_size - 1
    if gamma is not None and int(gamma) > drafts:
        raise DSparkError(f"gamma {gamma} is above the {drafts} drafts of a {LAYOUT} block of {cfg.block_size} "
                          f"({folder})")
    drafter = ZlabDFlashDrafter(cfg, tcfg, check_gamma(gamma, drafts, folder), read_sts(folder))
    template, _ = drafter.param_shapes_and_axes()
    params = checkpoints.load_tree(index, template, prefix="", dtype=cfg.arch.jnp_dtype, folder=folder)
    return drafter, params
