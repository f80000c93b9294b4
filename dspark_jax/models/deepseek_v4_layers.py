"""DeepSeek-V4 building blocks: norms, interleaved partial RoPE, mHC hyper-connections,
the MoE block (top-k or hash router, routed experts, shared expert) and the pooling of
compressor windows.

Parameter names follow transformers' module tree (`attn_hc.fn`, `mlp.gate.tid2eid`,
`mlp.experts.gate_up_proj`, ...) so the loader maps them mechanically. Modules that
transformers keeps in float32 (norms, hyper-connections, sinks, position biases, the
router's correction bias) hold float32 parameters and compute in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.config_deepseek_v4 import HASH_MOE, DeepseekV4Config, RopeSpec
from dspark_jax.models import moe
from dspark_jax.models.layers import INIT_STD, Proj

Dtype = Any
F32 = jnp.float32


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter carrying logical axis names (None: replicated)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def rms_unweighted(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x), the mean square in float32, the factor cast to x's dtype (UnweightedRMSNorm)."""
    ms = jnp.mean(jnp.square(x.astype(F32)), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(ms + eps).astype(x.dtype)


class RMSNorm(nn.Module):
    """weight * x / rms(x) in float32 (weight kept in float32), cast back to x's dtype."""

    eps: float = 1e-6
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = logical_param(self, "weight", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), F32)
        xf = x.astype(F32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (w * xf).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, spec: RopeSpec, inverse: bool = False) -> jax.Array:
    """Interleaved RoPE on the trailing `spec.dim` channels of x [..., T, (H,) D].

    positions: x.shape[:2] ([B, T]); pairs (2i, 2i+1) rotate by positions * inv_freq[i]
    (cos and sin times `attention_factor`), in float32. `inverse` rotates by -angle
    (the output de-rotation)."""
    inv = jnp.asarray(spec.inv_freq())
    ang = positions.astype(F32)[..., None] * inv                          # [B, T, dim/2]
    cos, sin = jnp.cos(ang) * spec.attention_factor, jnp.sin(ang) * spec.attention_factor
    cos, sin = cos.astype(x.dtype).astype(F32), sin.astype(x.dtype).astype(F32)
    if inverse:
        sin = -sin
    extra = x.ndim - positions.ndim - 1                                   # head axes between T and D
    cos, sin = (c.reshape(c.shape[:2] + (1,) * extra + c.shape[2:]) for c in (cos, sin))
    nope, r = x[..., :-spec.dim], x[..., -spec.dim:].astype(F32)
    a, b = r[..., 0::2], r[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(r.shape)
    return jnp.concatenate([nope, out.astype(x.dtype)], axis=-1)


class HyperConnection(nn.Module):
    """mHC around one block: from streams [B, T, N, E] the weights pre [N], post [N] and
    comb [N, N] (Sinkhorn-projected), and the pre-weighted collapse that feeds the block."""

    cfg: DeepseekV4Config

    @nn.compact
    def __call__(self, streams: jax.Array):
        cfg = self.cfg
        n, e = cfg.hc_mult, streams.shape[-1]
        fn = logical_param(self, "fn", nn.initializers.normal(INIT_STD), ((2 + n) * n, n * e), (None, "embed"), F32)
        base = logical_param(self, "base", nn.initializers.zeros, ((2 + n) * n,), (None,), F32)
        scale = logical_param(self, "scale", nn.initializers.ones, (3,), (None,), F32)
        flat = rms_unweighted(streams.reshape(*streams.shape[:-2], n * e).astype(F32), cfg.rms_norm_eps)
        mix = flat @ fn.T
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
        post = 2 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = mix[..., 2 * n:].reshape(*mix.shape[:-1], n, n) * scale[2] + base[2 * n:].reshape(n, n)
        comb = jax.nn.softmax(comb, axis=-1) + cfg.hc_eps
        comb = comb / (comb.sum(-2, keepdims=True) + cfg.hc_eps)

        def sinkhorn(_, c):
            c = c / (c.sum(-1, keepdims=True) + cfg.hc_eps)
            return c / (c.sum(-2, keepdims=True) + cfg.hc_eps)

        comb = jax.lax.fori_loop(0, cfg.hc_sinkhorn_iters - 1, sinkhorn, comb)  # a loop keeps compiles small
        collapsed = (pre[..., None] * streams).sum(-2).astype(streams.dtype)
        return post, comb, collapsed


def hc_merge(post: jax.Array, comb: jax.Array, out: jax.Array, streams: jax.Array) -> jax.Array:
    """post[k] * out + sum_j comb[j, k] * streams[j] (comb consumed transposed)."""
    dt = streams.dtype
    mixed = jnp.einsum("...jk,...jd->...kd", comb.astype(dt), streams)
    return post.astype(dt)[..., None] * out[..., None, :] + mixed


class HyperHead(nn.Module):
    """The final collapse of the N streams into one: sigmoid-weighted sum."""

    cfg: DeepseekV4Config

    @nn.compact
    def __call__(self, streams: jax.Array) -> jax.Array:
        n, e = self.cfg.hc_mult, streams.shape[-1]
        fn = logical_param(self, "hc_fn", nn.initializers.normal(INIT_STD), (n, n * e), (None, "embed"), F32)
        base = logical_param(self, "hc_base", nn.initializers.zeros, (n,), (None,), F32)
        scale = logical_param(self, "hc_scale", nn.initializers.ones, (1,), (None,), F32)
        flat = rms_unweighted(streams.reshape(*streams.shape[:-2], n * e).astype(F32), self.cfg.rms_norm_eps)
        pre = jax.nn.sigmoid((flat @ fn.T) * scale[0] + base) + self.cfg.hc_eps
        return (pre[..., None] * streams).sum(-2).astype(streams.dtype)


def _score(logits: jax.Array, fn: str) -> jax.Array:
    if fn == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if fn == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


class Router(nn.Module):
    """Top-k router (selection by score + e_score_correction_bias) or hash router
    (experts tid2eid[token]); weights = selected scores renormalised (always, as
    transformers) times routed_scaling_factor."""

    cfg: DeepseekV4Config
    hashed: bool

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array):
        cfg = self.cfg
        x_, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        kernel = logical_param(self, "kernel", nn.initializers.normal(INIT_STD), (cfg.hidden_size, x_),
                               ("embed", None), x.dtype)
        logits = (x @ kernel).astype(F32)
        scores = _score(logits, cfg.scoring_func)
        if self.hashed:
            table = logical_param(self, "tid2eid", nn.initializers.zeros, (cfg.vocab_size, k), ("vocab", None),
                                  jnp.int32)
            index = table[tokens]
        else:
            bias = logical_param(self, "e_score_correction_bias", nn.initializers.zeros, (x_,), (None,), F32)
            _, index = jax.lax.top_k(scores + bias, k)
        w = jnp.take_along_axis(scores, index, axis=-1)
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return w * cfg.routed_scaling_factor, index.astype(jnp.int32)


class SharedExpert(nn.Module):
    """down(silu(min(gate, limit)) * clip(up, +-limit))."""

    cfg: DeepseekV4Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, x.dtype
        i, lim = cfg.moe_intermediate_size, cfg.swiglu_limit
        g = Proj((i,), ("embed", "mlp"), dtype=dt, name="gate_proj")(x)
        u = Proj((i,), ("embed", "mlp"), dtype=dt, name="up_proj")(x)
        if lim is not None:
            g, u = jnp.minimum(g, lim), jnp.clip(u, -lim, lim)
        return Proj((cfg.hidden_size,), ("mlp", "embed"), dtype=dt, name="down_proj")(nn.silu(g) * u)


class MoE(nn.Module):
    """The V4 MoE block: routed experts (moe.routed_experts) plus the shared expert."""

    cfg: DeepseekV4Config
    index: int

    def setup(self):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        self.gate = Router(cfg, cfg.mlp_layer_types[self.index] == HASH_MOE)
        self.shared_experts = SharedExpert(cfg)
        self.experts = Experts(cfg, dt)

    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        b, t, e = x.shape
        w, idx = self.gate(x, tokens)
        routed = self.experts(x.reshape(b * t, e), w.reshape(b * t, -1), idx.reshape(b * t, -1))
        return routed.reshape(b, t, e) + self.shared_experts(x)


class Experts(nn.Module):
    """Routed experts: gate_up [X, 2, I, E] (gate = [:, 0]) and down [X, E, I]."""

    cfg: DeepseekV4Config
    dtype: Dtype

    @nn.compact
    def __call__(self, x, weights, index):
        cfg = self.cfg
        x_, i, e = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        init = nn.initializers.normal(INIT_STD)
        gate_up = logical_param(self, "gate_up_proj", init, (x_, 2, i, e), ("expert", None, "mlp", "embed"),
                                self.dtype)
        down = logical_param(self, "down_proj", init, (x_, e, i), ("expert", "embed", "mlp"), self.dtype)
        return moe.routed_experts(x, weights, index, gate_up, down, jax.nn.silu, cfg.swiglu_limit)


def pool_windows(kv: jax.Array, gate: jax.Array, bias: jax.Array, overlap: bool) -> jax.Array:
    """Softmax-gated pooling of compressor windows.

    kv, gate: [B, W, m, c*D] raw projections of W windows of m tokens (the window before
    the first one prepended as window index -1 when `overlap`: then [B, W+1, m, 2D]);
    bias: [m, c*D] position bias. Returns [B, W, D] pooled entries (before the norm).
    HCA (c = 1): entry w = sum_j softmax_j(gate + bias) * kv over its window.
    CSA (c = 2, overlap): entry w pools window w-1's first half (Ca) and window w's second
    half (Cb) over 2m slots; the caller marks a missing window -1 with gate -inf.
    """
    gate = gate.astype(F32) + bias
    if overlap:
        d = kv.shape[-1] // 2
        kv = jnp.concatenate([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], axis=2)
        gate = jnp.concatenate([gate[:, :-1, :, :d], gate[:, 1:, :, d:]], axis=2)
    p = jax.nn.softmax(gate, axis=2).astype(kv.dtype)
    return (kv * p).sum(2)
