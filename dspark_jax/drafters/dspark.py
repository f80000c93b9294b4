"""The DSpark / DFlash drafter behind the speculation round's drafter interface.

`BlockDrafter` is static and hashable (a jit static argument); parameters travel
separately. Its cache keeps only projected context K/V of committed positions; each
round's block K/V is recomputed and dropped. See speculate.py for the interface.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import checkpoints, target
from dspark_jax.drafters.backbone import BlockDrafterModule, block_mask
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.kv_cache import KVCache, write_index
from dspark_jax.sampling import SamplingParams, argmax, sample_rows, warp


@dataclasses.dataclass(frozen=True)
class BlockDrafter:
    cfg: DrafterConfig
    tcfg: object            # the target's config
    gamma: int              # draft tokens proposed per round (<= block_size)
    sts_temperatures: tuple[float, ...] | None = None  # STS calibration, one per position

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return tuple(self.cfg.target_layer_ids)

    @property
    def module(self) -> BlockDrafterModule:
        return BlockDrafterModule(self.cfg)

    def _dummy(self):
        m = len(self.cfg.target_layer_ids)
        d = self.cfg.arch.hidden_size
        return (jnp.zeros((1, 2, m * d), self.cfg.arch.jnp_dtype), jnp.zeros((1, 2, d), self.cfg.arch.jnp_dtype),
                jnp.zeros((1, 2), jnp.int32))

    def init_params(self, rng: jax.Array):
        return checkpoints.init_module_params(self.module, rng, *self._dummy())

    def param_shapes_and_axes(self):
        return checkpoints.param_template(self.module, *self._dummy())

    def shard(self, params, mesh, rules=None):
        from dspark_jax import mesh as mesh_lib

        _, axes = self.param_shapes_and_axes()
        return mesh_lib.shard_tree(params, axes, mesh, rules or mesh_lib.SERVING_RULES)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.cfg.arch
        return KVCache.init(num_layers=a.num_hidden_layers, batch=batch, max_len=max_len,
                            kv_heads=a.num_key_value_heads, head_dim=a.head_dim, dtype=a.jnp_dtype)

    def ingest(self, dparams, tparams, dcache: KVCache, feats, next_tokens, start, count) -> KVCache:
        """Append the context K/V of positions start..start+count-1 (features [B, T, m*D])."""
        rows = jnp.arange(feats.shape[0], dtype=jnp.int32)
        return self.ingest_lines(dparams, tparams, dcache, feats, next_tokens, rows, start, count)

    def ingest_lines(self, dparams, tparams, dcache: KVCache, feats, next_tokens, rows, start, count) -> KVCache:
        """`ingest` of R lines into chosen cache rows: line l (features [R, T, m*D]) holds
        positions start[l]..start[l]+count[l]-1 of row rows[l] (count 0: nothing). Its cost
        follows R x T, not the cache's batch: prompt chunks ingest apart from the slots."""
        del tparams, next_tokens  # the block drafter reads features only
        t = feats.shape[1]
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        ks, vs = self.module.apply({"params": dparams}, feats.astype(self.cfg.arch.jnp_dtype), positions,
                                   method="context_kv")
        index = write_index(positions, jnp.arange(t)[None, :] < count[:, None], dcache.max_len)
        row = jnp.where(count > 0, rows, dcache.batch)  # empty lines scatter nowhere
        k = dcache.k.at[:, row[:, None], index].set(ks.astype(dcache.k.dtype), mode="drop")
        v = dcache.v.at[:, row[:, None], index].set(vs.astype(dcache.v.dtype), mode="drop")
        return KVCache(k=k, v=v, lengths=dcache.lengths.at[row].set(start + count, mode="drop"))

    def block_hidden(self, dparams, tparams, dcache: KVCache, anchor, start):
        """One parallel pass: [anchor, mask x (block_size - 1)] -> hidden [B, block_size, D]."""
        g = self.cfg.block_size
        b = anchor.shape[0]
        tokens = jnp.concatenate([anchor[:, None], jnp.full((b, g - 1), self.cfg.mask_token_id, jnp.int32)], 1)
        x = target.embed(self.tcfg, tparams, tokens).astype(self.cfg.arch.jnp_dtype)
        positions = start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]
        ctx_valid = jnp.arange(dcache.max_len)[None, :] < start[:, None]
        return self.module.apply({"params": dparams}, x, positions, dcache.k, dcache.v,
                                 block_mask(ctx_valid, g), method="block")

    def confidence_scale(self) -> jax.Array:
        if self.sts_temperatures is None:
            return jnp.ones((self.gamma,), jnp.float32)
        return jnp.asarray(self.sts_temperatures[:self.gamma], jnp.float32)

    def propose(self, dparams, tparams, dcache: KVCache, anchor, start, sampling: SamplingParams, keys):
        """Draft x_1..x_gamma: parallel base logits, then the sequential head left to right."""
        gamma = self.gamma
        h = self.block_hidden(dparams, tparams, dcache, anchor, start)[:, :gamma]
        base = target.logits(self.tcfg, tparams, h)  # [B, G, V] float32
        greedy = sampling.greedy  # static: draft by argmax, q is not built (acceptance never reads it)
        b = anchor.shape[0]
        step_keys = (jnp.zeros((gamma, b), jnp.int32) if greedy else
                     jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, gamma))(keys), 0, 1))
        apply = self.module.apply
        params = {"params": dparams}
        cfg = self.cfg
        temps = self.confidence_scale()

        def body(carry, xs):
            prev, state = carry
            h_k, u_k, key_k, t_k = xs
            e = None
            logits = u_k
            if cfg.markov_rank > 0:
                bias, e, state = apply(params, prev, h_k, state, method="head_step")
                logits = u_k + bias
            if greedy:
                x_k, q_k = argmax(logits), jnp.zeros((b, 1), jnp.float32)
            else:
                q_k = warp(logits, sampling)
                x_k = sample_rows(key_k, q_k)
            if cfg.has_confidence:
                conf = jax.nn.sigmoid(apply(params, h_k, e, method="confidence") / t_k)
            else:
                conf = jnp.zeros(prev.shape, jnp.float32)
            return (x_k, state), (x_k, q_k, conf)

        state0 = jnp.zeros((anchor.shape[0], max(cfg.markov_rank, 1)), jnp.float32)
        xs = (jnp.swapaxes(h, 0, 1), jnp.swapaxes(base, 0, 1), step_keys, temps)
        _, (draft, q, conf) = jax.lax.scan(body, (anchor, state0), xs)
        return (jnp.swapaxes(draft, 0, 1), jnp.swapaxes(q, 0, 1), jnp.swapaxes(conf, 0, 1))
