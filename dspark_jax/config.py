"""Frozen, keyword-only configuration dataclasses and the named model presets.

A named model size is only a config: `qwen3_4b()` returns the shape of Qwen3-4B and
nothing else. Configs are hashable so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dspark_jax.errors import DSparkError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    """Map a dtype name (`float32` / `bfloat16`) to the jnp dtype, with a clear error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise DSparkError(f"unknown dtype '{name}'; choose one of {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3Config:
    """Shape and numerics of a Qwen3-architecture decoder (`model_type: qwen3`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise DSparkError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        dtype_of(self.dtype)

    @property
    def jnp_dtype(self):
        return dtype_of(self.dtype)

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict:
        """The Hugging Face config.json dict of this shape (Qwen3ForCausalLM)."""
        return {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings, "use_sliding_window": False,
            "dtype": self.dtype}

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq, hkv, dh = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * hq * dh * 2 + d * hkv * dh * 2 + 2 * dh
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * layer + d + head


# ----------------------------------------------------------------------------- presets
# Published shapes of the Qwen3 dense models (Hugging Face config.json of each).

def qwen3_4b(**overrides) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, **overrides)


def qwen3_8b(**overrides) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=False, **overrides)


def qwen3_14b(**overrides) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=17408,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=False, **overrides)


def qwen3_tiny(**overrides) -> Qwen3Config:
    """A few-hundred-kilobyte Qwen3 for tests: GQA (8 query heads over 4 KV heads)."""
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=512)
    fields.update(overrides)
    return Qwen3Config(**fields)


PRESETS = {
    "qwen3-4b": qwen3_4b,
    "qwen3-8b": qwen3_8b,
    "qwen3-14b": qwen3_14b,
    "qwen3-tiny": qwen3_tiny,
}


def preset(name: str, **overrides) -> Qwen3Config:
    try:
        return PRESETS[name](**overrides)
    except KeyError:
        raise DSparkError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}") from None
