"""DeepSeek-V4 attention: one shared K=V head over a sliding window, plus (CSA / HCA
layers) compressed entries built from windows of m tokens.

One code path serves the full forward and the cached forward: a layer gets its rows of
the cache (`LayerRows`: per-slot K=V, per-slot raw compressor projections, compressed
entries and, for CSA, the indexer's raw projections and keys), writes this call's
tokens at their positions, recomputes the compressed entries of the windows this call
can complete (a static `T // m + 1` windows per row starting at window `lengths // m`),
and attends. A full forward is the same with fresh rows of length T.

Which entries query position p sees: slots s with p - window < s <= p, and compressed
entries w < (p + 1) // m (the window ends at or before p); on CSA layers only those of
the Lightning indexer's top-k among them. Entries and raw slots past a row's committed
length are garbage by contract: an entry is recomputed by the call that writes the
last token of its window, before any query may see it (module docstring of
models/deepseek_v4.py: why rollback is exact).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax.config_deepseek_v4 import CSA, SLIDING, DeepseekV4Config
from dspark_jax.models.deepseek_v4_layers import F32, RMSNorm, logical_param, pool_windows, rms_unweighted, rope
from dspark_jax.models.layers import INIT_STD, Proj


@struct.dataclass
class LayerRows:
    """One layer's cache rows (absent parts are None). kv [B, S, D]; raw [B, S, 2cD]
    (kv_proj then gate_proj outputs, c = 2 on CSA, 1 on HCA); entries [B, S // m, D];
    idx_raw [B, S, 4Di]; idx_keys [B, S // m, Di]."""

    kv: jax.Array
    raw: jax.Array | None = None
    entries: jax.Array | None = None
    idx_raw: jax.Array | None = None
    idx_keys: jax.Array | None = None


def write(row: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    """row [B, S, ...] with values [B, T, ...] at slots positions [B, T] (beyond S: dropped)."""
    b = jnp.arange(row.shape[0])[:, None]
    return row.at[b, positions].set(values.astype(row.dtype), mode="drop")


class Compressor(nn.Module):
    """Pools windows of m raw projections into entries [.., dim]: softmax(gate + position
    bias)-weighted sums (two overlapping series when `overlap`), then kv_norm, then RoPE
    ("compress") at position w * m."""

    cfg: DeepseekV4Config
    dim: int
    rate: int
    overlap: bool

    def setup(self):
        c, dt = 2 if self.overlap else 1, self.cfg.jnp_dtype
        self.kv_proj = Proj((c * self.dim,), ("embed", None), dtype=dt)
        self.gate_proj = Proj((c * self.dim,), ("embed", None), dtype=dt)
        self.position_bias = logical_param(self, "position_bias", nn.initializers.zeros, (self.rate, c * self.dim),
                                           (None, None), F32)
        self.kv_norm = RMSNorm(self.cfg.rms_norm_eps)

    def project(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> raw [B, T, 2cD]: what the cache keeps per token."""
        return jnp.concatenate([self.kv_proj(x), self.gate_proj(x)], axis=-1)

    def update(self, raw: jax.Array, entries: jax.Array, base: jax.Array, t: int) -> jax.Array:
        """Recompute the entries of windows base // m .. + t // m from raw [B, S, 2cD] and
        write them into entries [B, S // m, D] (windows beyond the array dropped)."""
        m, b = self.rate, raw.shape[0]
        n_w = t // m + 1
        first = base // m
        wins = first[:, None] + jnp.arange(-1 if self.overlap else 0, n_w)[None]   # [B, W(+1)]
        slots = jnp.clip(wins[..., None] * m + jnp.arange(m), 0, raw.shape[1] - 1)  # [B, W(+1), m]
        got = raw[jnp.arange(b)[:, None, None], slots]
        half = got.shape[-1] // 2
        kv, gate = got[..., :half], got[..., half:].astype(F32)
        gate = jnp.where((wins >= 0)[..., None, None], gate, -jnp.inf)
        pooled = self.kv_norm(pool_windows(kv, gate, self.position_bias, self.overlap))
        targets = first[:, None] + jnp.arange(n_w)[None]
        pooled = rope(pooled, targets * m, self.cfg.compress_rope)
        return write(entries, targets, pooled)


class Indexer(nn.Module):
    """CSA's Lightning indexer: its own compressor at index_head_dim, and scores
    sum_h w_h * ReLU(q_h . k) of each query against each compressed key."""

    cfg: DeepseekV4Config

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.compressor = Compressor(cfg, cfg.index_head_dim, cfg.csa_rate, True, name=None)
        self.q_b_proj = Proj((cfg.index_n_heads, cfg.index_head_dim), ("rank", "heads", "head_dim"), dtype=dt)
        self.scorer = Scorer(cfg)

    def __call__(self, x, q_res, positions, keys):
        """-> scores [B, T, S // m] float32."""
        cfg = self.cfg
        q = rope(self.q_b_proj(q_res), positions, cfg.compress_rope)                   # [B, T, Hi, Di]
        s = jnp.einsum("bthd,bwd->bthw", q.astype(F32), keys.astype(F32))
        s = jax.nn.relu(s) * cfg.index_head_dim ** -0.5
        w = self.scorer(x) * cfg.index_n_heads ** -0.5                                  # [B, T, Hi]
        return (s * w[..., None]).sum(2)


class Scorer(nn.Module):
    cfg: DeepseekV4Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        return Proj((cfg.index_n_heads,), ("embed", None), dtype=cfg.jnp_dtype, name="weights_proj")(x).astype(F32)


class CompressorBlock(nn.Module):
    """transformers' `self_attn.compressor`: the entry compressor (+ the indexer on CSA)."""

    cfg: DeepseekV4Config
    kind: str

    def setup(self):
        cfg = self.cfg
        csa = self.kind == CSA
        rate = cfg.csa_rate if csa else cfg.hca_rate
        self.main = Compressor(cfg, cfg.head_dim, rate, csa, name=None)
        if csa:
            self.indexer = Indexer(cfg)

    def __call__(self, x, q_res, positions, rows: LayerRows, base):
        """Write raw projections, rebuild completed entries -> (rows, visible [B, T, S // m])."""
        cfg, t = self.cfg, x.shape[1]
        rate = self.main.rate
        raw = write(rows.raw, positions, self.main.project(x))
        entries = self.main.update(raw, rows.entries, base, t)
        visible = jnp.arange(entries.shape[1])[None, None] < ((positions + 1) // rate)[..., None]
        if self.kind != CSA:
            return rows.replace(raw=raw, entries=entries), visible
        ic = self.indexer.compressor
        idx_raw = write(rows.idx_raw, positions, ic.project(x))
        idx_keys = ic.update(idx_raw, rows.idx_keys, base, t)
        score = jnp.where(visible, self.indexer(x, q_res, positions, idx_keys), -jnp.inf)
        if cfg.index_topk < entries.shape[1]:
            _, top = jax.lax.top_k(score, cfg.index_topk)
            visible = visible & (jax.nn.one_hot(top, score.shape[-1], dtype=jnp.int32).sum(-2) > 0)
        return rows.replace(raw=raw, entries=entries, idx_raw=idx_raw, idx_keys=idx_keys), visible


class Attention(nn.Module):
    """q low-rank (q_a_proj, q_a_norm, q_b_proj, unweighted per-head norm), one K=V head
    (kv_proj, kv_norm), partial interleaved RoPE, per-head sinks, output de-rotation and
    the grouped output projection (o_a_proj per group, o_b_proj)."""

    cfg: DeepseekV4Config
    index: int

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        h, d, g = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.kind = cfg.layer_types[self.index]
        self.spec = cfg.main_rope if self.kind == SLIDING else cfg.compress_rope
        self.q_a_proj = Proj((cfg.q_lora_rank,), ("embed", "rank"), dtype=dt)
        self.q_a_norm = RMSNorm(cfg.rms_norm_eps)
        self.q_b_proj = Proj((h, d), ("rank", "heads", "head_dim"), dtype=dt)
        self.kv_proj = Proj((d,), ("embed", "head_dim"), dtype=dt)
        self.kv_norm = RMSNorm(cfg.rms_norm_eps)
        self.o_a_proj = OGroups(cfg)
        self.o_b_proj = Proj((cfg.hidden_size,), ("heads", "group_width", "embed"), n_in=2, dtype=dt)
        self.sinks = logical_param(self, "sinks", nn.initializers.zeros, (h,), ("heads",), F32)
        if self.kind != SLIDING:
            self.compressor = CompressorBlock(cfg, self.kind)

    def __call__(self, x, positions, rows: LayerRows, base):
        """x [B, T, E] at positions [B, T] -> (out [B, T, E], updated rows)."""
        cfg = self.cfg
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = rope(rms_unweighted(self.q_b_proj(q_res), cfg.rms_norm_eps), positions, self.spec)
        kv = rope(self.kv_norm(self.kv_proj(x)), positions, self.spec)
        rows = rows.replace(kv=write(rows.kv, positions, kv))
        slots = jnp.arange(rows.kv.shape[1])[None, None]
        p = positions[..., None]
        mask = (slots <= p) & (slots > p - cfg.sliding_window)                           # [B, T, S]
        keys = rows.kv
        if self.kind != SLIDING:
            rows, visible = self.compressor(x, q_res, positions, rows, base)
            keys = jnp.concatenate([keys, rows.entries], axis=1)
            mask = jnp.concatenate([mask, visible], axis=-1)
        logits = jnp.einsum("bthd,bsd->bths", q.astype(F32), keys.astype(F32)) * cfg.head_dim ** -0.5
        logits = jnp.where(mask[:, :, None], logits, -jnp.inf)
        sink = jnp.broadcast_to(self.sinks[None, None, :, None], logits.shape[:3] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
        o = jnp.einsum("bths,bsd->bthd", probs.astype(keys.dtype), keys).astype(x.dtype)
        o = rope(o, positions, self.spec, inverse=True)
        return self.o_b_proj(self.o_a_proj(o)), rows


class OGroups(nn.Module):
    """Grouped o_a_proj: heads split into g groups, each group [H/g * D] -> [o_lora_rank].
    On a model axis wider than g the group's width is split instead (`group_width`)."""

    cfg: DeepseekV4Config

    @nn.compact
    def __call__(self, o):
        cfg = self.cfg
        g = cfg.o_groups
        width = cfg.num_attention_heads * cfg.head_dim // g
        k = logical_param(self, "kernel", nn.initializers.normal(INIT_STD), (g, width, cfg.o_lora_rank),
                          ("heads", "group_width", "rank"), cfg.jnp_dtype)
        return jnp.einsum("btgi,gir->btgr", o.reshape(*o.shape[:2], g, width), k)
