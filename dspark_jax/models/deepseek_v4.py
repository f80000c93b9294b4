"""The DeepSeek-V4 decoder (transformers' DeepseekV4ForCausalLM) as a Flax module, with
its own static-shape cache.

Calling convention as `models/gemma4.py`: `tokens` [B, T] with `q_lens` [B] real tokens
per row (padding inert); without a cache a causal forward over positions 0..T-1; with a
`DeepseekV4Cache` row b's tokens sit at positions lengths[b] .. +T-1 and lengths
advance by q_lens. The residual is `hc_mult` streams [B, T, N, E] mixed by mHC around
every block; the output is norm(hc_head(streams)).

The cache (all shapes static, S = max_len):
- kv [L, B, S, D]: every layer's K=V at slot == position; the sliding window is a mask,
  so verification steps of several tokens that cross the window stay exact;
- per compressed layer, the raw compressor projections per slot ([.., S, 2cD]: kv_proj
  and gate_proj outputs; c = 2 for CSA's two series, 1 for HCA) and the compressed
  entries [.., S // m, D]; for CSA also the indexer's raw projections and its keys
  [.., S // m, Di]. Each call recomputes, from the raw slots, the T // m + 1 windows
  starting at window lengths // m (every window this call's tokens can complete) and
  writes them at entry index w.
- lengths [B].
Why rollback is exact with no bookkeeping (the engine only sets lengths back): a query
at position p sees entry w only when the window ends at or before p, i.e. its last slot
(w + 1) m - 1 <= p. Every slot <= p holds a committed token or one written by this same
call, and the call that wrote slot (w + 1) m - 1 rebuilt entry w from exactly those
slots. A rejected draft that completed a window left a wrong entry w and wrong raw
slots; both lie past the new length, and the real token written later at that window's
last slot rebuilds entry w (and rewrites the raw slots first) before any query can see
it. The same holds for the indexer's keys.
Cost: the raw slots take 2cD values per token per compressed layer (CSA: 4D + 4Di),
several times the K=V row, and every row is max_len long although only the last
`sliding_window` K=V slots and the last 2m raw slots are ever read again; ring buffers
of window + T slots would bound both (not done yet).

Taps (PROVISIONAL, until V4 drafters exist): tap i is the mean over the N streams of
layer i's output [B, T, E]; tap -1 is the token embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax.config_deepseek_v4 import CSA, HCA, SLIDING, DeepseekV4Config
from dspark_jax.kv_cache import storage_dtype
from dspark_jax.models.deepseek_v4_attention import Attention, LayerRows
from dspark_jax.models.deepseek_v4_layers import MoE, HyperConnection, HyperHead, RMSNorm, hc_merge
from dspark_jax.models.layers import Proj, embedding


@struct.dataclass
class DeepseekV4Cache:
    """kv [L, B, S, D]; hca_raw [Lh, B, S, 2D], hca_entries [Lh, B, S // m_hca, D];
    csa_raw [Lc, B, S, 4D], csa_entries [Lc, B, S // m_csa, D]; idx_raw [Lc, B, S, 4Di],
    idx_keys [Lc, B, S // m_csa, Di]; lengths [B] int32. Lh / Lc count HCA / CSA layers
    (`DeepseekV4Config.slot` maps a layer to its row)."""

    kv: jax.Array
    hca_raw: jax.Array
    hca_entries: jax.Array
    csa_raw: jax.Array
    csa_entries: jax.Array
    idx_raw: jax.Array
    idx_keys: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, cfg: DeepseekV4Config, batch: int, max_len: int) -> "DeepseekV4Cache":
        dt = storage_dtype(cfg.jnp_dtype)
        lh, lc, d, di = cfg.count(HCA), cfg.count(CSA), cfg.head_dim, cfg.index_head_dim

        def z(*shape):
            return jnp.zeros(shape, dt)

        return cls(kv=z(cfg.num_hidden_layers, batch, max_len, d),
                   hca_raw=z(lh, batch, max_len, 2 * d), hca_entries=z(lh, batch, max_len // cfg.hca_rate, d),
                   csa_raw=z(lc, batch, max_len, 4 * d), csa_entries=z(lc, batch, max_len // cfg.csa_rate, d),
                   idx_raw=z(lc, batch, max_len, 4 * di), idx_keys=z(lc, batch, max_len // cfg.csa_rate, di),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


_SEQ = ("layers", "batch", "cache_seq", "head_dim")
_RAW = ("layers", "batch", "cache_seq", None)
# Logical axes of each cache field (mapped to the mesh in dspark_jax/mesh.py).
DEEPSEEK_V4_CACHE_AXES = DeepseekV4Cache(kv=_SEQ, hca_raw=_RAW, hca_entries=_SEQ, csa_raw=_RAW, csa_entries=_SEQ,
                                         idx_raw=_RAW, idx_keys=_SEQ, lengths=("batch",))


def _rows(cfg: DeepseekV4Config, cache: DeepseekV4Cache, i: int) -> LayerRows:
    kind, s = cfg.layer_types[i], cfg.slot(i)
    if kind == SLIDING:
        return LayerRows(kv=cache.kv[i])
    if kind == HCA:
        return LayerRows(kv=cache.kv[i], raw=cache.hca_raw[s], entries=cache.hca_entries[s])
    return LayerRows(kv=cache.kv[i], raw=cache.csa_raw[s], entries=cache.csa_entries[s],
                     idx_raw=cache.idx_raw[s], idx_keys=cache.idx_keys[s])


def _put(cfg: DeepseekV4Config, cache: DeepseekV4Cache, i: int, rows: LayerRows) -> DeepseekV4Cache:
    kind, s = cfg.layer_types[i], cfg.slot(i)
    cache = cache.replace(kv=cache.kv.at[i].set(rows.kv))
    if kind == HCA:
        return cache.replace(hca_raw=cache.hca_raw.at[s].set(rows.raw),
                             hca_entries=cache.hca_entries.at[s].set(rows.entries))
    if kind == CSA:
        return cache.replace(csa_raw=cache.csa_raw.at[s].set(rows.raw),
                             csa_entries=cache.csa_entries.at[s].set(rows.entries),
                             idx_raw=cache.idx_raw.at[s].set(rows.idx_raw),
                             idx_keys=cache.idx_keys.at[s].set(rows.idx_keys))
    return cache


class DecoderLayer(nn.Module):
    """mHC(attention) then mHC(MoE) on the N streams."""

    cfg: DeepseekV4Config
    index: int
    attention = Attention   # the attention class (the DSpark drafter's layer swaps it)

    def setup(self):
        cfg = self.cfg
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps)
        self.self_attn = self.attention(cfg, self.index)
        self.mlp = MoE(cfg, self.index)

    def __call__(self, streams, tokens, positions, rows: LayerRows, base):
        post, comb, x = self.attn_hc(streams)
        out, rows = self.self_attn(self.input_layernorm(x), positions, rows, base)
        streams = hc_merge(post, comb, out, streams)
        post, comb, x = self.ffn_hc(streams)
        return hc_merge(post, comb, self.mlp(self.post_attention_layernorm(x), tokens), streams), rows


class DeepseekV4LM(nn.Module):
    """DeepseekV4ForCausalLM. See the module docstring for the calling convention."""

    cfg: DeepseekV4Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, dt, "embed_tokens")
        self.layers = [DecoderLayer(cfg, i, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Proj((cfg.vocab_size,), ("embed", "vocab"), dtype=dt)

    def __call__(self, tokens: jax.Array, q_lens: jax.Array, cache: DeepseekV4Cache | None = None,
                 tap_layers: tuple[int, ...] = ()):
        """Returns (hidden [B, T, E] after the final norm, new cache or None, taps)."""
        cfg = self.cfg
        b, t = tokens.shape
        work = cache if cache is not None else DeepseekV4Cache.init(cfg, b, t)
        base = work.lengths
        positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        x = self.embed(tokens)
        streams = jnp.broadcast_to(x[:, :, None], (b, t, cfg.hc_mult, x.shape[-1]))
        outs = {-1: x}
        for i, layer in enumerate(self.layers):
            streams, rows = layer(streams, tokens, positions, _rows(cfg, work, i), base)
            work = _put(cfg, work, i, rows)
            if i in tap_layers:
                outs[i] = streams.mean(axis=2)
        hidden = self.norm(self.hc_head(streams))
        if self.is_initializing():
            self.logits(hidden)  # create lm_head parameters
        taps = tuple(outs[i] for i in tap_layers)
        if cache is None:
            return hidden, None, taps
        return hidden, work.replace(lengths=cache.lengths + q_lens.astype(jnp.int32)), taps

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., E] -> [..., V] float32."""
        out = self.embed_tokens.attend(hidden) if self.cfg.tie_word_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings (tap -1)."""
        return self.embed_tokens(tokens)
