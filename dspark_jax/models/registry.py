"""The model registry: one entry per target family, so adding a family touches its own
files and one line here.

An entry maps a Hugging Face `model_type` to the family's config class, its Flax module,
its checkpoint loader, its cache (layout and logical axes) and what the engine may do with
it (a packed verification pass for token budgets and chunked prefill; a paged cache).
Families are imported lazily: loading a Qwen3 target never imports Gemma 4's code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from dspark_jax.errors import DSparkError


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    config: str        # "module:Class" of the frozen config dataclass
    module: str        # "module:Class" of the Flax model, built as Class(cfg)
    loader: str        # "module:function" (folder, dtype) -> (cfg, params)
    cache: Callable[[Any, int, int], Any]   # (cfg, batch, max_len) -> an empty cache
    cache_axes: str    # "module:NAME" of the cache's logical axes
    packed: bool       # the module has a packed pass (token budgets, chunked prefill)
    paged: bool        # the engine can keep its K/V in a paged pool


def _resolve(ref: str):
    mod, name = ref.split(":")
    return getattr(importlib.import_module(mod), name)


def _qwen3_cache(cfg, batch: int, max_len: int):
    from dspark_jax.kv_cache import KVCache

    return KVCache.init(num_layers=cfg.num_hidden_layers, batch=batch, max_len=max_len,
                        kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=cfg.jnp_dtype)


def _gemma4_cache(cfg, batch: int, max_len: int):
    from dspark_jax.models.gemma4 import Gemma4Cache

    return Gemma4Cache.init(cfg, batch, max_len)


def _deepseek_v4_cache(cfg, batch: int, max_len: int):
    from dspark_jax.models.deepseek_v4 import DeepseekV4Cache

    return DeepseekV4Cache.init(cfg, batch, max_len)


FAMILIES = (
    ModelFamily("qwen3", ("qwen3",), "dspark_jax.config:Qwen3Config", "dspark_jax.models.qwen3:Qwen3LM",
                "dspark_jax.checkpoints:load_qwen3", _qwen3_cache, "dspark_jax.kv_cache:KV_CACHE_AXES",
                packed=True, paged=True),
    ModelFamily("llama", ("llama",), "dspark_jax.config_llama:LlamaConfig", "dspark_jax.models.qwen3:Qwen3LM",
                "dspark_jax.checkpoints:load_llama", _qwen3_cache, "dspark_jax.kv_cache:KV_CACHE_AXES",
                packed=True, paged=True),
    ModelFamily("gemma4", ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"),
                "dspark_jax.config_gemma4:Gemma4Config", "dspark_jax.models.gemma4:Gemma4LM",
                "dspark_jax.checkpoints:load_gemma4", _gemma4_cache, "dspark_jax.models.gemma4:GEMMA4_CACHE_AXES",
                packed=True, paged=False),
    ModelFamily("deepseek_v4", ("deepseek_v4",), "dspark_jax.config_deepseek_v4:DeepseekV4Config",
                "dspark_jax.models.deepseek_v4:DeepseekV4LM", "dspark_jax.checkpoints_deepseek_v4:load_deepseek_v4",
                _deepseek_v4_cache, "dspark_jax.models.deepseek_v4:DEEPSEEK_V4_CACHE_AXES", packed=False, paged=False),
)
MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def for_model_type(model_type, where: str = "config.json") -> ModelFamily:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise DSparkError(f"{where}: unknown model_type '{model_type}' (supported: {', '.join(MODEL_TYPES)})")


def for_config(cfg) -> ModelFamily:
    for f in FAMILIES:
        if type(cfg).__name__ == f.config.split(":")[1] and isinstance(cfg, _resolve(f.config)):
            return f
    raise DSparkError(f"no target model for config type {type(cfg).__name__}")


def module(cfg):
    return _resolve(for_config(cfg).module)(cfg)


def load(folder: str, model_type, dtype: str | None):
    return _resolve(for_model_type(model_type, f"{folder}/config.json").loader)(folder, dtype)


def cache_axes(cache):
    """The logical axes of a target cache (an instance of some family's cache class)."""
    for f in FAMILIES:
        axes = _resolve(f.cache_axes)
        if type(axes) is type(cache):
            return axes
    raise DSparkError(f"no target family keeps a cache of type {type(cache).__name__}")
