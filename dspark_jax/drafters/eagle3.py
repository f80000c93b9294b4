"""The Eagle3 baseline: an autoregressive chain drafter (DeepSpec `Qwen3Eagle3Model` layout).

One step of the draft layer for position t reads a feature g_t [D] and the embedding of
token x_{t+1}:

    a = cat(input_layernorm(embed(x_{t+1})), hidden_norm(g_t))          # 2D wide
    h = g_t + o_proj(attn(q/k/v_proj(a)))      (RoPE position t, causal over own cache)
    h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                  -> predict x_{t+2}

For context positions g_t = fc(concatenated target taps at t); for drafted positions g_t is
the drafter's own previous output h (pre-norm). With several draft layers, layer i+1 takes
layer i's output as its g (the token embedding is shared). DeepSpec Eagle3 checkpoints may
lack `self_attn.{q,k}_norm.weight`; those then load as ones (an identity scale). A folder
whose config says `model_type: llama` (written for a Llama 3 target, or with
eagle3_layer=llama) has Llama-shaped draft layers: no q/k norms, the config's RoPE.

The Gemma 4 Eagle3 drafter (gemma4_eagle3.py) reuses the module and the drafter through
their hooks: `make_layer` / `make_norm` / `attention_scale` on the module, and `decode` /
`logits` on the drafter (there: the target's embedding and LM head).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from dspark_jax import checkpoints
from dspark_jax.attention import attend, causal_mask
from dspark_jax.config import Qwen3Config
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.errors import DSparkError
from dspark_jax.kv_cache import KVCache, write_index, write_layer
from dspark_jax.models.layers import MLP, Proj, RMSNorm, embedding
from dspark_jax.models.qwen3 import attention_module
from dspark_jax.safetensors_io import open_folder
from dspark_jax.sampling import argmax, sample_rows, warp

ARCHITECTURE = "Qwen3Eagle3Model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eagle3Config:
    """`arch`: the draft layers' shapes (num_hidden_layers = draft layers)."""

    arch: Qwen3Config
    target_layer_ids: tuple[int, ...]
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    block_size: int = 7  # the default gamma

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        if not self.target_layer_ids:
            raise DSparkError("target_layer_ids must name at least one target layer")
        for name in ("ttt_length", "block_size"):
            if getattr(self, name) < 1:
                raise DSparkError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.arch.num_hidden_layers < 1:
            raise DSparkError(f"num_hidden_layers must be >= 1; got {self.arch.num_hidden_layers}")

    @classmethod
    def from_hf(cls, hf: dict, path: str = "config.json", dtype: str | None = None) -> "Eagle3Config":
        """From a DeepSpec Eagle3 config.json dict (the target's Qwen3 config plus Eagle3 fields)."""
        if ARCHITECTURE not in (hf.get("architectures") or []):
            raise DSparkError(f"{path}: architectures {hf.get('architectures')} is not "
                              f"['{ARCHITECTURE}'] (not an Eagle3 drafter)")
        if "target_layer_ids" not in hf:
            raise DSparkError(f"{path}: missing field target_layer_ids")
        if hf.get("model_type") == "llama":   # Llama-shaped draft layers (a Llama target's, or eagle3_layer=llama)
            arch = LlamaConfig.from_hf(hf, path, dtype).replace(tie_word_embeddings=False)
        else:
            arch = checkpoints.qwen3_config(hf, path, dtype).replace(tie_word_embeddings=False)
        ttt = int(hf.get("ttt_length", 7))
        return cls(arch=arch, target_layer_ids=tuple(hf["target_layer_ids"]), ttt_length=ttt,
                   step_loss_decay=float(hf.get("step_loss_decay", 0.8)),
                   block_size=int(hf.get("block_size", ttt)))


def check_fits_target(cfg: Eagle3Config, tcfg: Qwen3Config, gamma: int, where: str) -> None:
    """One-line DSparkError when the drafter cannot serve this target with this gamma."""
    arch = cfg.arch
    for field in ("vocab_size", "hidden_size"):
        if getattr(arch, field) != getattr(tcfg, field):
            raise DSparkError(f"{where}: drafter {field} {getattr(arch, field)} does not match the "
                              f"target's {getattr(tcfg, field)}")
    last_ok = tcfg.num_hidden_layers - 2  # the final target layer is not allowed
    if any(not -1 <= i <= last_ok for i in cfg.target_layer_ids):
        raise DSparkError(f"{where}: target_layer_ids {list(cfg.target_layer_ids)} do not fit a "
                          f"{tcfg.num_hidden_layers}-layer target (allowed -1..{last_ok})")
    if gamma < 1:
        raise DSparkError(f"{where}: gamma must be >= 1; got {gamma}")
    if gamma > cfg.block_size:
        raise DSparkError(f"{where}: gamma {gamma} exceeds the drafter's block size {cfg.block_size}")


class Eagle3Layer(nn.Module):
    arch: Qwen3Config

    def setup(self):
        a, dt = self.arch, self.arch.jnp_dtype
        self.hidden_norm = RMSNorm(a.rms_norm_eps, dt)
        self.input_layernorm = RMSNorm(a.rms_norm_eps, dt)
        self.self_attn = attention_module(a)
        self.post_attention_layernorm = RMSNorm(a.rms_norm_eps, dt)
        self.mlp = MLP(a.hidden_size, a.intermediate_size, dt)

    def __call__(self, emb, g, positions, mix):
        """emb, g: [B, T, D]; `mix(q, k, v) -> o` decides which keys are seen."""
        x = jnp.concatenate([self.input_layernorm(emb), self.hidden_norm(g)], axis=-1)
        h = g + self.self_attn.out(mix(*self.self_attn.qkv(x, positions)))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Module(nn.Module):
    """Parameter names mirror the DeepSpec checkpoint (see the module docstring)."""

    cfg: Eagle3Config

    def setup(self):
        a, dt = self.cfg.arch, self.cfg.arch.jnp_dtype
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size, dt, "embed_tokens")
        self.fc = Proj((a.hidden_size,), ("mlp", "embed"), dtype=dt)
        self.layers = [self.make_layer(i) for i in range(a.num_hidden_layers)]
        self.norm = self.make_norm()
        self.lm_head = Proj((a.vocab_size,), ("embed", "vocab"), dtype=dt)

    # Architecture hooks: a drafter for another target family overrides these three.
    def make_layer(self, i: int) -> nn.Module:
        return Eagle3Layer(self.cfg.arch, name=f"layers_{i}")

    def make_norm(self) -> nn.Module:
        return RMSNorm(self.cfg.arch.rms_norm_eps, self.cfg.arch.jnp_dtype)

    def attention_scale(self) -> float:
        return self.cfg.arch.head_dim ** -0.5

    def __call__(self, feats, tokens, q_lens):
        """Uncached forward over context positions 0..T-1 -> (hidden [B,T,D], logits [B,T,V])."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = positions < q_lens[:, None]
        h, _ = self.decode(self.project(feats), tokens, positions, valid)
        return h, self.logits(h)

    def project(self, feats):
        """Concatenated target taps [..., m*D] -> features [..., D]."""
        return self.fc(feats)

    def decode(self, g, tokens, positions, valid, kv: KVCache | None = None):
        """Features g [B,T,D] with tokens [B,T] (x_{t+1} beside g_t) at `positions` [B,T].

        Without `kv`: causal over these T slots. With `kv`: valid slots' K/V are written at
        their positions and every query attends to cache rows <= its position (kv.lengths
        is left to the caller). Returns (output hidden [B,T,D] pre-norm, kv).
        """
        return self.decode_embedded(g, self.embed_tokens(tokens), positions, valid, kv)

    def decode_embedded(self, g, emb, positions, valid, kv: KVCache | None = None):
        """`decode` with the token embeddings emb [B,T,D] given (a drafter that reads
        its target's embedding computes them outside)."""
        b = emb.shape[0]
        scale = self.attention_scale()
        if kv is None:
            mask = causal_mask(positions, valid, positions, valid)
        else:
            slots = jnp.broadcast_to(jnp.arange(kv.max_len, dtype=jnp.int32), (b, kv.max_len))
            mask = causal_mask(positions, valid, slots, jnp.ones(slots.shape, bool))
            index = write_index(positions, valid, kv.max_len)
        h = g.astype(emb.dtype)
        for i, layer in enumerate(self.layers):
            if kv is None:
                def mix(q, k, v):
                    return attend(q, k, v, mask, scale=scale)
            else:
                def mix(q, k, v, i=i):
                    nonlocal kv
                    kv = kv.replace(k=write_layer(kv.k, i, k, index), v=write_layer(kv.v, i, v, index))
                    return attend(q, kv.k[i], kv.v[i], mask, scale=scale)
            h = layer(emb, h, positions, mix)
        return h, kv

    def logits(self, h):
        """[..., D] pre-norm hidden -> [..., V] float32."""
        return self.lm_head(self.norm(h)).astype(jnp.float32)

    def decode_mixed(self, g, tokens, positions, mixes):
        """`decode` with the attention left to the caller: layer i calls `mixes[i](q, k, v)`
        with its rotated queries and new keys/values [B,T,H,hd] and gets the attention
        output back (training-time test builds its diagonal mask this way).
        Returns the output hidden [B,T,D] pre-norm."""
        emb = self.embed_tokens(tokens)
        h = g.astype(emb.dtype)
        for layer, mix in zip(self.layers, mixes, strict=True):
            h = layer(emb, h, positions, mix)
        return h


@struct.dataclass
class Eagle3Cache:
    kv: KVCache
    last_hidden: jax.Array  # [B, D]: output hidden of the last ingested position


def _dummy_inputs(cfg: Eagle3Config):
    m = len(cfg.target_layer_ids) * cfg.arch.hidden_size
    return (jnp.zeros((1, 1, m), cfg.arch.jnp_dtype), jnp.zeros((1, 1), jnp.int32),
            jnp.ones((1,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Eagle3Drafter:
    """The drafter interface of dspark_jax/speculate.py (static, hashable, no arrays)."""

    cfg: Eagle3Config
    tcfg: Qwen3Config
    gamma: int

    def __post_init__(self):
        check_fits_target(self.cfg, self.tcfg, self.gamma, "eagle3 drafter")

    @property
    def module(self) -> Eagle3Module:
        return Eagle3Module(self.cfg)

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.cfg.target_layer_ids

    def param_shapes_and_axes(self):
        return checkpoints.param_template(self.module, *_dummy_inputs(self.cfg))

    def init_cache(self, batch: int, max_len: int) -> Eagle3Cache:
        a = self.cfg.arch
        kv = KVCache.init(num_layers=a.num_hidden_layers, batch=batch, max_len=max_len,
                          kv_heads=a.num_key_value_heads, head_dim=a.head_dim, dtype=a.jnp_dtype)
        return Eagle3Cache(kv=kv, last_hidden=jnp.zeros((batch, a.hidden_size), a.jnp_dtype))

    # Run-time hooks: a drafter that reads its target's embedding and LM head overrides these.
    def decode(self, dparams, tparams, g, tokens, positions, valid, kv: KVCache):
        """The module's cached `decode` (this drafter carries its own embedding)."""
        del tparams
        return self.module.apply({"params": dparams}, g, tokens, positions, valid, kv, method="decode")

    def logits(self, dparams, tparams, h):
        """Pre-norm hidden [..., D] -> draft logits [..., V] float32."""
        del tparams
        return self.module.apply({"params": dparams}, h, method="logits")

    def ingest(self, dparams, tparams, dcache: Eagle3Cache, feats, next_tokens, start, count):
        b, t = next_tokens.shape
        steps = jnp.arange(t, dtype=jnp.int32)
        positions = start[:, None] + steps[None, :]
        valid = steps[None, :] < count[:, None]
        g = self.module.apply({"params": dparams}, feats, method="project")
        h, kv = self.decode(dparams, tparams, g, next_tokens, positions, valid, dcache.kv)
        last = jnp.take_along_axis(h, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
        last = jnp.where((count > 0)[:, None], last.astype(dcache.last_hidden.dtype),
                         dcache.last_hidden)
        kv = kv.replace(lengths=(start + count).astype(jnp.int32))
        return Eagle3Cache(kv=kv, last_hidden=last)

    def propose(self, dparams, tparams, dcache: Eagle3Cache, anchor, start, sampling, keys):
        """Chain drafting: x_1 from last_hidden, then one layer pass per further token at
        positions start, start+1, ... on a local copy of the cache (discarded)."""
        del anchor  # the anchor was ingested as the last slot's next token
        g_len = self.gamma
        b = start.shape[0]
        step_keys = None if sampling.greedy else jax.vmap(lambda k: jax.random.split(k, g_len))(keys)  # [B, G]

        def draw(h, j):
            logits = self.logits(dparams, tparams, h)
            if sampling.greedy:  # static: argmax drafts, q is not built (greedy acceptance never reads it)
                return argmax(logits), jnp.zeros((b, 1), jnp.float32)
            probs = warp(logits, sampling)
            return sample_rows(step_keys[:, j], probs), probs

        x1, q1 = draw(dcache.last_hidden, 0)

        def body(carry, j):
            kv, h, x = carry
            pos = (start + j - 1)[:, None]
            h, kv = self.decode(dparams, tparams, h[:, None], x[:, None], pos, jnp.ones((b, 1), bool), kv)
            h = h[:, 0].astype(dcache.last_hidden.dtype)
            x, q = draw(h, j)
            return (kv, h, x), (x, q)

        drafts, qs = [x1[:, None]], [q1[:, None]]
        if g_len > 1:
            _, (xs, ps) = jax.lax.scan(body, (dcache.kv, dcache.last_hidden, x1),
                                       jnp.arange(1, g_len))
            drafts.append(jnp.moveaxis(xs, 0, 1))
            qs.append(jnp.moveaxis(ps, 0, 1))
        draft = jnp.concatenate(drafts, axis=1).astype(jnp.int32)
        q = jnp.concatenate(qs, axis=1).astype(jnp.float32)
        return draft, q, jnp.zeros((b, g_len), jnp.float32)

    @property
    def kind(self) -> str:
        return "eagle3"

    def shard(self, dparams, mesh, rules=None):
        from dspark_jax import mesh as mesh_lib

        _, axes = self.param_shapes_and_axes()
        return mesh_lib.shard_tree(dparams, axes, mesh, rules or mesh_lib.SERVING_RULES)


def init_eagle3_params(drafter: Eagle3Drafter, rng: jax.Array):
    """Random (unboxed) parameters."""
    return checkpoints.init_module_params(drafter.module, rng, *_dummy_inputs(drafter.cfg))


def _rename(path: tuple[str, ...]) -> str:
    """`layers_0/self_attn/q_proj/kernel` -> `layers.0.self_attn.q_proj.weight` (no prefix)."""
    return checkpoints.tensor_name(path, prefix="")


def _is_qk_norm(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] in ("q_norm", "k_norm")


def load_eagle3(folder: str, tcfg: Qwen3Config, gamma: int | None = None, dtype: str | None = None):
    """(Eagle3Drafter, params) from a DeepSpec Eagle3 folder, checked against the target."""
    hf = checkpoints.read_config(folder)
    path = os.path.join(folder, "config.json")
    cfg = Eagle3Config.from_hf(hf, path, dtype)
    gamma = cfg.block_size if gamma is None else int(gamma)
    check_fits_target(cfg, tcfg, gamma, path)
    drafter = Eagle3Drafter(cfg=cfg, tcfg=tcfg, gamma=gamma)
    template, _ = drafter.param_shapes_and_axes()
    index = open_folder(folder)
    flat = traverse_util.flatten_dict(template)
    absent = {p for p in flat if _is_qk_norm(p) and _rename(p) not in index}
    present = traverse_util.unflatten_dict({p: s for p, s in flat.items() if p not in absent})
    params = traverse_util.flatten_dict(checkpoints.load_tree(
        index, present, dtype=cfg.arch.jnp_dtype, rename=_rename, folder=folder))
    for p in absent:  # identity scale for checkpoints trained without q/k norms
        params[p] = np.ones(flat[p].shape, cfg.arch.jnp_dtype)
    return drafter, traverse_util.unflatten_dict(params)


def save_eagle3(folder: str, drafter_or_cfg, params, target_hf_config: dict) -> None:
    """Write config.json (the target's config plus the Eagle3 fields) and model.safetensors."""
    cfg = drafter_or_cfg.cfg if isinstance(drafter_or_cfg, Eagle3Drafter) else drafter_or_cfg
    a = cfg.arch
    hf = dict(target_hf_config)
    num_target = hf.get("num_hidden_layers")
    hf.setdefault("model_type", "qwen3")
    hf.update(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
              intermediate_size=a.intermediate_size, num_attention_heads=a.num_attention_heads,
              num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
              rms_norm_eps=a.rms_norm_eps, attention_bias=a.attention_bias, dtype=a.dtype)
    if "torch_dtype" in hf:
        hf["torch_dtype"] = a.dtype
    if "layer_types" in hf:
        hf["layer_types"] = ["full_attention"] * a.num_hidden_layers
    if isinstance(a, LlamaConfig):   # read back as Llama layers (no q/k norms), with their own RoPE
        hf.pop("rope_parameters", None)
        hf.update(model_type="llama", rope_theta=a.rope_theta, rope_scaling=a.to_hf()["rope_scaling"],
                  max_position_embeddings=a.max_position_embeddings)
    elif isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"] = dict(hf["rope_parameters"], rope_theta=a.rope_theta)
    else:
        hf["rope_theta"] = a.rope_theta
    hf.update(architectures=[ARCHITECTURE], num_hidden_layers=a.num_hidden_layers,
              num_target_layers=num_target, target_layer_ids=list(cfg.target_layer_ids),
              ttt_length=cfg.ttt_length, step_loss_decay=cfg.step_loss_decay,
              block_size=cfg.block_size, tie_word_embeddings=False)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    checkpoints.save_tensors(checkpoints.to_tensors(params, rename=_rename), folder)
