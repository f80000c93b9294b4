"""DeepSeek-V4 configuration: a frozen, hashable reading of transformers' `DeepseekV4Config`.

`DeepseekV4Config.from_hf` reads config.json as transformers 5.25 does, legacy fields
included and folded the way its `__post_init__` folds them:
- `compress_ratios` (per-layer 0 / 4 / 128) -> `layer_types` when no `layer_types`;
  without either, 2 HCA layers then CSA/HCA interleaved (V4-Pro);
- `compress_rate_csa` / `compress_rate_hca` override `compress_rates`;
- `num_hash_layers` -> the first n `mlp_layer_types` are `hash_moe` (default 3);
- `qk_rope_head_dim` -> `partial_rotary_factor = qk_rope_head_dim / head_dim`
  (default 64 / 512); the rotated slice is `int(head_dim * partial_rotary_factor)`;
- RoPE "main" (sliding layers: `rope_theta`, plain) and "compress" (compressed layers and
  their compressors: `compress_rope_theta`, YaRN when the top-level rope parameters say
  `rope_type: yarn`, with `attention_factor` forced to 1.0 as transformers does); an
  already nested `rope_parameters: {main, compress}` is taken as written.

Routing notes: transformers' routers renormalise the top-k weights whatever
`norm_topk_prob` says, and build one shared expert whatever `n_shared_experts` says; we
match the former (the field must be a bool) and refuse n_shared_experts != 1.
`scoring_func: softmax` (softmax over the experts, as DeepSeek's reference) is
implemented but unchecked against transformers, whose ACT2FN has no "softmax" and fails
to build such a model. Switches transformers reads but we do not model are refused in
one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dspark_jax.config import dtype_of
from dspark_jax.errors import DSparkError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH_MOE, MOE = "hash_moe", "moe"
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
SCORING = ("sqrtsoftplus", "softmax", "sigmoid")
_ROPE_TYPES = ("default", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """One of V4's two RoPEs over the trailing `dim` channels, interleaved pairs."""

    theta: float
    dim: int
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0   # multiplies cos and sin

    def inv_freq(self) -> np.ndarray:
        """[dim // 2] float32 inverse frequencies, as transformers' rope init computes them."""
        dim, base = self.dim, self.theta
        pos = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        if self.rope_type == "default":
            return (1.0 / pos).astype(np.float32)

        def corr(rot):
            return dim * math.log(self.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extra = (1 - ramp).astype(np.float32)
        inter, extrap = 1.0 / (np.float32(self.factor) * pos), 1.0 / pos
        return (inter * (1 - extra) + extrap * extra).astype(np.float32)


def _rope(d: dict, theta: float, dim: int, max_pos: int, path: str, label: str) -> RopeSpec:
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise DSparkError(f"{path}: rope_parameters.{label}.rope_type '{rope_type}' is not supported "
                          f"(only {', '.join(_ROPE_TYPES)})")
    theta = float(d.get("rope_theta", theta))
    if rope_type == "default":
        return RopeSpec(theta=theta, dim=dim)
    factor = d.get("factor")
    orig = d.get("original_max_position_embeddings")
    if orig is None:
        raise DSparkError(f"{path}: rope_parameters.{label} (yarn) needs original_max_position_embeddings")
    factor = float(factor) if factor is not None else max_pos / orig
    att = d.get("attention_factor")
    if att is None:
        ms, msa = d.get("mscale"), d.get("mscale_all_dim")

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        att = get_mscale(factor, ms) / get_mscale(factor, msa) if ms and msa else get_mscale(factor)
    return RopeSpec(theta=theta, dim=dim, rope_type="yarn", factor=factor, original_max_position_embeddings=int(orig),
                    beta_fast=float(d.get("beta_fast") or 32), beta_slow=float(d.get("beta_slow") or 1),
                    truncate=bool(d.get("truncate", True)), attention_factor=float(att))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekV4Config:
    """Shape and numerics of DeepseekV4ForCausalLM, every switch resolved."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    q_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    rope_dim: int
    main_rope: RopeSpec
    compress_rope: RopeSpec
    csa_rate: int = 4
    hca_rate: int = 128
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float | None = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 1048576
    dtype: str = "float32"

    @property
    def jnp_dtype(self):
        return dtype_of(self.dtype)

    def replace(self, **changes) -> "DeepseekV4Config":
        return dataclasses.replace(self, **changes)

    def rate(self, layer: int) -> int:
        """Compression rate m of a layer (0 for sliding-only layers)."""
        return {SLIDING: 0, CSA: self.csa_rate, HCA: self.hca_rate}[self.layer_types[layer]]

    def slot(self, layer: int) -> int:
        """Index of a compressed layer among the layers of its type (its cache row)."""
        kind = self.layer_types[layer]
        return sum(1 for t in self.layer_types[:layer] if t == kind)

    def count(self, kind: str) -> int:
        return sum(1 for t in self.layer_types if t == kind)

    @classmethod
    def from_hf(cls, hf: dict, path: str = "config.json", dtype: str | None = None) -> "DeepseekV4Config":
        if hf.get("model_type") != "deepseek_v4":
            raise DSparkError(f"{path}: model_type '{hf.get('model_type')}' is not deepseek_v4")
        g = hf.get
        n = int(g("num_hidden_layers", 43))
        for key, want in (("attention_bias", False), ("mlp_bias", False)):
            if bool(g(key, want)) != want:
                raise DSparkError(f"{path}: {key}={g(key)} is not supported (transformers' V4 layers have no biases)")
        if g("hidden_act", "silu") != "silu":
            raise DSparkError(f"{path}: hidden_act '{g('hidden_act')}' is not supported (only silu)")
        if g("scoring_func", "sqrtsoftplus") not in SCORING:
            raise DSparkError(f"{path}: scoring_func '{g('scoring_func')}' is not supported ({', '.join(SCORING)})")
        if int(g("num_key_value_heads", 1)) != 1:
            raise DSparkError(f"{path}: num_key_value_heads={g('num_key_value_heads')} is not supported "
                              f"(V4 attention has one shared K=V head)")
        if int(g("n_shared_experts", 1)) != 1:
            raise DSparkError(f"{path}: n_shared_experts={g('n_shared_experts')} is not supported "
                              f"(transformers builds exactly one shared expert)")
        if not isinstance(g("norm_topk_prob", True), bool):
            raise DSparkError(f"{path}: norm_topk_prob must be a bool")

        rates = dict(g("compress_rates") or {CSA: 4, HCA: 128})
        if g("compress_rate_csa") is not None:
            rates[CSA] = g("compress_rate_csa")
        if g("compress_rate_hca") is not None:
            rates[HCA] = g("compress_rate_hca")
        layer_types = g("layer_types")
        if layer_types is None and g("compress_ratios") is not None:
            bad = [r for r in g("compress_ratios") if r not in _RATIO_TO_TYPE]
            if bad:
                raise DSparkError(f"{path}: compress_ratios entries must be 0, 4 or 128; got {bad}")
            layer_types = [_RATIO_TO_TYPE[r] for r in g("compress_ratios")]
        if layer_types is None:
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        layer_types = tuple(layer_types[:n])
        mlp_types = g("mlp_layer_types")
        if mlp_types is None:
            n_hash = g("num_hash_layers", 3)
            mlp_types = [HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash)
        mlp_types = tuple(mlp_types[:n])
        for name, types, allowed in (("layer_types", layer_types, (SLIDING, CSA, HCA)),
                                     ("mlp_layer_types", mlp_types, (HASH_MOE, MOE))):
            if len(types) != n or any(t not in allowed for t in types):
                raise DSparkError(f"{path}: {name} must list {n} entries of {', '.join(allowed)}")

        head_dim = int(g("head_dim", 512))
        prf = g("partial_rotary_factor")
        if prf is None:
            prf = g("qk_rope_head_dim") / head_dim if g("qk_rope_head_dim") is not None else 64 / 512
        rope_dim = int(head_dim * prf)
        max_pos = int(g("max_position_embeddings", 1048576))
        rp = g("rope_parameters") or g("rope_scaling") or {}
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            main_d, comp_d = rp["main"], rp["compress"]
        else:
            main_d = {"rope_type": "default", "rope_theta": g("rope_theta", 10000.0)}
            comp_d = {k: v for k, v in rp.items() if k not in ("main", "compress", "rope_theta")}
            comp_d["rope_theta"] = g("compress_rope_theta", 160000.0)
            if comp_d.get("rope_type", comp_d.get("type", "default")) == "yarn":
                comp_d.setdefault("attention_factor", 1.0)
        for label, d in (("main", main_d), ("compress", comp_d)):
            if "partial_rotary_factor" in d and int(head_dim * d["partial_rotary_factor"]) != rope_dim:
                raise DSparkError(f"{path}: rope_parameters.{label}.partial_rotary_factor differs from the "
                                  f"model's; not supported")
        main = _rope(main_d, g("rope_theta", 10000.0), rope_dim, max_pos, path, "main")
        comp = _rope(comp_d, g("compress_rope_theta", 160000.0), rope_dim, max_pos, path, "compress")

        heads, o_groups = int(g("num_attention_heads", 64)), int(g("o_groups", 8))
        if heads % o_groups:
            raise DSparkError(f"{path}: num_attention_heads={heads} is not a multiple of o_groups={o_groups}")
        idx_dim = int(g("index_head_dim", 128))
        if rope_dim > idx_dim or rope_dim % 2:
            raise DSparkError(f"{path}: the rotated slice ({rope_dim}) must be even and fit index_head_dim={idx_dim}")
        limit = g("swiglu_limit", 10.0)
        return cls(
            vocab_size=int(g("vocab_size", 129280)), hidden_size=int(g("hidden_size", 4096)),
            num_hidden_layers=n, num_attention_heads=heads, head_dim=head_dim,
            q_lora_rank=int(g("q_lora_rank", 1024)), moe_intermediate_size=int(g("moe_intermediate_size", 2048)),
            n_routed_experts=int(g("n_routed_experts", 256)), num_experts_per_tok=int(g("num_experts_per_tok", 6)),
            layer_types=layer_types, mlp_layer_types=mlp_types, rope_dim=rope_dim, main_rope=main,
            compress_rope=comp, csa_rate=int(rates.get(CSA, 4)), hca_rate=int(rates.get(HCA, 128)),
            scoring_func=g("scoring_func", "sqrtsoftplus"),
            routed_scaling_factor=float(g("routed_scaling_factor", 1.5)),
            swiglu_limit=None if limit is None else float(limit), hc_mult=int(g("hc_mult", 4)),
            hc_sinkhorn_iters=int(g("hc_sinkhorn_iters", 20)), hc_eps=float(g("hc_eps", 1e-6)),
            sliding_window=int(g("sliding_window", 128)), o_groups=o_groups,
            o_lora_rank=int(g("o_lora_rank", 1024)), index_n_heads=int(g("index_n_heads", 64)),
            index_head_dim=idx_dim, index_topk=int(g("index_topk", 512)),
            rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(g("tie_word_embeddings", False)), max_position_embeddings=max_pos,
            dtype=dtype or _dtype_name(hf))


def _dtype_name(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "bfloat16" if name == "bfloat16" else "float32"
