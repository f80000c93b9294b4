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
the drafter's context features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax import paged_cache
from dspark_jax.attention import attend, causal_mask
from dspark_jax.config import Qwen3Config
from dspark_jax.kv_cache import KVCache, write_index, write_layer
from dspark_jax.models.layers import MLP, Attention, Proj, RMSNorm, embedding
from dspark_jax.paged_cache import PagedKVCache


def attention_module(cfg: Qwen3Config, name: str | None = None) -> Attention:
    return Attention(hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                     num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                     rope_theta=cfg.rope_theta, eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias,
                     dtype=cfg.jnp_dtype, name=name)


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
    """Qwen3ForCausalLM. See the module docstring for the calling convention."""

    cfg: Qwen3Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, dt, "embed_tokens")
        self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dt)
        if not cfg.tie_word_embeddings:
            self.lm_head = Proj((cfg.vocab_size,), ("embed", "vocab"), dtype=dt)

    def __call__(self, tokens: jax.Array, q_lens: jax.Array, cache: KVCache | None = None,
                 tap_layers: tuple[int, ...] = ()):
        """Returns (hidden [B, T, E] after the final norm, new cache or None, taps).

        taps: tuple of [B, T, E] arrays, one per entry of `tap_layers`.
        """
        b, t = tokens.shape
        steps = jnp.arange(t, dtype=jnp.int32)
        q_valid = steps[None, :] < q_lens[:, None]
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        positions = start[:, None] + steps[None, :]
        scale = self.cfg.head_dim ** -0.5

        paged = isinstance(cache, PagedKVCache)
        if cache is None:
            mask = causal_mask(positions, q_valid, positions, q_valid)
        elif not paged:
            slots = jnp.arange(cache.max_len, dtype=jnp.int32)
            mask = causal_mask(positions, q_valid, jnp.broadcast_to(slots, (b, cache.max_len)),
                               jnp.ones((b, cache.max_len), bool))
            index = write_index(positions, q_valid, cache.max_len)

        x = self.embed_tokens(tokens)
        layer_out = {-1: x}
        for i, layer in enumerate(self.layers):
            if cache is None:
                def mix(q, k, v):
                    return attend(q, k, v, mask, scale=scale), None
            elif paged:
                def mix(q, k, v, i=i):
                    nonlocal cache
                    cache = paged_cache.write(cache, i, k, v, positions, q_valid)
                    return _paged_attend(cache, i, q, cache.lengths + q_lens, q_lens, cache.page_table,
                                         scale), None
            else:
                def mix(q, k, v, i=i):
                    nonlocal cache
                    cache = cache.replace(k=write_layer(cache.k, i, k, index),
                                          v=write_layer(cache.v, i, v, index))
                    return attend(q, cache.k[i], cache.v[i], mask, scale=scale), None
            x, _ = layer(x, positions, mix)
            layer_out[i] = x
        if self.is_initializing():
            self.logits(x)  # create lm_head parameters
        taps = tuple(layer_out[i] for i in tap_layers)
        if cache is not None:
            cache = cache.replace(lengths=cache.lengths + q_lens.astype(jnp.int32))
        return self.norm(x), cache, taps

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
               cache: KVCache, tap_layers: tuple[int, ...] = (), query_block: int | None = None,
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

        A `PagedKVCache` takes the same call; attention then runs on its pages with
        `pallas_kernels.verify_attention` (see `_packed_paged`).
        """
        if isinstance(cache, PagedKVCache):
            if tail is not None:
                raise ValueError("a paged cache takes no tail lines (chunked prefill needs the slot cache)")
            return self._packed_paged(tokens, rows, positions, valid, cache, tap_layers, query_block)
        scale = self.cfg.head_dim ** -0.5
        slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        index = write_index(positions, valid, cache.max_len)
        n_head = tokens.shape[0] - (tail[0] * tail[1] if tail else 0)
        h_rows, h_pos, h_ok = rows[:n_head], positions[:n_head], valid[:n_head]
        if query_block is None:
            mask = ((slots[None, :] <= h_pos[:, None]) & h_ok[:, None])[:, None, :]  # [N, 1, S]
        else:
            b = cache.batch
            cols = h_pos - cache.lengths[h_rows]
            grid_rows = jnp.where(h_ok, h_rows, b)  # invalid tokens scatter nowhere
            grid_cols = jnp.clip(cols, 0, query_block - 1)
            grid_pos = jnp.zeros((b, query_block), jnp.int32).at[grid_rows, cols].set(h_pos, mode="drop")
            grid_ok = jnp.zeros((b, query_block), bool).at[grid_rows, cols].set(True, mode="drop")
            mask = causal_mask(grid_pos, grid_ok, jnp.broadcast_to(slots, (b, cache.max_len)),
                               jnp.ones((b, cache.max_len), bool))
        if tail:
            lines, width = tail
            t_rows = rows[n_head::width]
            t_mask = causal_mask(positions[n_head:].reshape(lines, width), valid[n_head:].reshape(lines, width),
                                 jnp.broadcast_to(slots, (lines, cache.max_len)), jnp.ones((lines, cache.max_len), bool))

        x = self.embed_tokens(tokens)[:, None]  # [N, 1, E]
        layer_out = {-1: x}
        for i, layer in enumerate(self.layers):
            def mix(q, k, v, i=i):
                nonlocal cache
                kc = cache.k.at[i, rows, index].set(k[:, 0].astype(cache.k.dtype), mode="drop")
                vc = cache.v.at[i, rows, index].set(v[:, 0].astype(cache.v.dtype), mode="drop")
                cache = cache.replace(k=kc, v=vc)
                qh = q[:n_head]
                if query_block is None:
                    o = attend(qh, kc[i][h_rows], vc[i][h_rows], mask, scale=scale)
                else:
                    grid_q = jnp.zeros((cache.batch, query_block) + q.shape[2:], q.dtype)
                    grid_q = grid_q.at[grid_rows, cols].set(qh[:, 0], mode="drop")
                    o = attend(grid_q, kc[i], vc[i], mask, scale=scale)[h_rows, grid_cols][:, None]
                if tail:
                    qt = q[n_head:, 0].reshape((lines, width) + q.shape[2:])
                    ot = attend(qt, kc[i][t_rows], vc[i][t_rows], t_mask, scale=scale)
                    o = jnp.concatenate([o, ot.reshape((lines * width, 1) + ot.shape[2:])], axis=0)
                return o, None
            x, _ = layer(x, positions[:, None], mix)
            layer_out[i] = x
        taps = tuple(layer_out[i][:, 0] for i in tap_layers)
        return self.norm(x[:, 0]), cache, taps

    def _packed_paged(self, tokens, rows, positions, valid, cache: PagedKVCache, tap_layers, query_block):
        """`packed` over a paged cache: every valid token writes its K/V into its row's pages,
        then attends with verify_attention, one query per token (`query_block=None`: the
        token's own page-table row, kv_len = position + 1) or on the [rows, W] grid."""
        scale = self.cfg.head_dim ** -0.5
        tok_table = cache.page_table[rows]  # [N, pages_per_seq]
        valid_i = valid.astype(jnp.int32)
        if query_block is not None:
            b = cache.batch
            cols = positions - cache.lengths[rows]
            grid_rows = jnp.where(valid, rows, b)  # invalid tokens scatter nowhere
            grid_cols = jnp.clip(cols, 0, query_block - 1)
            grid_q_lens = jnp.zeros((b,), jnp.int32).at[grid_rows].add(1, mode="drop")

        x = self.embed_tokens(tokens)[:, None]  # [N, 1, E]
        layer_out = {-1: x}
        for i, layer in enumerate(self.layers):
            def mix(q, k, v, i=i):
                nonlocal cache
                table = cache.page_table
                cache = paged_cache.write(cache.replace(page_table=tok_table), i, k, v, positions[:, None],
                                          valid[:, None]).replace(page_table=table)
                if query_block is None:
                    return _paged_attend(cache, i, q, jnp.where(valid, positions + 1, 0), valid_i, tok_table,
                                         scale), None
                grid_q = jnp.zeros((cache.batch, query_block) + q.shape[2:], q.dtype)
                grid_q = grid_q.at[grid_rows, cols].set(q[:, 0], mode="drop")
                o = _paged_attend(cache, i, grid_q, cache.lengths + grid_q_lens, grid_q_lens, table, scale)
                return o[rows, grid_cols][:, None], None
            x, _ = layer(x, positions[:, None], mix)
            layer_out[i] = x
        taps = tuple(layer_out[i][:, 0] for i in tap_layers)
        return self.norm(x[:, 0]), cache, taps


def _paged_attend(cache: PagedKVCache, layer: int, q, kv_lens, q_lens, page_table, scale: float):
    """verify_attention over `layer`'s pages with the cache's static impl / interpret."""
    from pallas_kernels import verify_attention

    return verify_attention(q, cache.k_pages[layer], cache.v_pages[layer], kv_lens.astype(jnp.int32),
                            q_lens.astype(jnp.int32), page_table, sm_scale=scale, impl=cache.impl,
                            interpret=cache.interpret)
