"""The DFlash-style parallel backbone with KV injection, plus DSpark's heads.

Context: the target's tapped layer outputs at committed positions are projected
(H_ctx = RMSNorm(fc [H_l1; ...; H_lm])) and, in every draft layer, turned into K/V with
that layer's own k/v projections, k-norm and RoPE at their true positions (the context
is not passed through the layer's input norm). Block queries attend to [context K/V ;
block K/V] under a caller-supplied mask: bidirectional within the block, and context
strictly before the anchor.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.attention import attend
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.heads import ConfidenceHead, SequentialHead
from dspark_jax.models.layers import MLP, Proj, RMSNorm
from dspark_jax.models.qwen3 import attention_module


class DraftLayer(nn.Module):
    arch: object  # Qwen3Config of the draft layers

    def setup(self):
        arch, dt = self.arch, self.arch.jnp_dtype
        self.input_layernorm = RMSNorm(arch.rms_norm_eps, dt)
        self.self_attn = attention_module(arch)
        self.post_attention_layernorm = RMSNorm(arch.rms_norm_eps, dt)
        self.mlp = MLP(arch.hidden_size, arch.intermediate_size, dt)

    def context_kv(self, ctx: jax.Array, positions: jax.Array):
        return self.self_attn.kv(ctx, positions)

    def __call__(self, x, positions, ctx_k, ctx_v, mask):
        """x [B, Q, D] block states; ctx_k/v [B, S, Hkv, Dh]; mask [B, Q, S + Q]."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        wide = jnp.promote_types(ctx_k.dtype, k.dtype)  # the block joins the cache's dtype, not the reverse
        keys = jnp.concatenate([ctx_k.astype(wide), k.astype(wide)], axis=1)
        vals = jnp.concatenate([ctx_v.astype(wide), v.astype(wide)], axis=1)
        o = attend(q, keys, vals, mask, scale=self.arch.head_dim ** -0.5)
        x = x + self.self_attn.out(o)
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockDrafterModule(nn.Module):
    """Parameters and passes of a DSpark (markov_rank > 0) or DFlash drafter."""

    cfg: DrafterConfig

    def setup(self):
        cfg = self.cfg
        arch, dt = cfg.arch, cfg.arch.jnp_dtype
        self.fc = Proj((arch.hidden_size,), ("mlp", "embed"), dtype=dt)
        self.hidden_norm = self.make_norm()
        self.layers = [self.make_layer(i) for i in range(arch.num_hidden_layers)]
        self.norm = self.make_norm()
        if cfg.markov_rank > 0:
            self.markov_head = SequentialHead(arch.vocab_size, cfg.markov_rank, arch.hidden_size,
                                              cfg.markov_head_type, dt)
        if cfg.has_confidence:
            self.confidence_head = ConfidenceHead(cfg.confidence_head_with_markov and cfg.markov_rank > 0, dt)

    # Architecture hooks: a drafter for another target family overrides these two only.
    def make_layer(self, i: int) -> nn.Module:
        return DraftLayer(self.cfg.arch, name=f"layers_{i}")

    def make_norm(self) -> nn.Module:
        return RMSNorm(self.cfg.arch.rms_norm_eps, self.cfg.arch.jnp_dtype)

    def context(self, feats: jax.Array) -> jax.Array:
        """Tapped target features [B, T, m*D] -> H_ctx [B, T, D]."""
        return self.hidden_norm(self.fc(feats))

    def context_kv(self, feats: jax.Array, positions: jax.Array):
        """Per-layer context K/V, stacked: ([L, B, T, Hkv, Dh], same)."""
        ctx = self.context(feats)
        kvs = [layer.context_kv(ctx, positions) for layer in self.layers]
        return jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs])

    def block(self, x: jax.Array, positions: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array,
              mask: jax.Array) -> jax.Array:
        """Block embeddings [B, Q, D] -> final-normed hidden states [B, Q, D]."""
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, ctx_k[i], ctx_v[i], mask)
        return self.norm(x)

    def head_step(self, prev, h, state):
        return self.markov_head.step(prev, h, state)

    def head_teacher_forced(self, prev, h):
        return self.markov_head.teacher_forced(prev, h)

    def confidence(self, h, e):
        return self.confidence_head(h, e)

    def __call__(self, feats, x, positions):
        """Touches every parameter once (used by init only)."""
        k, v = self.context_kv(feats, positions)
        mask = jnp.ones(x.shape[:2] + (feats.shape[1] + x.shape[1],), bool)
        h = self.block(x, positions, k, v, mask)
        e = None
        if self.cfg.markov_rank > 0:
            _, e = self.head_teacher_forced(jnp.zeros(x.shape[:2], jnp.int32), h)
        if self.cfg.has_confidence:
            self.confidence(h, e)
        return h


def block_mask(ctx_valid: jax.Array, block: int) -> jax.Array:
    """[B, S] visible context -> [B, G, S + G]: context as given, block fully visible."""
    b, s = ctx_valid.shape
    ctx = jnp.broadcast_to(ctx_valid[:, None, :], (b, block, s))
    return jnp.concatenate([ctx, jnp.ones((b, block, block), bool)], axis=-1)
