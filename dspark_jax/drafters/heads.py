"""The sequential heads (Markov, gated Markov, RNN) and the confidence head.

Inference calls `step` once per draft position inside a `lax.scan`; training calls
`teacher_forced` with the ground-truth previous tokens for a whole block at once.
Concatenation orders follow the method note: gate and confidence read [h_k ; W1[x_{k-1}]],
the RNN reads [s_{k-1} ; W1[x_{k-1}] ; h_k].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.models.layers import Proj

Dtype = Any


class SequentialHead(nn.Module):
    """B_k(x_{k-1}, .): a low-rank bias on the draft logits from the previous token."""

    vocab: int
    rank: int
    hidden: int
    head_type: str = "vanilla"
    dtype: Dtype = jnp.float32

    def setup(self):
        r = self.rank
        self.markov_w1 = nn.Embed(self.vocab, r, dtype=self.dtype, param_dtype=self.dtype,
                                  embedding_init=nn.with_logical_partitioning(
                                      nn.initializers.normal(0.02), ("vocab", "rank")))
        self.markov_w2 = Proj((self.vocab,), ("rank", "vocab"), dtype=self.dtype)
        if self.head_type == "gated":
            self.gate_proj = Proj((r,), ("joint", "rank"), use_bias=True, dtype=self.dtype)
        elif self.head_type == "rnn":
            self.joint_proj = Proj((3 * r,), ("joint", "rank"), use_bias=True, dtype=self.dtype)

    def init_state(self, batch_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros(batch_shape + (self.rank,), jnp.float32)

    def embed(self, prev: jax.Array) -> jax.Array:
        return self.markov_w1(prev)

    def step(self, prev: jax.Array, h: jax.Array, state: jax.Array):
        """prev [...], h [..., D], state [..., r] -> (bias [..., V] f32, e [..., r], state)."""
        e = self.markov_w1(prev)
        if self.head_type == "vanilla":
            z = e
        elif self.head_type == "gated":
            gate = jax.nn.sigmoid(self.gate_proj(jnp.concatenate([h, e], axis=-1)))
            z = gate * e
        else:
            g, c, o = jnp.split(self.joint_proj(jnp.concatenate([state.astype(e.dtype), e, h], axis=-1)), 3, -1)
            keep = jax.nn.sigmoid(g.astype(jnp.float32))
            state = keep * state + (1 - keep) * jnp.tanh(c.astype(jnp.float32))
            z = jnp.tanh(o)
        return self.markov_w2(z).astype(jnp.float32), e, state

    def teacher_forced(self, prev: jax.Array, h: jax.Array):
        """prev [B, G] ground-truth previous tokens, h [B, G, D] -> (bias [B, G, V], e [B, G, r])."""
        if self.head_type != "rnn":
            bias, e, _ = self.step(prev, h, self.init_state(prev.shape))
            return bias, e

        state, biases, es = self.init_state(prev.shape[:1]), [], []
        for k in range(prev.shape[1]):  # G is small and static: unrolled
            bias, e, state = self.step(prev[:, k], h[:, k], state)
            biases.append(bias)
            es.append(e)
        return jnp.stack(biases, axis=1), jnp.stack(es, axis=1)

    def __call__(self, prev, h):
        return self.teacher_forced(prev, h)


class ConfidenceHead(nn.Module):
    """Logit of c_k = P(x_k survives | x_1..x_{k-1} survived) from [h_k ; W1[x_{k-1}]]."""

    with_markov: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array | None) -> jax.Array:
        x = jnp.concatenate([h, e], axis=-1) if self.with_markov else h
        return Proj((1,), ("joint", None), use_bias=True, dtype=self.dtype, name="proj")(x)[..., 0].astype(jnp.float32)
