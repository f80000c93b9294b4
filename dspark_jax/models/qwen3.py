"""The Qwen3 decoder as a Flax module: prefill, multi-token verification, layer taps.

One call serves every use. `tokens` [B, T] arrive with `q_lens` [B], the number of real
tokens in each row (the rest is padding and stays inert):

- without a cache: a plain causal forward over positions 0..T-1 (training, parity);
- with a `KVCache`: request b's tokens sit at positions lengths[b] .. lengths[b]+T-1;
  their K/V are written into the cache (padded slots are dropped) and each token attends
  to everything before it. Prefill is this call on an empty cache; the speculative
  verification call is this call with the anchor plus up to gamma drafts;
- with a `PagedKVCache`: the same, with K/V written into the request's pages and the
  attention run by `pallas_kernels.verify_attention` (impl / interpret: the cache's
  static fields; "auto" is the jnp reference on CPU, the Pallas kernel on GPU / TPU).

`tap_layers` picks raw decoder-layer outputs (i = output of layer i, -1 = embeddings),
the drafter's context features. `packed` is the ragged form of the same forward (tokens
of different cache rows in one pass). Every call runs the one layer loop `_forward`;
where K/V go and which keys a query sees is the call's attention view (models/kv_views.py).

Llama 3 targets (`LlamaConfig`, a Qwen3Config subclass) run this same module: their
attention (`PlainAttention`) has no per-head q/k RMSNorm and rotates with the config's
own inverse frequencies (plain or Llama 3 scaled RoPE); everything else is shared.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.attention import apply_rope
from dspark_jax.config import Qwen3Config
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.kv_cache import KVCache
from dspark_jax.models import kv_views
from dspark_jax.models.layers import MLP, Attention, Proj, RMSNorm, embedding
from dspark_jax.paged_cache import PagedKVCache


class PlainAttention(Attention):
    """Llama's attention projections: no q/k RMSNorm (its parameters are never created),
    RoPE with the given inverse frequencies [head_dim // 2]."""

    inv_freq: tuple[float, ...] = ()

    def q(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return apply_rope(self.q_proj(x), positions, jnp.asarray(self.inv_freq, jnp.float32))

    def kv(self, x: jax.Array, positions: jax.Array):
        k = apply_rope(self.k_proj(x), positions, jnp.asarray(self.inv_freq, jnp.float32))
        return k, self.v_proj(x)


def attention_module(cfg: Qwen3Config, name: str | None = None) -> Attention:
    """The attention of one decoder layer: Qwen3's, or Llama's for a LlamaConfig."""
    kw = dict(hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads,
              num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
              rope_theta=cfg.rope_theta, eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias,
              dtype=cfg.jnp_dtype, name=name)
    if isinstance(cfg, LlamaConfig):
        return PlainAttention(**kw, inv_freq=tuple(float(f) for f in cfg.inv_freq()))
    return Attention(**kw)


class DecoderLayer(nn.Module):
    cfg: Qwen3Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps, dt)
        self.self_attn = attention_module(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, dt)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dt)

    def __call__(self, x, positions, mix):
        """`mix(q, k, v) -> (o, aux)` decides which keys are seen (cache, mask)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        o, aux = mix(q, k, v)
        x = x + self.self_attn.out(o)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, aux


class Qwen3LM(nn.Module):
    """Qwen3ForCausalLM (and LlamaForCausalLM for a LlamaConfig). See the module
    docstring for the calling convention."""

    cfg: Qwen3Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, dt, "embed_tokens")
        self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dt)
        if not cfg.tie_word_embeddings:
            self.lm_head = Proj((cfg.vocab_size,), ("embed", "vocab"), dtype=dt)

    def __call__(self, tokens: jax.Array, q_lens: jax.Array, cache: KVCache | PagedKVCache | None = None,
                 tap_layers: tuple[int, ...] = ()):
        """Returns (hidden [B, T, E] after the final norm, new cache or None, taps).

        taps: tuple of [B, T, E] arrays, one per entry of `tap_layers`.
        """
        view = kv_views.dense(cache, q_lens, tokens.shape[1], scale=self.cfg.head_dim ** -0.5)
        hidden, cache, taps = self._forward(tokens, view, tap_layers)
        if cache is not None:
            cache = cache.replace(lengths=cache.lengths + q_lens.astype(jnp.int32))
        return hidden, cache, taps

    def _forward(self, tokens: jax.Array, view: kv_views.View, tap_layers: tuple[int, ...]):
        """The one layer loop: tokens [Q, T] laid out as `view` says -> (hidden [Q, T, E]
        after the final norm, the view's cache, taps [Q, T, E] each)."""
        x = self.embed_tokens(tokens)
        layer_out = {-1: x}
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, view.positions, lambda q, k, v, i=i: (view(i, q, k, v), None))
            layer_out[i] = x
        if self.is_initializing():
            self.logits(x)  # create lm_head parameters
        return self.norm(x), view.cache, tuple(layer_out[i] for i in tap_layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., E] -> [..., V] float32."""
        if self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def packed(self, tokens: jax.Array, rows: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: KVCache | PagedKVCache, tap_layers: tuple[int, ...] = (), query_block: int | None = None,
               tail: tuple[int, int] | None = None):
        """Ragged verification: N packed query tokens that belong to different cache rows.

        tokens, rows, positions, valid: [N]. Token n sits at position positions[n] of cache
        row rows[n]; valid tokens write their K/V there (invalid ones are dropped) and
        attend to their own row's cache at keys s <= positions[n]. The token-wise work
        (projections, MLP, logits) scales with N, not with rows x (1 + gamma).

        Attention layout (static): with `query_block=None` every token gathers its own
        row's keys ([N, S] reads, cheapest when N < rows); with `query_block=W`, row r's
        tokens must sit at positions lengths[r] + 0..W-1 and attention runs on a dense
        [rows, W] grid that reads each row's cache once (cheapest when N >= rows).
        tail=(R, C): the last R*C tokens are R dense lines of C tokens, line l all in cache
        row rows[N - R*C + l*C] (prompt chunks riding along in a verification pass); they
        attend on their own [R, C] grid over those R rows, the first N - R*C tokens as above.

        Returns (hidden [N, E] after the final norm, cache with lengths unchanged: the
        caller commits, taps: one [N, E] per entry of `tap_layers`).

        A `PagedKVCache` takes the same call (no tail lines); attention then runs on its
        pages with `pallas_kernels.verify_attention`.
        """
        view = kv_views.packed(cache, rows, positions, valid, query_block, tail, scale=self.cfg.head_dim ** -0.5)
        hidden, cache, taps = self._forward(tokens[:, None], view, tap_layers)
        return hidden[:, 0], cache, tuple(t[:, 0] for t in taps)
