"""Training configuration: one frozen dataclass, files under configs/ that override it,
and `--set key=value` on the command line.

A config file is a Python module defining `CONFIG = TrainConfig(...)` (plain data; it is
imported, never exec'd); `overrides` applies `key=value` strings with the field's type.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing

from dspark_jax.errors import DSparkError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # what to train
    target: str = ""                      # Hugging Face target folder
    data_dir: str = ""                    # TFDS data_dir holding the prepared dataset
    dataset: str = ""                     # dataset (builder config) name
    drafter: str = "dspark"               # dspark | dflash | eagle3
    draft_layers: int = 1
    draft_intermediate_size: int = 0      # 0: the target's
    block_size: int = 7
    block_convention: str = "deepspec"    # dflash: deepspec (block positions 0.. draft block_size tokens) | zlab
                                          # (anchor + block_size-1 masks, drafts from positions 1..; gamma = block_size-1)
    target_layer_ids: tuple[int, ...] = ()  # () = spread evenly over the target
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    confidence_with_markov: bool = True
    mask_token: str = "<|mask|>"          # token name in tokenizer.json (or an integer id)
    # objective
    num_anchors: int = 64
    loss_decay: float = 4.0               # w_k = exp(-(k-1)/loss_decay)
    ce_weight: float = 0.1
    tv_weight: float = 0.9
    conf_weight: float = 1.0
    ttt_length: int = 7                   # eagle3 training-time test steps
    ttt_decay: float = 0.8
    eagle3_layer: str = "auto"            # eagle3 draft layer: target (the target's own layer: Qwen3's has q/k norms)
                                          # | llama (EAGLE-3's midlayer: no q/k norms, no bias, head_dim = hidden/heads)
                                          # | auto (llama when export_layout has eagle3, else target)
    # optimisation
    seq_len: int = 256
    batch_size: int = 8                   # global, sequences
    steps: int = 100
    lr: float = 6e-4
    warmup_frac: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    compute_dtype: str = "float32"        # float32 | bfloat16 (master weights stay float32)
    mesh: str = "1x1"
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/drafter"
    ckpt_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    async_checkpoint: bool = True
    memory_limit_mb: int = 0              # per device; 0: the device's (CPU: available host RAM); < 0: no check
    export_layout: str = "deepspec"       # deepspec | zlab | eagle3, or several: deepspec,eagle3
                                          # (<out_dir>/drafter, drafter_zlab, drafter_eagle3)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Fields that define the drafter's architecture for a given target (its parameter shapes,
# and which target layers its inputs come from): a checkpoint made under other values is
# not resumed.
SHAPE_FIELDS = ("drafter", "draft_layers", "draft_intermediate_size", "target_layer_ids",
                "markov_rank", "markov_head_type", "confidence_head", "confidence_with_markov",
                "block_convention", "eagle3_layer")
# What a checkpoint written before a shape field existed was trained with.
SHAPE_FIELDS_ABSENT = {"block_convention": "deepspec", "eagle3_layer": "target"}


def _coerce(name: str, value: str, typ):
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if origin is tuple:
            parts = [p for p in value.replace("[", "").replace("]", "").replace("(", "").replace(")", "").split(",")
                     if p.strip()]
            return tuple(int(p) for p in parts)
        return typ(value)
    except ValueError:
        raise DSparkError(f"--set {name}={value}: expected a {getattr(typ, '__name__', typ)}") from None


def overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for item in items:
        if "=" not in item:
            raise DSparkError(f"--set takes key=value; got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in hints:
            raise DSparkError(f"--set {key}: no such config field (see train/config.py)")
        changes[key] = _coerce(key, value.strip(), hints[key])
    return cfg.replace(**changes)


def import_config(path: str, cls):
    """The `CONFIG` object of a configs/*.py file, which must be an instance of `cls`."""
    if not os.path.exists(path):
        raise DSparkError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: report it in one line
        raise DSparkError(f"config file {path} failed to import: {type(e).__name__}: {e}") from None
    cfg = getattr(module, "CONFIG", None)
    if not isinstance(cfg, cls):
        raise DSparkError(f"config file {path} must define CONFIG = {cls.__name__}(...)")
    return cfg


def load_config(path: str | None, sets: list[str] = ()) -> TrainConfig:
    """CONFIG from a configs/*.py file (or the defaults), then the --set overrides."""
    cfg = import_config(path, TrainConfig) if path else TrainConfig()
    cfg = overrides(cfg, list(sets))
    validate(cfg)
    return cfg


def eagle3_layer(cfg: TrainConfig) -> str:
    """The Eagle3 draft layer `cfg` asks for: "llama" (EAGLE-3's midlayer shape) or
    "target" (the target's own decoder layer); `auto` is llama exactly when drafter=eagle3
    and export_layout holds eagle3 (a layer that layout can hold)."""
    from dspark_jax.drafters.eagle3_export import parse_layouts

    if cfg.eagle3_layer != "auto":
        return cfg.eagle3_layer
    return "llama" if cfg.drafter == "eagle3" and "eagle3" in parse_layouts(cfg.export_layout) else "target"


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with eagle3_layer resolved (what checkpoints record and resumes compare)."""
    return cfg.replace(eagle3_layer=eagle3_layer(cfg))


def validate(cfg: TrainConfig) -> None:
    if cfg.drafter not in ("dspark", "dflash", "eagle3"):
        raise DSparkError(f"drafter must be dspark, dflash or eagle3; got '{cfg.drafter}'")
    for name in ("steps", "batch_size", "seq_len", "block_size", "num_anchors", "draft_layers"):
        if getattr(cfg, name) < 1:
            raise DSparkError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    if cfg.block_convention not in ("deepspec", "zlab"):
        raise DSparkError(f"block_convention must be deepspec or zlab; got '{cfg.block_convention}'")
    if cfg.block_convention == "zlab" and (cfg.drafter != "dflash" or cfg.block_size < 2):
        raise DSparkError("block_convention=zlab trains a DFlash drafter (drafter=dflash) with block_size >= 2 "
                          f"(the anchor then block_size - 1 mask tokens); got drafter={cfg.drafter}, "
                          f"block_size={cfg.block_size}")
    if cfg.eagle3_layer not in ("auto", "target", "llama"):
        raise DSparkError(f"eagle3_layer must be auto, target or llama; got '{cfg.eagle3_layer}'")
    if cfg.eagle3_layer == "llama" and cfg.drafter != "eagle3":
        raise DSparkError("eagle3_layer=llama shapes an Eagle3 drafter's layer (drafter=eagle3); "
                          f"got drafter={cfg.drafter}")
    if cfg.compute_dtype not in ("float32", "bfloat16"):
        raise DSparkError(f"compute_dtype must be float32 or bfloat16; got '{cfg.compute_dtype}'")
    from dspark_jax.drafters.eagle3_export import parse_layouts

    parse_layouts(cfg.export_layout)
    if not cfg.target:
        raise DSparkError("no target folder: set target=DIR (in the config or with --set)")
    if not cfg.data_dir or not cfg.dataset:
        raise DSparkError("no dataset: set data_dir=DIR and dataset=NAME (built by python -m train.build_data)")
