"""Gemma 4 text decoder configuration, its reader for Hugging Face config.json, and presets.

`Gemma4Config` is frozen, keyword-only and hashable (a `jax.jit` static argument). It
stores what transformers' `Gemma4TextConfig` can switch on, already resolved: per layer
type (sliding / full attention) the head size, the number of KV heads and the RoPE; the
KV-sharing, MoE, double-wide MLP and per-layer-input (PLE) switches.

`from_hf` reads `model_type: gemma4_text` and the top-level `gemma4` layout (whose
`text_config` holds the decoder), plus their `gemma4_unified` spellings (Gemma 4 12B).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dspark_jax.config import dtype_of
from dspark_jax.errors import DSparkError

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT_TYPES = ("gemma4_text", "gemma4_unified_text")
TOP_LEVEL_TYPES = ("gemma4", "gemma4_unified")
MODEL_TYPES = TOP_LEVEL_TYPES + TEXT_TYPES
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "silu")
ROPE_TYPES = ("default", "proportional")
# per_layer_config keys we can honour (anything else changes the layer in ways we do not model)
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """RoPE of one layer type, as transformers computes it (rotate-half over the whole head)."""

    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0  # proportional only: share of the head that rotates
    factor: float = 1.0                 # proportional only: frequencies divided by it

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """[head_dim // 2] float32 inverse frequencies; zeros leave their pair unrotated."""
        if self.rope_type == "default":  # transformers ignores partial_rotary_factor here
            return (1.0 / (np.float32(self.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                      / np.float32(head_dim)))).astype(np.float32)
        # "proportional": the first rope_angles pairs rotate with exponents over the FULL
        # head size, the remaining pairs get frequency 0.
        angles = int(self.partial_rotary_factor * head_dim // 2)
        rotated = 1.0 / (np.float32(self.theta) ** (np.arange(0, 2 * angles, 2, dtype=np.float32)
                                                    / np.float32(head_dim)))
        inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)])
        return (inv / np.float32(self.factor)).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Config:
    """Shape and numerics of a Gemma 4 text decoder (Gemma4ForCausalLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    # sliding-window layers
    num_key_value_heads: int
    head_dim: int
    sliding_window: int = 512
    sliding_rope: RopeSpec = RopeSpec()
    # full-attention layers (already resolved: transformers only applies
    # num_global_key_value_heads when attention_k_eq_v is set)
    global_head_dim: int = 512
    global_kv_heads: int = 4
    full_rope: RopeSpec = RopeSpec(rope_type="proportional", theta=1_000_000.0,
                                   partial_rotary_factor=0.25)
    attention_k_eq_v: bool = False      # full layers: no v_proj, V = v_norm(k_proj(x))
    attention_bias: bool = False
    num_kv_shared_layers: int = 0       # the last N layers reuse earlier layers' K/V
    use_double_wide_mlp: bool = False   # KV-shared layers get 2 x intermediate_size
    hidden_size_per_layer_input: int = 0  # PLE width (0 = no per-layer inputs)
    vocab_size_per_layer_input: int = 0
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
    dtype: str = "float32"

    def __post_init__(self):
        n = self.num_hidden_layers
        if len(self.layer_types) != n or any(t not in (SLIDING, FULL) for t in self.layer_types):
            raise DSparkError(f"layer_types must list {n} entries of '{SLIDING}' / '{FULL}'; "
                              f"got {list(self.layer_types)}")
        for what, kv in (("num_key_value_heads", self.num_key_value_heads),
                         ("the full-attention KV head count", self.global_kv_heads)):
            if kv < 1 or self.num_attention_heads % kv:
                raise DSparkError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                                  f"multiple of {what} ({kv})")
        if self.hidden_activation not in ACTIVATIONS:
            raise DSparkError(f"hidden_activation '{self.hidden_activation}' is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        for rope in (self.sliding_rope, self.full_rope):
            if rope.rope_type not in ROPE_TYPES:
                raise DSparkError(f"rope_type '{rope.rope_type}' is not supported for gemma4 "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
        if not 0 <= self.num_kv_shared_layers < n:
            raise DSparkError(f"num_kv_shared_layers ({self.num_kv_shared_layers}) must be in [0, {n})")
        producers = set(self.layer_types[:n - self.num_kv_shared_layers])
        if self.num_kv_shared_layers and producers != set(self.layer_types):
            raise DSparkError("every attention type of the KV-shared layers needs an earlier "
                              "layer of that type producing K/V")
        if self.enable_moe_block and not (self.num_experts > 0 and 0 < self.top_k_experts <= self.num_experts
                                          and self.moe_intermediate_size > 0):
            raise DSparkError(f"enable_moe_block needs num_experts > 0, 0 < top_k_experts <= num_experts "
                              f"and moe_intermediate_size > 0 (got {self.num_experts}, "
                              f"{self.top_k_experts}, {self.moe_intermediate_size})")
        if self.sliding_window < 1:
            raise DSparkError(f"sliding_window must be positive; got {self.sliding_window}")
        dtype_of(self.dtype)

    # ------------------------------------------------------------------ per-layer view
    @property
    def jnp_dtype(self):
        return dtype_of(self.dtype)

    def replace(self, **changes) -> "Gemma4Config":
        return dataclasses.replace(self, **changes)

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def layer_head_dim(self, i: int) -> int:
        return self.head_dim if self.is_sliding(i) else self.global_head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_key_value_heads if self.is_sliding(i) else self.global_kv_heads

    def layer_rope(self, i: int) -> RopeSpec:
        return self.sliding_rope if self.is_sliding(i) else self.full_rope

    def k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(i)

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_shared(self, i: int) -> bool:
        return i >= self.first_shared_layer

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends to: itself, or for a KV-shared layer the
        last non-shared layer of the same type (transformers' 'store' layer)."""
        if not self.is_kv_shared(i):
            return i
        t = self.layer_types[i]
        return max(j for j in range(self.first_shared_layer) if self.layer_types[j] == t)

    def cache_slot(self, i: int) -> int:
        """Index of layer i's K/V among the cached layers of its type (its source's slot)."""
        src = self.kv_source(i)
        t = self.layer_types[src]
        return sum(1 for j in range(src) if self.layer_types[j] == t)

    def num_cached(self, layer_type: str) -> int:
        return sum(1 for j in range(self.first_shared_layer) if self.layer_types[j] == layer_type)

    def mlp_width(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(i)
        return self.intermediate_size * (2 if wide else 1)

    @property
    def ple_vocab(self) -> int:
        return self.vocab_size_per_layer_input or self.vocab_size

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied; layer_scalar included)."""
        d, v, hq = self.hidden_size, self.vocab_size, self.num_attention_heads
        p, n = self.hidden_size_per_layer_input, self.num_hidden_layers
        total = v * d + d + (0 if self.tie_word_embeddings else v * d)
        if p:
            total += self.ple_vocab * n * p + d * n * p + p
        for i in range(n):
            dh, hkv = self.layer_head_dim(i), self.layer_kv_heads(i)
            layer = 2 * d * hq * dh + dh + 4 * d + 1 + 3 * d * self.mlp_width(i)
            if self.attention_bias:
                layer += hq * dh + d
            if not self.is_kv_shared(i):
                n_kv = 1 if self.k_eq_v(i) else 2
                layer += n_kv * d * hkv * dh + dh + (n_kv * hkv * dh if self.attention_bias else 0)
            if p:
                layer += 2 * d * p + d
            if self.enable_moe_block:
                e, f = self.num_experts, self.moe_intermediate_size
                layer += d * e + d + e + 3 * e * d * f + 3 * d
            total += layer
        return total

    # ---------------------------------------------------------------- config.json reader
    @classmethod
    def from_hf(cls, hf: dict, path: str = "config.json", dtype: str | None = None) -> "Gemma4Config":
        """Build from a Hugging Face config dict (`gemma4_text`, or top-level `gemma4`)."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise DSparkError(f"{path}: unknown model_type '{model_type}' for gemma4 "
                              f"(supported: {', '.join(MODEL_TYPES)})")
        text = hf
        if model_type in TOP_LEVEL_TYPES:
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise DSparkError(f"{path}: model_type '{model_type}' needs a text_config object")
        try:
            return cls._from_text(hf, text, "unified" in model_type, path, dtype)
        except (TypeError, ValueError) as e:
            raise DSparkError(f"{path}: a field has the wrong type ({e})") from None

    @classmethod
    def _from_text(cls, hf: dict, text: dict, unified: bool, path: str, dtype: str | None):
        _require(text, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads"), path)
        if text.get("use_bidirectional_attention") == "all":
            raise DSparkError(f"{path}: use_bidirectional_attention='all' is not a causal LM")
        n = int(text["num_hidden_layers"])
        layer_types = list(text.get("layer_types") or
                           [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
        if len(layer_types) != n:
            raise DSparkError(f"{path}: layer_types has {len(layer_types)} entries for {n} layers")
        layer_types[-1] = FULL  # transformers forces the last layer to full attention
        kv = int(text.get("num_key_value_heads", 4))
        k_eq_v = bool(text.get("attention_k_eq_v", False))
        dims, kvs = _per_layer(text, layer_types, int(text.get("head_dim") or 256), kv, k_eq_v, path)
        rope = _rope(text, path)
        # gemma4_unified(_text) files have no PLE / MoE fields: those switches are off there
        ple = 0 if unified else int(text.get("hidden_size_per_layer_input", 256) or 0)
        moe = bool(text.get("enable_moe_block", False)) and not unified
        top = hf if hf is not text else {}
        try:
            return cls(
                vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
                intermediate_size=int(text["intermediate_size"]), num_hidden_layers=n,
                num_attention_heads=int(text["num_attention_heads"]), layer_types=tuple(layer_types),
                num_key_value_heads=kvs[SLIDING], head_dim=dims[SLIDING],
                sliding_window=int(text.get("sliding_window") or (1024 if unified else 512)),
                sliding_rope=rope[SLIDING], global_head_dim=dims[FULL], global_kv_heads=kvs[FULL],
                full_rope=rope[FULL], attention_k_eq_v=k_eq_v,
                attention_bias=bool(text.get("attention_bias", False)),
                num_kv_shared_layers=int(text.get("num_kv_shared_layers") or 0),
                use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
                hidden_size_per_layer_input=ple,
                vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 262_144),
                enable_moe_block=moe, num_experts=int(text.get("num_experts") or 0) if moe else 0,
                top_k_experts=int(text.get("top_k_experts") or 0) if moe else 0,
                moe_intermediate_size=int(text.get("moe_intermediate_size") or 0) if moe else 0,
                hidden_activation=text.get("hidden_activation") or "gelu_pytorch_tanh",
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                final_logit_softcapping=_opt_float(text.get("final_logit_softcapping")),
                # the top-level wrapper's own flag decides tying in the `gemma4` layout
                tie_word_embeddings=bool((top or text).get("tie_word_embeddings", True)),
                max_position_embeddings=int(text.get("max_position_embeddings")
                                            or (262_144 if unified else 131_072)),
                dtype=dtype or _dtype_name(top, text))
        except DSparkError as e:
            raise DSparkError(f"{path}: {e}") from None


def text_tensor_prefix(hf: dict) -> str:
    """Where the decoder's tensors live: `model.` (text layout) or `model.language_model.`."""
    return "model.language_model." if hf.get("model_type") in TOP_LEVEL_TYPES else "model."


def _require(hf: dict, keys, path: str):
    missing = [k for k in keys if k not in hf]
    if missing:
        raise DSparkError(f"{path}: missing field(s) {', '.join(missing)}")


def _opt_float(x):
    return None if x is None else float(x)


def _dtype_name(hf: dict, text: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return "bfloat16" if name == "bfloat16" else "float32"


def _per_layer(text, layer_types, head_dim, kv, k_eq_v, path):
    """(head_dim, kv heads) per layer type, as transformers resolves them."""
    dims = [head_dim] * len(layer_types)
    kvs = [kv] * len(layer_types)
    overrides = text.get("per_layer_config")
    if overrides is None:  # older files: global_head_dim / num_global_key_value_heads
        global_kv = text.get("num_global_key_value_heads") if k_eq_v else None
        for i, t in enumerate(layer_types):
            if t == FULL:
                dims[i] = int(text.get("global_head_dim") or 512)
                kvs[i] = int(global_kv) if global_kv is not None else kv
    else:
        if not isinstance(overrides, dict):
            raise DSparkError(f"{path}: per_layer_config must be an object keyed by layer index")
        for key, over in overrides.items():
            try:
                i = int(key)
                assert 0 <= i < len(layer_types)
            except (ValueError, AssertionError):
                raise DSparkError(f"{path}: per_layer_config key '{key}' is not a layer index") from None
            extra = sorted(set(over) - set(PER_LAYER_KEYS))
            if extra:
                raise DSparkError(f"{path}: per_layer_config override(s) {', '.join(extra)} of layer {i} "
                                  f"are not supported (only {', '.join(PER_LAYER_KEYS)})")
            dims[i] = int(over.get("head_dim", dims[i]))
            kvs[i] = int(over.get("num_key_value_heads", kvs[i]))
    out_d, out_kv = {SLIDING: head_dim, FULL: head_dim}, {SLIDING: kv, FULL: kv}
    for t in (SLIDING, FULL):
        idx = [i for i, lt in enumerate(layer_types) if lt == t]
        if not idx:
            continue
        if len({dims[i] for i in idx}) > 1 or len({kvs[i] for i in idx}) > 1:
            raise DSparkError(f"{path}: the {t} layers disagree on head_dim / num_key_value_heads")
        out_d[t], out_kv[t] = dims[idx[0]], kvs[idx[0]]
    return out_d, out_kv


def _rope(text, path) -> dict[str, RopeSpec]:
    params = text.get("rope_parameters")
    if params is None:
        return {SLIDING: RopeSpec(rope_type="default", theta=10_000.0),
                FULL: RopeSpec(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25)}
    out = {}
    for t in (SLIDING, FULL):
        p = params.get(t) if isinstance(params, dict) else None
        if not isinstance(p, dict):
            raise DSparkError(f"{path}: rope_parameters needs an entry for '{t}'")
        rope_type = p.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise DSparkError(f"{path}: rope_type '{rope_type}' ({t}) is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")
        if p.get("rope_theta") is None:
            raise DSparkError(f"{path}: rope_parameters['{t}'] has no rope_theta")
        out[t] = RopeSpec(rope_type=rope_type, theta=float(p["rope_theta"]),
                          partial_rotary_factor=float(p.get("partial_rotary_factor") or 1.0),
                          factor=float(p.get("factor") or 1.0))
    return out


# ----------------------------------------------------------------------------- presets

def gemma4_12b(**overrides) -> Gemma4Config:
    """Gemma 4 12B (google/gemma-4-12B-it, `gemma4_unified`; the text decoder is the
    gemma4 one). transformers 5.23 ships no defaults for this size (its config classes
    default to a 2304-wide, 30-layer model), so the shape is the published config.json's
    text_config: 48 layers (5 sliding : 1 full), hidden 3840, MLP 15360, 16 query heads,
    sliding layers 8 KV heads x 256 with a 1024 window, full layers 1 KV head x 512 with
    K = V (attention_k_eq_v), no per-layer inputs, no MoE, no KV sharing, final logit
    soft-cap 30, tied 262144-token embeddings, RoPE left at the config-class defaults
    (sliding theta 1e4; full proportional, 1/4 of the head, theta 1e6)."""
    fields = dict(vocab_size=262_144, hidden_size=3840, intermediate_size=15_360,
                  num_hidden_layers=48, num_attention_heads=16,
                  layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(48)),
                  num_key_value_heads=8, head_dim=256, sliding_window=1024,
                  global_head_dim=512, global_kv_heads=1, attention_k_eq_v=True,
                  final_logit_softcapping=30.0, tie_word_embeddings=True,
                  max_position_embeddings=262_144)
    fields.update(overrides)
    return Gemma4Config(**fields)


def gemma4_tiny(**overrides) -> Gemma4Config:
    """A few-hundred-kilobyte Gemma 4 for tests, with every switch on (PLE, MoE, KV
    sharing, double-wide MLP, K = V) and a 4-token window."""
    fields = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                  num_attention_heads=4, layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
                  num_key_value_heads=2, head_dim=8, sliding_window=4, global_head_dim=16,
                  global_kv_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
                  use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                  enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                  final_logit_softcapping=30.0, max_position_embeddings=512)
    fields.update(overrides)
    return Gemma4Config(**fields)
