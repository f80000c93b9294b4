"""Shared test helpers: random drafter folders and an oracle drafter with known drafts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import checkpoints
from dspark_jax.drafters import folders
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.dspark import BlockDrafter


def make_block_drafter(tcfg, *, head="vanilla", rank=16, layers=2, block_size=4, taps=(0, 1),
                       confidence=True, with_markov=True, scale=1.0, seed=1):
    cfg = DrafterConfig(arch=tcfg.replace(num_hidden_layers=layers), target_layer_ids=tuple(taps),
                        block_size=block_size, mask_token_id=3, markov_rank=rank,
                        markov_head_type=head, enable_confidence_head=confidence,
                        confidence_head_with_markov=with_markov)
    drafter = BlockDrafter(cfg, tcfg, block_size)
    params = drafter.init_params(jax.random.key(seed))
    if scale != 1.0:
        params = jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)
    return drafter, params


def write_block_drafter(folder, target_folder, tparams, drafter, params, sts=None):
    folders.save_block_drafter(str(folder), drafter, params, checkpoints.read_config(target_folder),
                               tparams, sts_temperatures=sts)
    return str(folder)


@dataclasses.dataclass(frozen=True)
class OracleDrafter:
    """Drafts the known reference continuation, wrong wherever `corrupt` says so.

    dparams = {"ref": [B, L] tokens by absolute position, "corrupt": [B, L] bool}. Its
    q is one-hot, i.e. a deterministic drafter; used to drive real acceptances.
    """

    gamma: int
    vocab: int
    tap_layers: tuple = (0,)

    def init_cache(self, batch, max_len):
        return jnp.zeros((batch,), jnp.int32)

    def ingest(self, dparams, tparams, dcache, feats, next_tokens, start, count):
        return jnp.where(count > 0, start + count, dcache)

    def propose(self, dparams, tparams, dcache, anchor, start, sampling, keys):
        ref, corrupt = dparams["ref"], dparams["corrupt"]
        pos = jnp.clip(start[:, None] + 1 + jnp.arange(self.gamma)[None, :], 0, ref.shape[1] - 1)
        tok = jnp.take_along_axis(ref, pos, axis=1)
        tok = jnp.where(jnp.take_along_axis(corrupt, pos, axis=1), (tok + 1) % self.vocab, tok)
        return tok, jax.nn.one_hot(tok, self.vocab), jnp.ones(tok.shape, jnp.float32)

    def shard(self, params, mesh):
        return params
