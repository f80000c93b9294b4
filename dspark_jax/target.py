"""The target model as pure functions: `(config, params, arrays) -> arrays`.

Configs are static (hashable) so every function here can be jitted with the config as
a static argument; per-call variation travels as arrays (lengths, masks). The module
class is picked by the config type, so Qwen3 and later architectures share one API.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from dspark_jax import checkpoints
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache
from dspark_jax.models import registry


def module_for(cfg):
    """The Flax module of a target config's family (models/registry.py)."""
    return registry.module(cfg)


def _dummy_inputs():
    return jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32)


def init_params(cfg, rng: jax.Array):
    """Random parameters (unboxed) for a target config."""
    return checkpoints.init_module_params(module_for(cfg), rng, *_dummy_inputs())


def param_shapes_and_axes(cfg):
    """(ShapeDtypeStruct tree, logical axes tree) of the target's parameters."""
    return checkpoints.param_template(module_for(cfg), *_dummy_inputs())


def compute_dtype(dtype: str | None = None) -> str | None:
    """The compute dtype `load` uses: `dtype` when given, else float32 on a CPU backend
    (where bfloat16 arithmetic is converted, not native, and slower) and the checkpoint's
    own (None) on an accelerator."""
    if dtype is not None:
        return dtype
    return "float32" if jax.default_backend() == "cpu" else None


def load(folder: str, dtype: str | None = None):
    """(config, params) from a Hugging Face folder, dispatching on `model_type`, computing
    in `compute_dtype(dtype)` (drafters loaded for it follow). The params are device
    arrays: a jitted call given host (numpy) arrays copies every one of them to the
    device on every call (on the CPU demo about half of a decoding step)."""
    hf = checkpoints.read_config(folder)
    registry.for_model_type(hf.get("model_type"), os.path.join(folder, "config.json"))
    cfg, params = registry.load(folder, hf.get("model_type"), compute_dtype(dtype))
    return cfg, jax.device_put(params)


def init_cache(cfg, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` requests of up to `max_len` positions (the family's own
    pytree: KVCache for Qwen3, Gemma4Cache for Gemma 4; each exposes `.lengths`)."""
    return registry.for_config(cfg).cache(cfg, batch, max_len)


def forward(cfg, params, tokens, q_lens, cache: KVCache | None = None, tap_layers=()):
    """(hidden [B, T, E], cache, taps): see models/qwen3.py for the convention. One
    compiled program per config, taps and shapes (inlined when called under jit)."""
    return _forward(cfg, params, tokens, q_lens, cache, tuple(tap_layers))


@functools.partial(jax.jit, static_argnames=("cfg", "tap_layers"))
def _forward(cfg, params, tokens, q_lens, cache, tap_layers):
    return module_for(cfg).apply({"params": params}, tokens, q_lens, cache, tap_layers)


def logits(cfg, params, hidden):
    return module_for(cfg).apply({"params": params}, hidden, method="logits")


def embed(cfg, params, tokens):
    return module_for(cfg).apply({"params": params}, tokens, method="embed")


def last_valid(x: jax.Array, q_lens: jax.Array) -> jax.Array:
    """x[b, q_lens[b] - 1] for each row: [B, T, ...] -> [B, ...]."""
    idx = jnp.maximum(q_lens - 1, 0)
    return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "tap_layers"), donate_argnames=("cache",))
def prefill(cfg, params, tokens, lengths, cache: KVCache, tap_layers=()):
    """Prompts [B, T] right-padded to T with `lengths` [B] into an empty cache.

    Returns (logits of each prompt's last token [B, V], cache, taps).
    """
    hidden, cache, taps = forward(cfg, params, tokens, lengths, cache, tap_layers)
    return logits(cfg, params, last_valid(hidden, lengths)), cache, taps


@functools.partial(jax.jit, static_argnames=("cfg", "tap_layers"), donate_argnames=("cache",))
def step(cfg, params, tokens, q_lens, cache: KVCache, tap_layers=()):
    """Several query tokens per request against the cache -> (logits [B, T, V], cache, taps).

    The cache's lengths advance by q_lens; a caller that commits fewer tokens (rejected
    drafts) sets lengths itself: entries past a row's length are ignored and overwritten.
    """
    hidden, cache, taps = forward(cfg, params, tokens, q_lens, cache, tap_layers)
    return logits(cfg, params, hidden), cache, taps


@functools.partial(jax.jit, static_argnames=("cfg", "tap_layers", "query_block"), donate_argnames=("cache",))
def prefill_packed(cfg, params, tokens, rows, positions, valid, last, cache: KVCache, tap_layers=(),
                   query_block: int | None = None):
    """Packed prefill: N prompt tokens of several rows in one pass whose token-wise work
    scales with N (see Qwen3LM.packed), logits only where they are needed.

    tokens, rows, positions, valid: [N]; last [B]: packed index of each row's last prompt
    token. Returns (logits [B, V] at those tokens, cache, taps [N, E] each); the cache's
    K/V hold the valid tokens and its lengths are unchanged (the caller sets them).
    """
    hidden, cache, taps = module_for(cfg).apply({"params": params}, tokens, rows, positions, valid, cache,
                                                tuple(tap_layers), query_block, method="packed")
    return logits(cfg, params, hidden[last]), cache, taps


def greedy_decode(cfg, params, prompts: list[list[int]], max_new_tokens: int, max_len: int | None = None):
    """Plain greedy decoding of a batch of prompts: the reference every speculative path
    must reproduce token for token. Returns a list of generated id lists."""
    b = len(prompts)
    t = max(len(p) for p in prompts)
    max_len = max_len or t + max_new_tokens
    tokens = jnp.array([p + [0] * (t - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    out, cache = [], init_cache(cfg, b, max_len)
    last, cache, _ = prefill(cfg, params, tokens, lengths, cache)
    ones = jnp.ones((b,), jnp.int32)
    for _ in range(max_new_tokens):
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        out.append(nxt)
        logit, cache, _ = step(cfg, params, nxt[:, None], ones, cache)
        last = logit[:, 0]
    return jax.device_get(jnp.stack(out, axis=1)).tolist() if out else [[] for _ in prompts]


def shard(cfg, params, mesh, rules=None):
    """Place target parameters on `mesh` following their logical axes."""
    from dspark_jax import mesh as mesh_lib

    _, axes = param_shapes_and_axes(cfg)
    return mesh_lib.shard_tree(params, axes, mesh, rules or mesh_lib.SERVING_RULES)


def shard_cache(cache, mesh, rules=None):
    """Place a target cache (any architecture's) on `mesh` by its logical axes."""
    from dspark_jax import mesh as mesh_lib

    return mesh_lib.shard_tree(cache, registry.cache_axes(cache), mesh, rules or mesh_lib.SERVING_RULES)


def supports_packed(cfg) -> bool:
    """Whether the target model offers the packed (ragged) verification pass."""
    return registry.for_config(cfg).packed


@functools.partial(jax.jit, static_argnames=("cfg", "tap_layers", "query_block", "tail"), donate_argnames=("cache",))
def step_packed(cfg, params, tokens, rows, positions, valid, cache: KVCache, tap_layers=(),
                query_block: int | None = None, select: jax.Array | None = None, tail: tuple[int, int] | None = None):
    """Packed verification of N tokens from different cache rows (see Qwen3LM.packed;
    `tail` (R, C): the last R*C tokens are R dense lines of prompt chunk).

    tokens, rows, positions, valid: [N]. Returns (logits [N, V], or [M, V] at the packed
    indices `select` [M] when given, cache, taps [N, E] each); the cache's K/V hold the
    valid tokens, its lengths are unchanged (the caller commits).
    """
    hidden, cache, taps = module_for(cfg).apply({"params": params}, tokens, rows, positions, valid, cache,
                                                tuple(tap_layers), query_block, tail, method="packed")
    return logits(cfg, params, hidden if select is None else hidden[select]), cache, taps
