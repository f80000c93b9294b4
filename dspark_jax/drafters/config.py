"""Configuration of the DSpark / DFlash block drafter (DeepSpec `Qwen3DSparkModel` layout)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dspark_jax.config import Qwen3Config
from dspark_jax.errors import DSparkError

HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrafterConfig:
    """A KV-injection block drafter.

    `arch` holds the draft layers' shapes (a Qwen3Config whose num_hidden_layers is the
    number of draft layers); the rest are the DeepSpec drafter fields.
    """

    arch: Qwen3Config
    target_layer_ids: tuple[int, ...]
    block_size: int = 7
    mask_token_id: int = 0
    markov_rank: int = 256           # 0 = DFlash (no sequential head)
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    num_anchors: int = 512
    num_target_layers: int = 0

    def __post_init__(self):
        if self.markov_head_type not in HEAD_TYPES:
            raise DSparkError(f"markov_head_type '{self.markov_head_type}' is not one of {HEAD_TYPES}")
        if self.block_size < 1:
            raise DSparkError(f"block_size must be >= 1; got {self.block_size}")
        if not self.target_layer_ids:
            raise DSparkError("target_layer_ids must name at least one target layer")

    @property
    def kind(self) -> str:
        return "dspark" if self.markov_rank > 0 else "dflash"

    @property
    def has_confidence(self) -> bool:
        # the Markov-embedding input needs a Markov head to take the embedding from
        return self.enable_confidence_head and (self.markov_rank > 0 or not self.confidence_head_with_markov)

    def replace(self, **changes) -> "DrafterConfig":
        return dataclasses.replace(self, **changes)


def check_fits_target(cfg, tcfg: Qwen3Config, where: str) -> None:
    """Refuse a drafter whose vocabulary, width or tapped layers do not fit the target."""
    arch = cfg.arch
    if arch.vocab_size != tcfg.vocab_size:
        raise DSparkError(f"{where}: drafter vocab_size {arch.vocab_size} does not match the "
                          f"target's {tcfg.vocab_size}")
    if arch.hidden_size != tcfg.hidden_size:
        raise DSparkError(f"{where}: drafter hidden_size {arch.hidden_size} does not match the "
                          f"target's {tcfg.hidden_size}")
    last_ok = tcfg.num_hidden_layers - 2  # the final target layer is not allowed
    bad = [i for i in cfg.target_layer_ids if not -1 <= i <= last_ok]
    if bad:
        raise DSparkError(f"{where}: target_layer_ids {list(cfg.target_layer_ids)} do not fit a "
                          f"{tcfg.num_hidden_layers}-layer target (allowed -1..{last_ok})")
    if getattr(cfg, "num_target_layers", 0) and cfg.num_target_layers != tcfg.num_hidden_layers:
        raise DSparkError(f"{where}: drafter was trained for a {cfg.num_target_layers}-layer target; "
                          f"this target has {tcfg.num_hidden_layers} layers")


def default_layer_ids(num_target_layers: int, count: int = 5) -> tuple[int, ...]:
    """Evenly spread taps ([1, 9, 17, 25, 33] for 36 layers); never the final layer."""
    hi = num_target_layers - 3 if num_target_layers >= 4 else num_target_layers - 2
    lo = min(1, hi)
    m = max(1, min(count, hi - lo + 1))
    return tuple(sorted({int(round(x)) for x in np.linspace(lo, hi, m)}))
