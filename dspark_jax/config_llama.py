"""Llama 3 decoder configuration and its reader for Hugging Face config.json.

A Llama 3 decoder layer is a Qwen3 layer without the per-head q/k RMSNorm, rotating with
its own RoPE frequencies. `LlamaConfig` is therefore a `Qwen3Config` with the RoPE fields
added, and `models/qwen3.py` serves both (its attention switches on the config type).
It is frozen, keyword-only and hashable (a `jax.jit` static argument).

RoPE: `rope_type` "default" is plain RoPE (`rope_scaling: null`); "llama3" is the
Llama 3.1 frequency rule (factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings). `from_hf` reads both spellings of transformers
(`rope_scaling` + top-level `rope_theta` of Llama 3.x folders, and transformers 5's
`rope_parameters`) and refuses by name every switch it does not compute.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dspark_jax.config import Qwen3Config
from dspark_jax.errors import DSparkError

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(Qwen3Config):
    """Shape and numerics of a Llama 3 decoder (`model_type: llama`, LlamaForCausalLM)."""

    rope_theta: float = 500_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        super().__post_init__()
        if self.rope_type not in ROPE_TYPES:
            raise DSparkError(f"rope_type '{self.rope_type}' is not supported for llama "
                              f"(supported: {', '.join(ROPE_TYPES)})")
        if self.rope_type == "llama3" and not (self.rope_factor > 0 and self.low_freq_factor < self.high_freq_factor):
            raise DSparkError(f"llama3 rope scaling needs factor > 0 and low_freq_factor < high_freq_factor; got "
                              f"{self.rope_factor}, {self.low_freq_factor}, {self.high_freq_factor}")

    def inv_freq(self) -> np.ndarray:
        """[head_dim // 2] float32 inverse frequencies of the rotate-half RoPE.

        llama3: a frequency whose wavelength 2*pi/f exceeds original / low_freq_factor is
        divided by `rope_factor`; one shorter than original / high_freq_factor is kept;
        in between it is blended, (1 - s) * f / factor + s * f with
        s = (original / wavelength - low) / (high - low).
        """
        d = self.head_dim
        base = (1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
        base = base.astype(np.float32)
        if self.rope_type == "default":
            return base
        f32 = np.float32
        factor, low, high = f32(self.rope_factor), f32(self.low_freq_factor), f32(self.high_freq_factor)
        old = f32(self.original_max_position_embeddings)
        wavelen = f32(2 * math.pi) / base
        scaled = np.where(wavelen > old / low, base / factor, base).astype(np.float32)
        s = (old / wavelen - low) / (high - low)
        blended = ((1 - s) * scaled / factor + s * scaled).astype(np.float32)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, blended, scaled).astype(np.float32)

    def to_hf(self) -> dict:
        """The Hugging Face config.json dict of this shape (LlamaForCausalLM, legacy
        `rope_scaling` spelling that every transformers version reads)."""
        scaling = None
        if self.rope_type == "llama3":
            scaling = {"rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.low_freq_factor,
                       "high_freq_factor": self.high_freq_factor,
                       "original_max_position_embeddings": self.original_max_position_embeddings}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings, "dtype": self.dtype}

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied; no q/k norms)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq, hkv, dh = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * hq * dh * 2 + d * hkv * dh * 2
        if self.attention_bias:
            attn += hq * dh + 2 * hkv * dh + d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * layer + d + head

    @classmethod
    def from_hf(cls, hf: dict, path: str = "config.json", dtype: str | None = None) -> "LlamaConfig":
        """Build a LlamaConfig from a Hugging Face config dict; one-line errors name the field."""
        if hf.get("model_type") != "llama":
            raise DSparkError(f"{path}: model_type '{hf.get('model_type')}' is not llama")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise DSparkError(f"{path}: missing field(s) {', '.join(missing)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise DSparkError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported for llama (only silu)")
        if hf.get("mlp_bias"):
            raise DSparkError(f"{path}: mlp_bias=true is not supported for llama")
        if hf.get("quantization_config"):
            raise DSparkError(f"{path}: quantization_config is not supported (give an unquantized checkpoint)")
        heads = hf["num_attention_heads"]
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            dtype=dtype or ("bfloat16" if name == "bfloat16" else "float32"),
            **_rope_fields(hf, path))


def _rope_fields(hf: dict, path: str) -> dict:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise DSparkError(f"{path}: rope_scaling must be an object or null")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise DSparkError(f"{path}: rope_type '{rope_type}' is not supported for llama "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise DSparkError(f"{path}: partial_rotary_factor={partial} is not supported for llama (only 1.0)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))  # transformers' LlamaConfig default
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if params.get(k) is None]
        if missing:
            raise DSparkError(f"{path}: llama3 rope scaling is missing {', '.join(missing)}")
        out.update(rope_factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                   high_freq_factor=float(params["high_freq_factor"]),
                   original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                        or hf.get("max_position_embeddings", 8192)))
    return out
