"""The Gemma 4 text decoder as a Flax module, with its own KV cache.

Same calling convention as `models/qwen3.py`: `tokens` [B, T] with `q_lens` [B] real
tokens per row (padding inert); without a cache a causal forward over positions
0..T-1; with a `Gemma4Cache` row b's tokens sit at positions lengths[b] .. +T-1, their
K/V are written (padded slots dropped) and every token attends to what precedes it.
`packed` is the ragged form (tokens of different cache rows in one pass, as
`Qwen3LM.packed`). Both run the one layer loop `_forward` over an attention view
(models/kv_views.py) that writes the K/V and masks the keys.
`tap_layers`: raw decoder-layer outputs (i = output of layer i, after its
`layer_scalar`; -1 = the embeddings after the sqrt(d) scaling).

What differs from Qwen3, following transformers' Gemma4ForCausalLM:
- embeddings times sqrt(d), the scale rounded to the weights' dtype first;
- optional per-layer inputs (PLE): a second embedding plus a projection of the
  embeddings, one slice fed to each layer through a gate after its MLP;
- sliding-window and full-attention layers, each type with its own head size, KV-head
  count and RoPE (proportional partial RoPE on full layers); attention scale 1
  (q and k are RMS-normed), v RMS-normed without scale, K = V on full layers if
  `attention_k_eq_v`;
- four norms per layer (input, post-attention, pre- and post-feedforward), plus three
  for the optional MoE block that runs beside the dense MLP; a per-layer scalar;
- KV sharing: the last `num_kv_shared_layers` layers attend to the K/V of the last
  earlier layer of their type (they have no k/v projections and no cache rows);
- final logit soft-capping.

The cache is a full-length slot row per request for every layer that owns K/V, the
sliding window being applied by the mask: simple, and exact for multi-token verify
steps that cross the window boundary (slot index == absolute position).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dspark_jax.config_gemma4 import FULL, SLIDING, Gemma4Config
from dspark_jax.kv_cache import storage_dtype
from dspark_jax.models import kv_views
from dspark_jax.models.gemma4_layers import (Attention, Experts, GatedMLP, RMSNorm, Router,
                                             activation, logical_param)
from dspark_jax.models.layers import Proj, embedding


@struct.dataclass
class Gemma4Cache:
    """K/V of the layers that own them, grouped by attention type (the shapes differ).

    sliding_k/v: [Ls, B, S, Hkv_s, Ds]; full_k/v: [Lf, B, S, Hkv_f, Df] where Ls, Lf count
    the non-shared layers of each type (`Gemma4Config.cache_slot` maps a layer to its
    row). lengths: [B] int32, committed tokens per request; entries at positions
    >= lengths[b] are garbage by contract (masked on read, overwritten on write).
    """

    sliding_k: jax.Array
    sliding_v: jax.Array
    full_k: jax.Array
    full_v: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, cfg: Gemma4Config, batch: int, max_len: int) -> "Gemma4Cache":
        def zeros(t, heads, dim):
            return jnp.zeros((cfg.num_cached(t), batch, max_len, heads, dim), storage_dtype(cfg.jnp_dtype))

        s = (SLIDING, cfg.num_key_value_heads, cfg.head_dim)
        f = (FULL, cfg.global_kv_heads, cfg.global_head_dim)
        return cls(sliding_k=zeros(*s), sliding_v=zeros(*s), full_k=zeros(*f), full_v=zeros(*f),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.full_k.shape[2]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


_KV_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
# Logical axes of each cache field (mapped to the mesh in dspark_jax/mesh.py).
GEMMA4_CACHE_AXES = Gemma4Cache(sliding_k=_KV_AXES, sliding_v=_KV_AXES, full_k=_KV_AXES,
                                full_v=_KV_AXES, lengths=("batch",))


def _scale(value: float, dtype) -> jax.Array:
    """A python scale as transformers applies it to embeddings: float32, then the weights' dtype."""
    return jnp.asarray(np.float32(value)).astype(dtype)


class DecoderLayer(nn.Module):
    cfg: Gemma4Config
    index: int

    def setup(self):
        cfg, i, dt = self.cfg, self.index, self.cfg.jnp_dtype
        eps, d = cfg.rms_norm_eps, cfg.hidden_size
        self.input_layernorm = RMSNorm(eps, dt)
        self.self_attn = Attention(
            hidden=d, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.layer_kv_heads(i),
            head_dim=cfg.layer_head_dim(i), rope=cfg.layer_rope(i), has_kv=not cfg.is_kv_shared(i),
            k_eq_v=cfg.k_eq_v(i), eps=eps, use_bias=cfg.attention_bias, dtype=dt)
        self.post_attention_layernorm = RMSNorm(eps, dt)
        self.pre_feedforward_layernorm = RMSNorm(eps, dt)
        self.post_feedforward_layernorm = RMSNorm(eps, dt)
        self.mlp = GatedMLP(d, cfg.mlp_width(i), cfg.hidden_activation, dt)
        if cfg.enable_moe_block:
            self.router = Router(d, cfg.num_experts, cfg.top_k_experts, eps, dt)
            self.experts = Experts(cfg.num_experts, d, cfg.moe_intermediate_size,
                                   cfg.hidden_activation, dt)
            self.post_feedforward_layernorm_1 = RMSNorm(eps, dt)
            self.post_feedforward_layernorm_2 = RMSNorm(eps, dt)
            self.pre_feedforward_layernorm_2 = RMSNorm(eps, dt)
        if cfg.hidden_size_per_layer_input:
            p = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = Proj((p,), ("embed", None), dtype=dt)
            self.per_layer_projection = Proj((d,), (None, "embed"), dtype=dt)
            self.post_per_layer_input_norm = RMSNorm(eps, dt)
        self.layer_scalar = logical_param(self, "layer_scalar", nn.initializers.ones, (1,), ("norm",),
                                          dt)

    def __call__(self, x, positions, per_layer_input, mix):
        """`mix(q, kv) -> o` attends (kv is None on KV-shared layers): cache and mask
        are the caller's."""
        cfg = self.cfg
        h = self.input_layernorm(x)
        kv = None if cfg.is_kv_shared(self.index) else self.self_attn.kv(h, positions)
        o = mix(self.self_attn.q(h, positions), kv)
        x = x + self.post_attention_layernorm(self.self_attn.out(o))

        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if cfg.enable_moe_block:  # the experts see the residual, not the MLP's input norm
            weights, index = self.router(residual)
            moe = self.experts(self.pre_feedforward_layernorm_2(residual), weights, index)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe)
        x = residual + self.post_feedforward_layernorm(h)

        if cfg.hidden_size_per_layer_input:
            g = activation(cfg.hidden_activation)(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Gemma4LM(nn.Module):
    """Gemma4ForCausalLM. See the module docstring for the calling convention."""

    cfg: Gemma4Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        n, d, p = cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size_per_layer_input
        self.embed_tokens = embedding(cfg.vocab_size, d, dt, "embed_tokens")
        if p:
            self.embed_tokens_per_layer = nn.Embed(
                cfg.ple_vocab, n * p, dtype=dt, param_dtype=dt,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", None)))
            self.per_layer_model_projection = Proj((n * p,), ("embed", None), dtype=dt)
            self.per_layer_projection_norm = RMSNorm(cfg.rms_norm_eps, dt)
        self.layers = [DecoderLayer(cfg, i, name=f"layers_{i}") for i in range(n)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dt)
        if not cfg.tie_word_embeddings:
            self.lm_head = Proj((cfg.vocab_size,), ("embed", "vocab"), dtype=dt)

    def _per_layer_inputs(self, tokens, x):
        """[B, T, L, P]: (norm(proj(x) / sqrt(d)) + embed_per_layer(tokens)) / sqrt(2)."""
        cfg = self.cfg
        b, t = tokens.shape
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        ple = self.embed_tokens_per_layer(tokens) * _scale(math.sqrt(p), cfg.jnp_dtype)
        proj = self.per_layer_model_projection(x) * cfg.hidden_size ** -0.5
        proj = self.per_layer_projection_norm(proj.reshape(b, t, n, p))
        return (proj + ple.reshape(b, t, n, p)) * 2.0 ** -0.5

    def __call__(self, tokens: jax.Array, q_lens: jax.Array, cache: Gemma4Cache | None = None,
                 tap_layers: tuple[int, ...] = ()):
        """Returns (hidden [B, T, E] after the final norm, new cache or None, taps)."""
        view = kv_views.dense(cache, q_lens, tokens.shape[1], scale=1.0, fields=self._fields)
        hidden, cache, taps = self._forward(tokens, view, tap_layers)
        if cache is not None:
            cache = cache.replace(lengths=cache.lengths + q_lens.astype(jnp.int32))
        return hidden, cache, taps

    def packed(self, tokens: jax.Array, rows: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: Gemma4Cache, tap_layers: tuple[int, ...] = (), query_block: int | None = None,
               tail: tuple[int, int] | None = None):
        """Ragged verification / prefill of N tokens of different cache rows, as
        `Qwen3LM.packed`: token n at position positions[n] of cache row rows[n]; valid
        tokens write their K/V (KV-shared layers write none) and attend to their own row's
        keys s <= positions[n], on sliding layers only to s > positions[n] - window.
        `query_block` and `tail` pick the attention layout as there.

        Returns (hidden [N, E] after the final norm, cache with lengths unchanged: the
        caller commits, taps: one [N, E] per entry of `tap_layers`).
        """
        view = kv_views.packed(cache, rows, positions, valid, query_block, tail, scale=1.0, fields=self._fields)
        hidden, cache, taps = self._forward(tokens[:, None], view, tap_layers)
        return hidden[:, 0], cache, tuple(t[:, 0] for t in taps)

    def _fields(self, layer: int) -> tuple[str, str, int]:
        """Where layer's K/V live in a Gemma4Cache: its type's fields, its source's slot."""
        group = "sliding" if self.cfg.layer_types[layer] == SLIDING else "full"
        return f"{group}_k", f"{group}_v", self.cfg.cache_slot(layer)

    def _forward(self, tokens: jax.Array, view: kv_views.View, tap_layers: tuple[int, ...]):
        """The one layer loop: tokens [Q, T] laid out as `view` says -> (hidden [Q, T, E]
        after the final norm, the view's cache, taps [Q, T, E] each). A layer that owns
        K/V writes them; a KV-shared layer reads the keys its type's last writer left."""
        cfg = self.cfg
        x = self.embed(tokens)
        per_layer = self._per_layer_inputs(tokens, x) if cfg.hidden_size_per_layer_input else None
        layer_out = {-1: x}
        latest = {}  # layer type -> keys of the last layer of that type that wrote K/V
        for i, layer in enumerate(self.layers):
            kind = cfg.layer_types[i]
            window = cfg.sliding_window if kind == SLIDING else None

            def mix(q, kv, i=i, kind=kind, window=window):
                if kv is not None:
                    latest[kind] = view.write(i, *kv)
                return view.read(q, latest[kind], window)

            x = layer(x, view.positions, None if per_layer is None else per_layer[:, :, i], mix)
            layer_out[i] = x
        if self.is_initializing():
            self.logits(x)  # create lm_head parameters
        return self.norm(x), view.cache, tuple(layer_out[i] for i in tap_layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., E] -> [..., V] float32, soft-capped (in float32) if the config says so."""
        if self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        out = out.astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        return out if cap is None else cap * jnp.tanh(out / cap)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings as the decoder sees them: times sqrt(d) (tap -1)."""
        return self.embed_tokens(tokens) * _scale(math.sqrt(self.cfg.hidden_size), self.cfg.jnp_dtype)
