"""The Eagle3 chain drafter on a Gemma 4 target (DeepSpec `Gemma4Eagle3Model` layout).

eagle3.py's module and drafter (ingest, chain drafting, cache) through their hooks; only
the layers, the norms, the attention scale, the embedding and the logits change:

- every draft layer has the shape of the target's full-attention decoder layer
  (models/gemma4.py `DecoderLayer`; PLE / MoE / KV sharing switched off, as for the
  Gemma 4 block drafters), read the Eagle3 way, with g the feature and e the embedding:

      x = cat(input_layernorm(e), hidden_norm(g))                           # 2D wide
      h = g + post_attention_layernorm(o_proj(attn(q/k/v_proj(x))))
      h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
      out = h * layer_scalar

  with q/k norms and the scale-free v norm, the full layers' head size, KV heads, K = V
  switch and (proportional) RoPE, and attention scale 1 (q and k are RMS-normed);
- hidden_norm, the layer norms and the final `norm` are Gemma 4's `x * weight` RMSNorm;
- token embeddings are the target's `embed()` (times sqrt(d), rounded as the target
  does) and logits the target's `logits()` of norm(h) (its LM head or tied embedding,
  soft-capped): the drafter holds neither table. DeepSpec's Eagle3 trainer keeps both
  frozen at the target's, so the copies in a folder are written on export and not read.

Folder layout: config.json is the target's Gemma 4 text config copied (a top-level
`gemma4` config is flattened to its text_config) with `architectures:
["Gemma4Eagle3Model"]`, `num_hidden_layers` = draft layers, `num_target_layers`,
`target_layer_ids`, `ttt_length`, `step_loss_decay` and `block_size`. Tensors: the Qwen3
Eagle3 names (`fc`, `layers.{i}.{hidden_norm,input_layernorm,post_attention_layernorm}`,
`layers.{i}.self_attn.{q,k,v,o}_proj` with 2D-wide q/k/v inputs, `layers.{i}.mlp.*`,
`norm`, `embed_tokens`, `lm_head`) plus the Gemma layer's `pre_feedforward_layernorm`,
`post_feedforward_layernorm`, `self_attn.{q,k}_norm` and `layers.{i}.layer_scalar`
(loaded as ones when absent).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from dspark_jax import checkpoints, target
from dspark_jax.drafters.eagle3 import Eagle3Cache, Eagle3Config, Eagle3Drafter, Eagle3Module, check_fits_target
from dspark_jax.drafters.folders import save_block_drafter
from dspark_jax.drafters.gemma4_drafter import (EAGLE3_ARCHITECTURE as ARCHITECTURE, check_target, draft_arch,
                                                load_params, parse_draft_arch, text_config)
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache
from dspark_jax.models.gemma4 import DecoderLayer
from dspark_jax.models.gemma4_layers import RMSNorm


def new_config(tcfg, *, num_layers: int, target_layer_ids, **fields) -> Eagle3Config:
    """An Eagle3Config for a fresh Gemma 4 Eagle3 drafter of target `tcfg` (fields:
    Eagle3Config's ttt_length, step_loss_decay, block_size)."""
    check_target(tcfg, "gemma4 eagle3 drafter")
    return Eagle3Config(arch=draft_arch(tcfg, num_layers), target_layer_ids=tuple(target_layer_ids), **fields)


def eagle3_config(hf: dict, path: str, dtype: str | None = None) -> Eagle3Config:
    """Eagle3Config of a Gemma4Eagle3Model folder's config.json (one-line DSparkError if bad)."""
    text = text_config(hf)
    if ARCHITECTURE not in (hf.get("architectures") or []):
        raise DSparkError(f"{path}: architectures {hf.get('architectures')} is not ['{ARCHITECTURE}'] "
                          "(not a Gemma 4 Eagle3 drafter)")
    for key in ("num_hidden_layers", "target_layer_ids"):
        if key not in text:
            raise DSparkError(f"{path}: missing field {key}")
    try:
        ttt = int(text.get("ttt_length", 7))
        return Eagle3Config(arch=parse_draft_arch(text, path, dtype),
                            target_layer_ids=tuple(int(i) for i in text["target_layer_ids"]),
                            ttt_length=ttt, step_loss_decay=float(text.get("step_loss_decay", 0.8)),
                            block_size=int(text.get("block_size", ttt)))
    except (TypeError, ValueError) as e:
        raise DSparkError(f"{path}: a field has the wrong type ({e})") from None
    except DSparkError as e:
        msg = str(e)
        raise DSparkError(msg if msg.startswith(path) else f"{path}: {msg}") from None


# ------------------------------------------------------------------------------ modules

class Gemma4Eagle3Layer(DecoderLayer):
    """A Gemma 4 decoder layer (full attention) with Eagle3's 2D-wide q/k/v input."""

    def setup(self):
        super().setup()
        self.hidden_norm = RMSNorm(self.cfg.rms_norm_eps, self.cfg.jnp_dtype)

    def __call__(self, emb, g, positions, mix):
        """emb, g: [B, T, D]; `mix(q, k, v) -> o` decides which keys are seen."""
        x = jnp.concatenate([self.input_layernorm(emb), self.hidden_norm(g)], axis=-1)
        attn = self.self_attn
        o = mix(attn.q(x, positions), *attn.kv(x, positions))
        h = g + self.post_attention_layernorm(attn.out(o))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class Gemma4Eagle3Module(Eagle3Module):
    """Eagle3Module with Gemma 4 layers and norms. The base setup's `embed_tokens` and
    `lm_head` are never called here, so they get no parameters: the target's are read."""

    def make_layer(self, i: int):
        return Gemma4Eagle3Layer(self.cfg.arch, i, name=f"layers_{i}")

    def make_norm(self):
        return RMSNorm(self.cfg.arch.rms_norm_eps, self.cfg.arch.jnp_dtype)

    def attention_scale(self) -> float:
        return 1.0  # q and k are RMS-normed

    def final_norm(self, h):
        return self.norm(h)

    def __call__(self, feats, tokens, q_lens):
        """Touches every parameter once (used by init only) -> final-normed hidden [B,T,D]."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        emb = jnp.zeros((b, t, self.cfg.arch.hidden_size), self.cfg.arch.jnp_dtype)
        h, _ = self.decode_embedded(self.project(feats), emb, positions, positions < q_lens[:, None])
        return self.final_norm(h)


@dataclasses.dataclass(frozen=True)
class Gemma4Eagle3Drafter(Eagle3Drafter):
    """The Eagle3 drafter of eagle3.py on a Gemma 4 target (static and hashable)."""

    def __post_init__(self):
        check_target(self.tcfg, "gemma4 eagle3 drafter")
        super().__post_init__()

    @property
    def module(self) -> Gemma4Eagle3Module:
        return Gemma4Eagle3Module(self.cfg)

    def init_cache(self, batch: int, max_len: int) -> Eagle3Cache:
        a = self.cfg.arch  # every draft layer is a full-attention layer
        kv = KVCache.init(num_layers=a.num_hidden_layers, batch=batch, max_len=max_len,
                          kv_heads=a.global_kv_heads, head_dim=a.global_head_dim, dtype=a.jnp_dtype)
        return Eagle3Cache(kv=kv, last_hidden=jnp.zeros((batch, a.hidden_size), a.jnp_dtype))

    def decode(self, dparams, tparams, g, tokens, positions, valid, kv: KVCache):
        """The module's cached decode on the target's (sqrt(d)-scaled) token embeddings."""
        emb = target.embed(self.tcfg, tparams, tokens).astype(self.cfg.arch.jnp_dtype)
        return self.module.apply({"params": dparams}, g, emb, positions, valid, kv, method="decode_embedded")

    def logits(self, dparams, tparams, h):
        """The target's (soft-capped) logits of the drafter's final norm of h."""
        return target.logits(self.tcfg, tparams, self.module.apply({"params": dparams}, h, method="final_norm"))


# ------------------------------------------------------------------------ folders in/out

def load_gemma4_eagle3(folder: str, tcfg, *, gamma: int | None = None, dtype: str | None = None,
                       hf: dict | None = None):
    """(Gemma4Eagle3Drafter, params) from a Gemma4Eagle3Model folder, checked against the target."""
    hf = checkpoints.read_config(folder) if hf is None else hf
    path = os.path.join(folder, "config.json")
    check_target(tcfg, folder)
    cfg = eagle3_config(hf, path, dtype or tcfg.dtype)
    n_target = text_config(hf).get("num_target_layers")
    if n_target and int(n_target) != tcfg.num_hidden_layers:
        raise DSparkError(f"{path}: drafter was trained for a {n_target}-layer target; this target has "
                          f"{tcfg.num_hidden_layers} layers")
    gamma = cfg.block_size if gamma is None else int(gamma)
    check_fits_target(cfg, tcfg, gamma, path)
    drafter = Gemma4Eagle3Drafter(cfg=cfg, tcfg=tcfg, gamma=gamma)
    return drafter, load_params(folder, drafter.param_shapes_and_axes()[0], cfg.arch.jnp_dtype)


def drafter_hf_config(target_hf: dict, cfg: Eagle3Config, num_target_layers: int) -> dict:
    """config.json of a Gemma 4 Eagle3 drafter: the target's text config plus the Eagle3 fields."""
    hf = text_config(target_hf)
    hf.update(architectures=[ARCHITECTURE], num_hidden_layers=cfg.arch.num_hidden_layers,
              num_target_layers=num_target_layers, target_layer_ids=list(cfg.target_layer_ids),
              ttt_length=cfg.ttt_length, step_loss_decay=cfg.step_loss_decay, block_size=cfg.block_size,
              tie_word_embeddings=False)
    return hf


def save_gemma4_eagle3(folder: str, drafter: Gemma4Eagle3Drafter, params, target_hf: dict, tparams) -> None:
    """Export in the DeepSpec layout, with copies of the target's embedding and LM head."""
    save_block_drafter(folder, drafter, params, target_hf, tparams,
                       hf=drafter_hf_config(target_hf, drafter.cfg, drafter.tcfg.num_hidden_layers))
