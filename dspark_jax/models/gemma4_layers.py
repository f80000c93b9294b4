"""Gemma 4 building blocks: its RMSNorm, gated MLP, MoE router and experts, attention.

Parameter names follow transformers' module tree (`q_proj`, `router.per_expert_scale`,
`experts.gate_up_proj`, ...) so `checkpoints.tensor_name` maps them mechanically;
every parameter carries logical axis names only (the experts' X axis is `expert`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.attention import apply_rope
from dspark_jax.config_gemma4 import RopeSpec
from dspark_jax.models.layers import INIT_STD, Proj
from dspark_jax.models.moe import routed_experts

Dtype = Any


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter carrying logical axis names (None: replicated)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * (mean(x^2) + eps)^-0.5 in float32 (transformers' Gemma4RMSNorm._norm)."""
    xf = x.astype(jnp.float32)
    return xf * jnp.power(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps, -0.5)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' ACT2FN for the names Gemma4Config accepts."""
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return jax.nn.silu


class RMSNorm(nn.Module):
    """Gemma 4's norm: the scale is `weight` itself (not 1 + weight) and multiplies in
    float32 before the cast back."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = logical_param(self, "weight", nn.initializers.ones, (x.shape[-1],),
                               (self.axis_name,), self.dtype)
        return (rms_normalize(x, self.eps) * weight.astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with Gemma's tanh-GELU."""

    hidden: int
    intermediate: int
    act: str = "gelu_pytorch_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Proj((self.intermediate,), ("embed", "mlp"), dtype=self.dtype, name="gate_proj")(x)
        up = Proj((self.intermediate,), ("embed", "mlp"), dtype=self.dtype, name="up_proj")(x)
        return Proj((self.hidden,), ("mlp", "embed"), dtype=self.dtype, name="down_proj")(
            activation(self.act)(gate) * up)


class Router(nn.Module):
    """Top-k routing: softmax over experts (float32) of proj(norm(x) * scale / sqrt(d)),
    top-k renormalised to sum 1, times a learned per-expert scale."""

    hidden: int
    num_experts: int
    top_k: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        """x [..., E] -> (weights [..., K] float32, expert index [..., K] int32)."""
        scale = logical_param(self, "scale", nn.initializers.ones, (self.hidden,), ("norm",), self.dtype)
        per_expert = logical_param(self, "per_expert_scale", nn.initializers.ones, (self.num_experts,),
                                   ("norm",), self.dtype)
        h = rms_normalize(x, self.eps).astype(x.dtype) * scale * self.hidden ** -0.5
        scores = Proj((self.num_experts,), ("embed", None), dtype=self.dtype, name="proj")(h)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        weights, index = jax.lax.top_k(probs, self.top_k)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * per_expert[index].astype(jnp.float32), index


class Experts(nn.Module):
    """The expert MLPs, stored as transformers does: gate_up_proj [X, 2I, d] (kept here as
    [X, 2, I, d], the same bytes) and down_proj [X, d, I].

    Tokens run only their top-k experts (dspark_jax.models.moe.routed_experts: grouped
    matmuls, expert-parallel over the `expert` axis under a mesh) and the router weights
    mix the results.
    """

    num_experts: int
    hidden: int
    intermediate: int
    act: str = "gelu_pytorch_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, index: jax.Array) -> jax.Array:
        """x [..., d]; weights, index [..., K] -> [..., d]."""
        n, d, f = self.num_experts, self.hidden, self.intermediate
        init = nn.initializers.normal(INIT_STD)
        gate_up = logical_param(self, "gate_up_proj", init, (n, 2, f, d), ("expert", None, "mlp", "embed"),
                                self.dtype)
        down = logical_param(self, "down_proj", init, (n, d, f), ("expert", "embed", "mlp"), self.dtype)
        k = index.shape[-1]
        y = routed_experts(x.reshape(-1, d), weights.reshape(-1, k), index.reshape(-1, k),
                           gate_up, down, activation(self.act))
        return y.reshape(x.shape)


class Attention(nn.Module):
    """Projections of one Gemma 4 attention layer; the caller does the attending.

    q and k get a scaled per-head RMSNorm and RoPE, v a scale-free RMSNorm. A KV-shared
    layer (`has_kv=False`) owns only q_proj, q_norm and o_proj. With `k_eq_v` there is no
    v_proj: V is v_norm of the raw k_proj output.
    """

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    has_kv: bool = True
    k_eq_v: bool = False
    eps: float = 1e-6
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        self.q_proj = Proj((h, d), ("embed", "heads", "head_dim"), **kw)
        self.q_norm = RMSNorm(self.eps, self.dtype, "head_dim")
        if self.has_kv:
            self.k_proj = Proj((hkv, d), ("embed", "kv_heads", "head_dim"), **kw)
            self.k_norm = RMSNorm(self.eps, self.dtype, "head_dim")
            if not self.k_eq_v:
                self.v_proj = Proj((hkv, d), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Proj((self.hidden,), ("heads", "head_dim", "embed"), n_in=2, **kw)

    def _inv_freq(self) -> jax.Array:
        return jnp.asarray(self.rope.inv_freq(self.head_dim))

    def q(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, E] -> q [B, T, Hq, D], normed and rotated."""
        return apply_rope(self.q_norm(self.q_proj(x)), positions, self._inv_freq())

    def kv(self, x: jax.Array, positions: jax.Array):
        """x [B, T, E] -> k, v [B, T, Hkv, D] (k normed and rotated, v normed)."""
        raw_k = self.k_proj(x)
        raw_v = raw_k if self.k_eq_v else self.v_proj(x)
        k = apply_rope(self.k_norm(raw_k), positions, self._inv_freq())
        return k, rms_normalize(raw_v, self.eps).astype(raw_v.dtype)  # v_norm: no scale

    def out(self, o: jax.Array) -> jax.Array:
        """o_proj: [B, T, Hq, D] -> [B, T, E]."""
        return self.o_proj(o)
