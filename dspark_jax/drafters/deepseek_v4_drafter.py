"""The DSpark drafter of a DeepSeek-V4 target: the production shape of the paper (5.1).

The backbone, heads and drafter interface are the block drafter's (backbone.py,
heads.py, dspark.py); the draft layers and the head stack are DeepSeek-V4's:

- every draft layer is a V4 decoder layer (models/deepseek_v4.py `DecoderLayer`: mHC
  around attention and around the MoE, with routed experts through moe.routed_experts
  and the shared expert) whose attention is sliding-window only (no compressor, no
  indexer, RoPE of the main layers) and score-routed (no hash router);
- the block enters as the embedding copied onto the `hc_mult` streams; after the last
  layer the streams collapse through their own `hc_head`, then the final `norm`;
- KV injection: each layer turns H_ctx = main_norm(main_proj [taps]) into its one
  shared K=V head (its own wkv, kv_norm and RoPE at the true positions); block queries
  see the block bidirectionally and the context positions anchor - sliding_window ..
  anchor - 1 (one window for the whole block, anchored at the block's first position);
- the Markov head is the vanilla one; the confidence head has no bias.

Taps: DeepSeek's drafter reads the hyper-connection streams that ENTER each of its
target layers, averaged over the hc_mult streams (`dspark_target_layer_ids` [40, 41,
42] of the 43-layer Flash). The target's `tap_layers` i returns that average of the
streams leaving layer i, so DeepSeek's id l is tap l - 1 here (tap -1, the embedding,
is what enters layer 0). DrafterConfig.target_layer_ids hold the project's ids.

Known departure: DeepSeek's confidence head reads the hc_head output before `norm`;
the block drafter interface hands the heads the normed hidden, so this one reads that.
Folders in and out: drafters/deepseek_v4_layout.py.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax.config_deepseek_v4 import MOE, SLIDING, DeepseekV4Config
from dspark_jax.drafters.backbone import BlockDrafterModule
from dspark_jax.drafters.config import DrafterConfig, check_fits_target
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.drafters.heads import SequentialHead
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache
from dspark_jax.models.deepseek_v4 import DecoderLayer
from dspark_jax.models.deepseek_v4_attention import Attention
from dspark_jax.models.deepseek_v4_layers import (F32, HyperHead, RMSNorm,
                                                  rms_unweighted, rope)
from dspark_jax.models.layers import Proj


def draft_arch(tcfg: DeepseekV4Config, num_layers: int, n_routed_experts: int | None = None,
               num_experts_per_tok: int | None = None) -> DeepseekV4Config:
    """`num_layers` sliding-window, score-routed V4 layers of the target's shape."""
    if num_layers < 1:
        raise DSparkError(f"a drafter needs at least one layer; got {num_layers}")
    return tcfg.replace(num_hidden_layers=num_layers, layer_types=(SLIDING,) * num_layers,
                        mlp_layer_types=(MOE,) * num_layers, tie_word_embeddings=False,
                        n_routed_experts=n_routed_experts or tcfg.n_routed_experts,
                        num_experts_per_tok=num_experts_per_tok or tcfg.num_experts_per_tok)


def deepseek_tap_ids(tcfg: DeepseekV4Config) -> tuple[int, ...]:
    """DeepSeek's choice, in the project's ids: the streams entering the last three
    target layers (Flash: dspark_target_layer_ids [40, 41, 42] -> taps 39, 40, 41)."""
    n = tcfg.num_hidden_layers
    return tuple(i - 1 for i in range(max(n - 3, 0), n))


def new_config(tcfg: DeepseekV4Config, *, num_layers: int = 3, target_layer_ids=None, block_size: int = 5,
               mask_token_id: int = 0, markov_rank: int = 256, num_anchors: int = 512,
               dtype: str | None = None) -> DrafterConfig:
    """A DrafterConfig for a fresh V4 drafter (paper defaults: 3 layers, gamma 5, rank 256)."""
    arch = draft_arch(tcfg, num_layers)
    if dtype is not None:
        arch = arch.replace(dtype=dtype)
    taps = deepseek_tap_ids(tcfg) if target_layer_ids is None else tuple(target_layer_ids)
    return DrafterConfig(arch=arch, target_layer_ids=taps, block_size=block_size, mask_token_id=mask_token_id,
                         markov_rank=markov_rank, markov_head_type="vanilla", enable_confidence_head=True,
                         confidence_head_with_markov=True, num_anchors=num_anchors,
                         num_target_layers=tcfg.num_hidden_layers)


# ------------------------------------------------------------------------------ modules

@struct.dataclass
class DraftRows:
    """What a draft layer's attention reads instead of cache rows: the injected context
    K=V [B, S, D] and the mask [B, Q, S + Q] over [context ; block]."""

    ctx: jax.Array
    mask: jax.Array


class DraftAttention(Attention):
    """V4 sliding-window attention whose keys are [context K=V ; block K=V]."""

    def context_kv(self, ctx: jax.Array, positions: jax.Array) -> jax.Array:
        """H_ctx [B, T, E] -> K=V [B, T, D] (wkv, kv_norm, RoPE at the true positions)."""
        return rope(self.kv_norm(self.kv_proj(ctx)), positions, self.spec)

    def __call__(self, x, positions, rows: DraftRows, base):
        """x [B, Q, E] block states -> (out [B, Q, E], rows); `base` is unused."""
        del base
        cfg = self.cfg
        q = rope(rms_unweighted(self.q_b_proj(self.q_a_norm(self.q_a_proj(x))), cfg.rms_norm_eps), positions,
                 self.spec)
        kv = rope(self.kv_norm(self.kv_proj(x)), positions, self.spec)
        wide = jnp.promote_types(rows.ctx.dtype, kv.dtype)   # the block joins the cache's dtype
        keys = jnp.concatenate([rows.ctx.astype(wide), kv.astype(wide)], axis=1)
        logits = jnp.einsum("bthd,bsd->bths", q.astype(F32), keys.astype(F32)) * cfg.head_dim ** -0.5
        logits = jnp.where(rows.mask[:, :, None], logits, -jnp.inf)
        sink = jnp.broadcast_to(self.sinks[None, None, :, None], logits.shape[:3] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
        o = jnp.einsum("bths,bsd->bthd", probs.astype(keys.dtype), keys).astype(x.dtype)
        o = rope(o, positions, self.spec, inverse=True)
        return self.o_b_proj(self.o_a_proj(o)), rows


class DraftLayer(DecoderLayer):
    """The V4 decoder layer (same passes, same names) with DraftAttention."""

    attention = DraftAttention

    def context_kv(self, ctx, positions):
        return self.self_attn.context_kv(ctx, positions)


class ConfidenceHead(nn.Module):
    """Logit of c_k from [h_k ; W1[x_{k-1}]], a bias-free projection (DeepSeek's V4 head)."""

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array) -> jax.Array:
        x = jnp.concatenate([h.astype(F32), e.astype(F32)], axis=-1)
        return Proj((1,), ("joint", None), dtype=F32, name="proj")(x)[..., 0]


class V4BlockDrafterModule(BlockDrafterModule):
    """BlockDrafterModule with V4 draft layers, streams and head stack (same passes)."""

    def setup(self):
        cfg = self.cfg
        arch, dt = cfg.arch, cfg.arch.jnp_dtype
        self.fc = Proj((arch.hidden_size,), ("mlp", "embed"), dtype=dt)          # main_proj
        self.hidden_norm = RMSNorm(arch.rms_norm_eps)                              # main_norm
        self.layers = [DraftLayer(arch, i, name=f"layers_{i}") for i in range(arch.num_hidden_layers)]
        self.hc_head = HyperHead(arch)
        self.norm = RMSNorm(arch.rms_norm_eps)
        self.markov_head = SequentialHead(arch.vocab_size, cfg.markov_rank, arch.hidden_size, "vanilla", dt)
        self.confidence_head = ConfidenceHead()

    def context_kv(self, feats: jax.Array, positions: jax.Array):
        """Per-layer context K=V as one KV head: ([L, B, T, 1, D], the same array)."""
        ctx = self.context(feats)
        kv = jnp.stack([layer.context_kv(ctx, positions) for layer in self.layers])[..., None, :]
        return kv, kv

    def block(self, x, positions, ctx_k, ctx_v, mask):
        """Block embeddings [B, Q, E] (Q a multiple of block_size, blocks laid end to end)
        -> normed hidden [B, Q, E]. The context part of `mask` (slot == position) is
        narrowed to the sliding window ending just before each block's anchor."""
        del ctx_v   # K = V
        cfg, arch = self.cfg, self.cfg.arch
        b, q = x.shape[:2]
        s = ctx_k.shape[2]
        anchor = positions - (jnp.arange(q, dtype=positions.dtype) % cfg.block_size)[None]
        window = jnp.arange(s)[None, None] >= (anchor - arch.sliding_window)[..., None]
        mask = jnp.concatenate([mask[..., :s] & window, mask[..., s:]], axis=-1)
        streams = jnp.broadcast_to(x[:, :, None], (b, q, arch.hc_mult, x.shape[-1]))
        tokens = jnp.zeros((b, q), jnp.int32)   # read by hash routers only; draft layers route by score
        for i, layer in enumerate(self.layers):
            streams, _ = layer(streams, tokens, positions, DraftRows(ctx=ctx_k[i][:, :, 0], mask=mask), None)
        return self.norm(self.hc_head(streams))

    def confidence(self, h, e):
        return self.confidence_head(h, e)


# ------------------------------------------------------------------------------ drafter

def check_config(cfg: DrafterConfig, where: str) -> None:
    """The released shape only: a vanilla Markov head and a confidence head over [h; e]."""
    if cfg.markov_rank < 1 or cfg.markov_head_type != "vanilla":
        raise DSparkError(f"{where}: a DeepSeek-V4 DSpark drafter has a vanilla Markov head (markov_rank >= 1); "
                          f"got markov_rank {cfg.markov_rank}, markov_head_type {cfg.markov_head_type}")
    if not (cfg.enable_confidence_head and cfg.confidence_head_with_markov):
        raise DSparkError(f"{where}: a DeepSeek-V4 DSpark drafter has a confidence head over [hidden; markov "
                          "embedding]; enable_confidence_head and confidence_head_with_markov must be true")


@dataclasses.dataclass(frozen=True)
class DeepseekV4BlockDrafter(BlockDrafter):
    """The block drafter of dspark.py on a DeepSeek-V4 target (static and hashable)."""

    def __post_init__(self):
        if not isinstance(self.tcfg, DeepseekV4Config):
            raise DSparkError(f"a DeepSeek-V4 drafter needs a DeepSeek-V4 target; the target is "
                              f"{type(self.tcfg).__name__.removesuffix('Config')}")
        check_config(self.cfg, "deepseek_v4 drafter")
        check_fits_target(self.cfg, self.tcfg, "deepseek_v4 drafter")
        if not 1 <= self.gamma <= self.cfg.block_size:
            raise DSparkError(f"gamma {self.gamma} must be in [1, block size {self.cfg.block_size}]")

    @property
    def module(self) -> V4BlockDrafterModule:
        return V4BlockDrafterModule(self.cfg)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.cfg.arch  # one shared K=V head per draft layer (kept as both k and v)
        return KVCache.init(num_layers=a.num_hidden_layers, batch=batch, max_len=max_len, kv_heads=1,
                            head_dim=a.head_dim, dtype=a.jnp_dtype)


def for_training(cfg, tcfg: DeepseekV4Config, mask_id: int) -> DeepseekV4BlockDrafter:
    """The drafter `train.train` builds for a V4 target from a TrainConfig (taps default
    to DeepSeek's: the streams entering the last three target layers)."""
    if cfg.drafter != "dspark":
        raise DSparkError(f"a DeepSeek-V4 target trains a dspark drafter (the released shape); got "
                          f"drafter={cfg.drafter}")
    dcfg = new_config(tcfg, num_layers=cfg.draft_layers, target_layer_ids=tuple(cfg.target_layer_ids) or None,
                      block_size=cfg.block_size, mask_token_id=mask_id, markov_rank=cfg.markov_rank,
                      num_anchors=cfg.num_anchors, dtype=cfg.compute_dtype)
    dcfg = dcfg.replace(markov_head_type=cfg.markov_head_type, enable_confidence_head=cfg.confidence_head,
                        confidence_head_with_markov=cfg.confidence_with_markov)
    check_config(dcfg, "training config")
    return DeepseekV4BlockDrafter(dcfg, tcfg, cfg.block_size)
