"""Roofline floors of the measured passes: bytes and FLOPs an ideal implementation needs.

floor = max(bytes / memory bandwidth, FLOPs / matmul throughput), both rates measured in
the same run (`measure.calibrate`). The counts are deliberately simple and documented:

- bytes = weights streamed once per pass + the K/V the attention must read;
  weights exclude gather-only tables (an untied input embedding, Gemma's per-layer input
  table): a pass reads a few rows of those, not the table. Activations, logits and the
  K/V written for the new tokens are not counted (the floor stays a lower bound).
- FLOPs = 2 x (weight elements in matmuls) per token + attention 4 x heads x head_dim x
  keys per token per layer (QK^T and PV); norms, RoPE and softmax are not counted.
- K/V read per row: every cached layer's K and V up to `context` positions (a sliding
  window layer reads at most its window).

Model support: Qwen3 (and the Qwen3-shaped drafter layers) exactly; Gemma 4 per layer
(sliding/full head sizes, K/V sharing, double-wide MLP, per-layer inputs; MoE counts all
experts' bytes and top-k experts' FLOPs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dspark_jax.config import Qwen3Config, dtype_of
from serve.profiling.schema import Roofline


def itemsize(dtype: str) -> int:
    return np.dtype(dtype_of(dtype)).itemsize


@dataclasses.dataclass(frozen=True)
class CostModel:
    """What one token costs a model, independent of batch and context."""

    weight_bytes: int                 # streamed once per pass
    matmul_params: int                # weight elements in matmuls per token (incl. the LM head)
    kv_layers: tuple[tuple[int, int | None], ...]    # (K+V bytes per position, window) per cached layer
    attn_layers: tuple[tuple[int, int | None], ...]  # (query heads x head_dim, window) per layer

    def kv_bytes_per_position(self, context: int) -> float:
        return sum(b * _seen(context, w) for b, w in self.kv_layers) / max(context, 1)

    def kv_read_bytes(self, rows: int, context: int) -> int:
        return rows * sum(b * _seen(context, w) for b, w in self.kv_layers)

    def attention_flops(self, tokens: int, keys: int) -> int:
        return tokens * sum(4 * hd * _seen(keys, w) for hd, w in self.attn_layers)

    def matmul_flops(self, tokens: int) -> int:
        return 2 * self.matmul_params * tokens


def _seen(keys: int, window: int | None) -> int:
    return keys if window is None else min(keys, window)


def _qwen3_layer_matmul(cfg: Qwen3Config) -> int:
    d, f = cfg.hidden_size, cfg.intermediate_size
    hq, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return 2 * d * hq * dh + 2 * d * hkv * dh + 3 * d * f


def target_cost(cfg) -> CostModel:
    """Cost model of a target config (Qwen3Config or Gemma4Config)."""
    from dspark_jax.config_gemma4 import Gemma4Config

    if isinstance(cfg, Gemma4Config):
        return _gemma4_cost(cfg)
    if not isinstance(cfg, Qwen3Config):
        raise TypeError(f"no cost model for {type(cfg).__name__}")
    item = itemsize(cfg.dtype)
    v, d = cfg.vocab_size, cfg.hidden_size
    streamed = cfg.num_params() - (0 if cfg.tie_word_embeddings else v * d)  # input table: gathered
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * item
    hd = cfg.num_attention_heads * cfg.head_dim
    n = cfg.num_hidden_layers
    return CostModel(weight_bytes=streamed * item,
                     matmul_params=n * _qwen3_layer_matmul(cfg) + v * d,
                     kv_layers=((kv, None),) * n, attn_layers=((hd, None),) * n)


def _gemma4_cost(cfg) -> CostModel:
    item = itemsize(cfg.dtype)
    d, v, hq, p, n = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.hidden_size_per_layer_input, \
        cfg.num_hidden_layers
    gathered = (0 if cfg.tie_word_embeddings else v * d) + (cfg.ple_vocab * n * p if p else 0)
    matmul = v * d + (d * n * p if p else 0)
    kv, attn = [], []
    for i in range(n):
        dh, hkv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        matmul += 2 * d * hq * dh + 3 * d * cfg.mlp_width(i) + (2 * d * p if p else 0)
        if not cfg.is_kv_shared(i):
            matmul += (1 if cfg.k_eq_v(i) else 2) * d * hkv * dh
            kv.append((2 * hkv * dh * item, window))  # the cache holds K and V for every owner layer
        if cfg.enable_moe_block:
            matmul += d * cfg.num_experts + 3 * cfg.top_k_experts * d * cfg.moe_intermediate_size
        attn.append((hq * dh, window))
    return CostModel(weight_bytes=(cfg.num_params() - gathered) * item, matmul_params=matmul,
                     kv_layers=tuple(kv), attn_layers=tuple(attn))


# ----------------------------------------------------------------------------- per pass

def step_cost(cm: CostModel, batch: int, context: int, q_len: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one decode / verification step: `batch` rows of `q_len` tokens,
    each attending to `context` cached positions."""
    tokens = batch * q_len
    return (cm.weight_bytes + cm.kv_read_bytes(batch, context),
            cm.matmul_flops(tokens) + cm.attention_flops(tokens, context))


def prefill_cost(cm: CostModel, batch: int, length: int) -> tuple[int, int]:
    """(bytes, FLOPs) of prefilling `batch` prompts of `length` tokens (causal attention:
    token t sees t keys); bytes count the weights and the K/V written once."""
    causal = 0
    for hd, w in cm.attn_layers:
        if w is None or w >= length:
            keys = length * (length + 1) // 2
        else:  # first w tokens see 1..w keys, the rest w each
            keys = w * (w + 1) // 2 + (length - w) * w
        causal += 4 * hd * keys
    return (cm.weight_bytes + batch * length * int(sum(b for b, _ in cm.kv_layers)),
            cm.matmul_flops(batch * length) + batch * causal)


def packed_cost(cm: CostModel, slots: int, budget: int, context: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a packed verification step of `budget` tokens over `slots` rows:
    at most min(budget, slots) rows' K/V are read."""
    return (cm.weight_bytes + cm.kv_read_bytes(min(budget, slots), context),
            cm.matmul_flops(budget) + cm.attention_flops(budget, context))


def drafter_propose_cost(drafter, batch: int, context: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a BlockDrafter's `propose`: the draft layers over the block
    (context K/V plus the block's own keys), the target's LM head over gamma positions,
    and the sequential head reading its rank x vocab matrix at each of the gamma steps."""
    dc, tc = drafter.cfg, drafter.tcfg
    arch = dc.arch
    ditem, titem = itemsize(arch.dtype), itemsize(tc.dtype)
    g, gamma, n = dc.block_size, drafter.gamma, arch.num_hidden_layers
    v, d = tc.vocab_size, tc.hidden_size
    layer = _qwen3_layer_matmul(arch)
    norms = n * (2 * arch.hidden_size + 2 * arch.head_dim) + arch.hidden_size
    kv = 2 * arch.num_key_value_heads * arch.head_dim * ditem
    hd = arch.num_attention_heads * arch.head_dim
    byts = (n * layer + norms) * ditem + v * d * titem + batch * context * n * kv
    flops = 2 * n * layer * batch * g + batch * g * n * 4 * hd * (context + g) + 2 * v * d * batch * gamma
    if dc.markov_rank > 0:
        byts += gamma * dc.markov_rank * v * ditem
        flops += 2 * dc.markov_rank * v * batch * gamma
    return byts, flops


# ----------------------------------------------------------------------------- the floor

def floor_seconds(nbytes: float, flops: float, bytes_per_s: float, flops_per_s: float) -> tuple[float, str]:
    """(floor in seconds, "memory" | "compute")."""
    t_mem = nbytes / bytes_per_s if bytes_per_s > 0 else 0.0
    t_cmp = flops / flops_per_s if flops_per_s > 0 else 0.0
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")


def roofline(time_s: float, nbytes: int, flops: int, bytes_per_s: float, flops_per_s: float) -> Roofline:
    floor, bound = floor_seconds(nbytes, flops, bytes_per_s, flops_per_s)
    return Roofline(bytes=int(nbytes), flops=int(flops), floor_ms=floor * 1e3, bound=bound,
                    time_over_floor=time_s / floor if floor > 0 else 0.0)
