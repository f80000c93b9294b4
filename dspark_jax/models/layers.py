"""Building blocks shared by the Qwen3 target and the drafters.

Parameter names follow the Hugging Face module tree (q_proj, k_norm, ...) so checkpoint
mapping is mechanical; every parameter carries logical axis names for the mesh rules.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.attention import apply_rope, rope_frequencies

Dtype = Any
INIT_STD = 0.02


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, reduced in float32 (the Qwen3 convention)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = _param(self, "weight", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                        self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return weight * xf.astype(x.dtype)


class Proj(nn.Module):
    """A linear map contracting the last `n_in` input dims into `features`.

    kernel: [*in_dims, *features] with logical `axes` (in-axes then out-axes).
    """

    features: Sequence[int]
    axes: Sequence[str]
    n_in: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_dims = x.shape[-self.n_in:]
        kernel = _param(self, "kernel", nn.initializers.normal(INIT_STD), in_dims + features,
                        tuple(self.axes), self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=self.n_in)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, features,
                          tuple(self.axes)[-len(features):], self.dtype)
            y = y + bias
        return y


class Attention(nn.Module):
    """Projections of a GQA attention layer with per-head q/k RMSNorm and RoPE.

    The attention itself (which keys, which mask, which cache) belongs to the caller:
    `qkv` produces rotated q, k, v and `out` applies o_proj.
    """

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dim: int | None = None  # None: rotate the whole head
    eps: float = 1e-6
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        self.q_proj = Proj((h, d), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Proj((hkv, d), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Proj((hkv, d), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Proj((self.hidden,), ("heads", "head_dim", "embed"), n_in=2, **kw)
        self.q_norm = RMSNorm(self.eps, self.dtype, "head_dim")
        self.k_norm = RMSNorm(self.eps, self.dtype, "head_dim")

    def qkv(self, x: jax.Array, positions: jax.Array):
        """x: [B, T, E] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] (q, k normed and rotated)."""
        return self.q(x, positions), *self.kv(x, positions)

    def q(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        inv = rope_frequencies(self.head_dim, self.rope_theta, self.rotary_dim)
        return apply_rope(self.q_norm(self.q_proj(x)), positions, inv)

    def kv(self, x: jax.Array, positions: jax.Array):
        inv = rope_frequencies(self.head_dim, self.rope_theta, self.rotary_dim)
        k = apply_rope(self.k_norm(self.k_proj(x)), positions, inv)
        return k, self.v_proj(x)

    def out(self, o: jax.Array) -> jax.Array:
        """o_proj: [B, T, Hq, D] -> [B, T, E]."""
        return self.o_proj(o)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    hidden: int
    intermediate: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Proj((self.intermediate,), ("embed", "mlp"), dtype=self.dtype, name="gate_proj")(x)
        up = Proj((self.intermediate,), ("embed", "mlp"), dtype=self.dtype, name="up_proj")(x)
        return Proj((self.hidden,), ("mlp", "embed"), dtype=self.dtype, name="down_proj")(
            nn.silu(gate) * up)


def embedding(vocab: int, dim: int, dtype: Dtype, name: str) -> nn.Embed:
    return nn.Embed(vocab, dim, dtype=dtype, param_dtype=dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(INIT_STD), ("vocab", "embed")))
