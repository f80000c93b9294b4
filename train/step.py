"""The jitted drafter training step: frozen target inside, DSpark/DFlash objective, AdamW.

    state, metrics = train_step(state, batch)     # pure, static shapes, donates state

The target runs inside the step (no feature cache on disk) and yields its tapped layer
features for every position plus its distributions only at the block positions the
loss reads (LM head applied to gathered hidden states). Master weights stay float32;
the forward runs in `compute_dtype`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dspark_jax import target
from dspark_jax.drafters.config import DrafterConfig, check_fits_target, default_layer_ids
from dspark_jax.drafters.dspark import BlockDrafter
from dspark_jax.drafters.zlab import ZlabDFlashDrafter
from dspark_jax.errors import DSparkError
from train import objective


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def mask_token_id(cfg, tokenizer_dir: str, vocab: int) -> int:
    if str(cfg.mask_token).isdigit():
        tid = int(cfg.mask_token)
    else:
        from dspark_jax.tokenizer import Tokenizer

        tid = Tokenizer(tokenizer_dir).token_to_id(cfg.mask_token)
        if tid is None:
            raise DSparkError(f"mask token '{cfg.mask_token}' is not in {tokenizer_dir}/tokenizer.json; "
                              "set mask_token=<token or id>")
    if not 0 <= tid < vocab:
        raise DSparkError(f"mask token id {tid} is outside the vocabulary [0, {vocab})")
    return tid


def build_drafter(cfg, tcfg, mask_id: int) -> BlockDrafter:
    if cfg.drafter == "eagle3":  # drafts autoregressively: no mask token
        from train import eagle3_objective

        return eagle3_objective.build_drafter(cfg, tcfg)
    if type(tcfg).__name__ == "DeepseekV4Config":   # V4 draft layers, DeepSeek's taps by default
        from dspark_jax.drafters.deepseek_v4_drafter import for_training

        return for_training(cfg, tcfg, mask_id)
    arch = tcfg.replace(num_hidden_layers=cfg.draft_layers, dtype=cfg.compute_dtype,
                        intermediate_size=cfg.draft_intermediate_size or tcfg.intermediate_size)
    rank = cfg.markov_rank if cfg.drafter == "dspark" else 0
    dcfg = DrafterConfig(arch=arch, target_layer_ids=tuple(cfg.target_layer_ids) or default_layer_ids(
                             tcfg.num_hidden_layers), block_size=cfg.block_size, mask_token_id=mask_id,
                         markov_rank=rank, markov_head_type=cfg.markov_head_type,
                         enable_confidence_head=cfg.confidence_head and rank > 0,
                         confidence_head_with_markov=cfg.confidence_with_markov,
                         num_anchors=cfg.num_anchors, num_target_layers=tcfg.num_hidden_layers)
    check_fits_target(dcfg, tcfg, "training config")
    if getattr(cfg, "block_convention", "deepspec") == "zlab":   # drafts from the mask positions 1..
        return ZlabDFlashDrafter(dcfg, tcfg, cfg.block_size - 1)
    return BlockDrafter(dcfg, tcfg, cfg.block_size)


def optimizer(cfg) -> optax.GradientTransformation:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                               end_value=cfg.lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))


def init_state(drafter, tx, seed: int) -> TrainState:
    if drafter.kind == "eagle3":
        from train import eagle3_objective

        params = eagle3_objective.init_params(drafter, jax.random.key(seed))
    else:
        f32 = drafter.cfg.replace(arch=drafter.cfg.arch.replace(dtype="float32"))
        params = dataclasses.replace(drafter, cfg=f32).init_params(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)))


def block_forward(drafter: BlockDrafter, tcfg, dparams, tparams, batch, key, num_anchors: int):
    """Everything up to the logits: returns (q_logits, p_logits, targets, tvalid, conf_logits)."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    lengths = batch["lengths"]
    b, length = ids.shape
    g = drafter.cfg.block_size
    hidden, _, taps = target.forward(tcfg, tparams, ids, lengths, None, drafter.tap_layers)
    hidden = jax.lax.stop_gradient(hidden)
    feats = jax.lax.stop_gradient(jnp.concatenate(taps, axis=-1))
    anchors, valid = objective.sample_anchors(key, mask, num_anchors)
    n = anchors.shape[1]
    targets, tvalid = objective.block_targets(ids, mask, anchors, valid, g)
    module = drafter.module
    dt = drafter.cfg.arch.jnp_dtype
    ctx_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    ctx_k, ctx_v = module.apply({"params": dparams}, feats.astype(dt), ctx_pos, method="context_kv")
    first = jnp.take_along_axis(ids, anchors, axis=1)                                     # [B, N]
    tokens = jnp.concatenate([first[..., None], jnp.full((b, n, g - 1), drafter.cfg.mask_token_id, jnp.int32)], -1)
    x = target.embed(tcfg, tparams, tokens.reshape(b, n * g)).astype(dt)
    positions = (anchors[..., None] + jnp.arange(g)[None, None, :]).reshape(b, n * g)
    attn_mask = objective.block_sparse_mask(anchors, valid, length, g)
    h = module.apply({"params": dparams}, x, positions, ctx_k, ctx_v, attn_mask, method="block")
    # target distribution for x_{a+k} is its output at position a+k-1
    p_pos = jnp.minimum(positions, length - 1)
    if isinstance(drafter, ZlabDFlashDrafter):
        # z-lab: block position k (1..G-1) predicts x_{a+k}; position 0 (the anchor) predicts nothing
        h = h.reshape(b, n, g, -1)[:, :, 1:].reshape(b, n * (g - 1), -1)
        p_pos = p_pos.reshape(b, n, g)[:, :, :-1].reshape(b, n * (g - 1))
        targets, tvalid, g = targets[..., :-1], tvalid[..., :-1], g - 1
    q_logits = target.logits(tcfg, tparams, h).reshape(b, n, g, -1)
    h = h.reshape(b, n, g, -1)
    p_hidden = jnp.take_along_axis(hidden, p_pos[..., None], axis=1)
    p_logits = jax.lax.stop_gradient(target.logits(tcfg, tparams, p_hidden)).reshape(b, n, g, -1)
    conf_logits = None
    if drafter.cfg.markov_rank > 0:
        prev = jnp.concatenate([first[..., None], targets[..., :-1]], axis=-1)            # x_{a+k-1}
        bias, e = module.apply({"params": dparams}, prev.reshape(b * n, g), h.reshape(b * n, g, -1),
                               method="head_teacher_forced")
        q_logits = q_logits + bias.reshape(q_logits.shape)
        if drafter.cfg.has_confidence:
            conf_logits = module.apply({"params": dparams}, h.reshape(b * n, g, -1), e,
                                       method="confidence").reshape(b, n, g)
    elif drafter.cfg.has_confidence:
        conf_logits = module.apply({"params": dparams}, h, None, method="confidence")
    return q_logits, p_logits, targets, tvalid, conf_logits


def loss_fn(params, tparams, batch, key, *, drafter, tcfg, cfg):
    if cfg.drafter == "eagle3":
        from train import eagle3_objective

        return eagle3_objective.loss_fn(params, tparams, batch, key, drafter=drafter, tcfg=tcfg, cfg=cfg)
    dparams = jax.tree.map(lambda x: x.astype(drafter.cfg.arch.jnp_dtype), params)
    q, p, targets, tvalid, conf = block_forward(drafter, tcfg, dparams, tparams, batch, key, cfg.num_anchors)
    weights = objective.position_weights(targets.shape[-1], cfg.loss_decay)   # G, or G - 1 drafts (z-lab)
    out = objective.losses(q, p, targets, tvalid, weights, conf, ce_weight=cfg.ce_weight,
                           tv_weight=cfg.tv_weight, conf_weight=cfg.conf_weight, kind=drafter.kind)
    return out["loss"], out


def make_train_step(drafter, tcfg, cfg, tx):
    """A jitted `(state, tparams, batch) -> (state, metrics)`; state is donated."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: TrainState, tparams, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, tparams, batch, key, drafter=drafter, tcfg=tcfg, cfg=cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
