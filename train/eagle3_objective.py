"""The Eagle3 training objective: training-time test (TTT) over `ttt_length` chained steps.

The frozen target runs inside the step and yields tapped features f_t and distributions
p_t for every position t. Every position is a chain start; all chains advance together:

- step 0 (causal over the sequence): position t reads (g_t = fc(f_t), x_{t+1}) at RoPE
  position t and predicts x_{t+2};
- step j >= 1: chain t reads the drafter's own step-(j-1) output h_{j-1,t} with the true
  token x_{t+j+1} at RoPE position t+j and predicts x_{t+j+2}. Its queries see the step-0
  keys at positions <= t plus the keys that steps 1..j made for the same chain (the
  diagonal "TTT mask"): exactly the cache `Eagle3Drafter.propose` sees after ingesting
  positions 0..t, with its drafts teacher-forced to the data.

Loss of step j at chain t: the soft cross-entropy -sum_v p(v) log q(v) against the
target's distribution at position t+j+1 (forward KL up to the target's entropy), weighted
by decay**j and by whether x_{t+j+2} is an answer token inside the sequence, normalised by
the weight sum. The drafter's embedding and LM head are the target's, frozen (DeepSpec's
Eagle3 trainer does the same); their copies in the parameter tree are never read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dspark_jax import target
from dspark_jax.attention import MASK_VALUE, attend, causal_mask
from dspark_jax.drafters.config import default_layer_ids
from dspark_jax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_eagle3_params


def build_drafter(cfg, tcfg) -> Eagle3Drafter:
    """The Eagle3 drafter a TrainConfig asks for (gamma = block_size): the target's decoder
    layer, or EAGLE-3's Llama midlayer shape when eagle3_layer resolves to llama."""
    from dspark_jax.drafters.eagle3_export import midlayer_arch
    from train.config import eagle3_layer

    arch = tcfg.replace(num_hidden_layers=cfg.draft_layers, dtype=cfg.compute_dtype,
                        intermediate_size=cfg.draft_intermediate_size or tcfg.intermediate_size,
                        tie_word_embeddings=False)
    if eagle3_layer(cfg) == "llama":
        arch = midlayer_arch(arch)
    layer_ids = tuple(cfg.target_layer_ids) or default_layer_ids(tcfg.num_hidden_layers)
    ecfg = Eagle3Config(arch=arch, target_layer_ids=layer_ids, ttt_length=cfg.ttt_length,
                        step_loss_decay=cfg.ttt_decay, block_size=cfg.block_size)
    return Eagle3Drafter(cfg=ecfg, tcfg=tcfg, gamma=cfg.block_size)


def init_params(drafter: Eagle3Drafter, rng: jax.Array):
    """Float32 master parameters (embed_tokens / lm_head included but unused: see
    `with_target_head`)."""
    arch = drafter.cfg.arch.replace(dtype="float32")
    f32 = dataclasses.replace(drafter, cfg=dataclasses.replace(drafter.cfg, arch=arch))
    return jax.jit(init_eagle3_params, static_argnums=0)(f32, rng)


def with_target_head(dparams, tparams, tcfg):
    """The drafter tree with the target's embedding table and LM head ([D, V] kernel; the
    transposed embedding for tied targets). Works on jax and numpy trees alike."""
    embed = tparams["embed_tokens"]["embedding"]
    kernel = embed.T if tcfg.tie_word_embeddings else tparams["lm_head"]["kernel"]
    return dict(dparams, embed_tokens={"embedding": embed}, lm_head={"kernel": kernel})


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """out[:, t] = x[:, t + k] ([B, L, ...]); positions past the end hold `fill`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, min(k, x.shape[1]))
    return jnp.pad(x[:, k:], pad, constant_values=fill)


def chain_attend(q, ctx_k, ctx_v, ctx_mask, own_k, own_v, *, scale: float):
    """Attention of TTT step j >= 1 (grouped-query, one softmax over both key sets).

    q [B,T,Hq,hd]; ctx_k/ctx_v [B,S,Hkv,hd] (step-0 keys) seen through ctx_mask [B,T,S];
    own_k/own_v [B,T,J,Hkv,hd]: the J keys of query t's own chain (steps 1..j), always seen.
    """
    b, t, hq, d = q.shape
    s, hkv = ctx_k.shape[1], ctx_k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s_ctx = jnp.einsum("btkgd,bskd->bkgts", qg, ctx_k, preferred_element_type=jnp.float32) * scale
    s_ctx = jnp.where(ctx_mask[:, None, None], s_ctx, MASK_VALUE)
    s_own = jnp.einsum("btkgd,btjkd->bkgtj", qg, own_k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_own], axis=-1), axis=-1)
    p_ctx = jnp.where(ctx_mask[:, None, None], probs[..., :s], 0.0).astype(ctx_v.dtype)
    p_own = probs[..., s:].astype(own_v.dtype)
    out = (jnp.einsum("bkgts,bskd->btkgd", p_ctx, ctx_v)
           + jnp.einsum("bkgtj,btjkd->btkgd", p_own, own_v))
    return out.reshape(b, t, hq, ctx_v.shape[-1])


def ttt_hidden(drafter: Eagle3Drafter, dparams, feats, input_ids, lengths, steps: int) -> list[jax.Array]:
    """Drafter output hidden states [B,L,D] (pre-norm) of TTT steps 0..steps-1.

    feats [B,L,m*D]: the target taps; input_ids [B,L]; lengths [B]. Entry j at t is the
    chain-start-t state that predicts x_{t+j+2}.
    """
    module = drafter.module
    variables = {"params": dparams}
    n_layers = drafter.cfg.arch.num_hidden_layers
    scale = drafter.cfg.arch.head_dim ** -0.5
    b, length = input_ids.shape
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    valid = pos < lengths[:, None]
    ctx_mask = causal_mask(pos, valid, pos, valid)
    ctx = [None] * n_layers                       # per layer: step-0 (k, v)
    own = [[] for _ in range(n_layers)]           # per layer: (k, v) of steps 1..j

    def step0_mix(i):
        def mix(q, k, v):
            ctx[i] = (k, v)
            return attend(q, k, v, ctx_mask, scale=scale)
        return mix

    def chain_mix(i):
        def mix(q, k, v):
            own[i].append((k, v))
            own_k = jnp.stack([kv[0] for kv in own[i]], axis=2)
            own_v = jnp.stack([kv[1] for kv in own[i]], axis=2)
            return chain_attend(q, *ctx[i], ctx_mask, own_k, own_v, scale=scale)
        return mix

    g = module.apply(variables, feats, method="project")
    hiddens = []
    for j in range(steps):
        mixes = [(step0_mix if j == 0 else chain_mix)(i) for i in range(n_layers)]
        g = module.apply(variables, g, shift_left(input_ids, j + 1), pos + j, mixes,
                         method="decode_mixed")
        hiddens.append(g)
    return hiddens


@functools.partial(jax.checkpoint, static_argnums=(0, 1))
def _step_sums(drafter, tcfg, head_params, tparams, h, p_hidden, targets, w):
    """Weighted sums of one TTT step: (soft CE, hard CE, KL, TV, acceptance). Both models'
    logits are recomputed in the backward pass: [B, L, V] per step is the largest
    activation of the objective."""
    logq = jax.nn.log_softmax(drafter.module.apply({"params": head_params}, h, method="logits"), axis=-1)
    logp = jax.nn.log_softmax(target.logits(tcfg, tparams, p_hidden).astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    soft = -jnp.sum(p * logq, axis=-1)
    hard = -jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(p * (logp - logq), axis=-1)
    tv = jnp.sum(jnp.abs(jnp.exp(logq) - p), axis=-1)  # ||q - p||_1 in [0, 2]
    return tuple(jnp.sum(w * x) for x in (soft, hard, kl, tv, 1.0 - tv / 2))


def ttt_losses(drafter: Eagle3Drafter, tcfg, dparams, tparams, feats, hidden, input_ids, loss_mask,
               lengths, *, steps: int, decay: float) -> dict:
    """Scalar losses and metrics. `hidden` [B,L,E]: the target's final (normed) hidden
    states, whose LM head gives p; `dparams` must already carry the target's head."""
    length = input_ids.shape[1]
    head_params = {k: dparams[k] for k in ("norm", "lm_head")}
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    hiddens = ttt_hidden(drafter, dparams, feats, input_ids, lengths, steps)
    totals = jnp.zeros(5, jnp.float32)
    denom = jnp.zeros((), jnp.float32)
    out = {}
    for j, h in enumerate(hiddens):
        ok = (pos + j + 2 < lengths[:, None]) & shift_left(loss_mask.astype(bool), j + 2, False)
        w = ok.astype(jnp.float32)
        sums = jnp.stack(_step_sums(drafter, tcfg, head_params, tparams, h,
                                    shift_left(hidden, j + 1), shift_left(input_ids, j + 2), w))
        totals = totals + decay ** j * sums
        denom = denom + decay ** j * jnp.sum(w)
        out[f"accept_rate_step{j}"] = sums[4] / jnp.maximum(jnp.sum(w), 1e-6)
    soft, hard, kl, tv, _ = totals / jnp.maximum(denom, 1e-6)
    out.update(loss=soft, ce=hard, kl=kl, tv=tv, accept_rate=out["accept_rate_step0"],
               weight=denom)
    return out


def loss_fn(params, tparams, batch, key, *, drafter: Eagle3Drafter, tcfg, cfg):
    """train.step.loss_fn for cfg.drafter == "eagle3" -> (loss, metrics)."""
    del key  # every position is a chain start: nothing is sampled
    dt = drafter.cfg.arch.jnp_dtype
    head = jax.lax.stop_gradient(with_target_head({}, tparams, tcfg))
    dparams = jax.tree.map(lambda x: x.astype(dt), dict(params, **head))
    ids, mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"]
    hidden, _, taps = target.forward(tcfg, tparams, ids, lengths, None, drafter.tap_layers)
    hidden = jax.lax.stop_gradient(hidden)
    feats = jax.lax.stop_gradient(jnp.concatenate(taps, axis=-1)).astype(dt)
    out = ttt_losses(drafter, tcfg, dparams, tparams, feats, hidden, ids, mask, lengths,
                     steps=cfg.ttt_length, decay=cfg.ttt_decay)
    return out["loss"], out
