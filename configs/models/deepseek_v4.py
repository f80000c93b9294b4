"""DeepSeek-V4-Flash and DeepSeek-V4-Pro as frozen presets of the project's V4 config.

    from configs.models.deepseek_v4 import PRESETS, preset
    cfg = preset("deepseek-v4-pro")           # a frozen DeepseekV4Config, bfloat16

Each preset is built the way a real folder is read: a config.json-shaped dict
(`FLASH_CONFIG_JSON`, `PRO_CONFIG_JSON`, the fields the released config.json files
carry) through `DeepseekV4Config.from_hf`, so legacy fields (`compress_ratios`,
`num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`) fold exactly as they do for a
downloaded folder. Only shapes and switches matter here (for memory plans, profiling
with random weights); no weights are involved.

Sources (read 2026-12-07 through the public code / issue indexes; the Hugging Face
pages themselves were not reachable from here):
- V4-Flash: transformers 5.25 `DeepseekV4Config` defaults are V4-Flash's shapes (its
  docstring checkpoint is deepseek-ai/DeepSeek-V4-Flash-Base). Its default
  `layer_types` is the V4-Pro schedule, so the Flash schedule comes from the published
  Flash(-Base) config.json `compress_ratios` (0, 0, then 4 / 128 alternating, a
  trailing 0 for the MTP layer; 44 entries for 43 layers), as quoted inline by an
  alibaba/rtp-llm unit test ("Authoritative DeepSeek-V4-Flash-Base config"), by
  hw-native-sys/pypto-lib `models/deepseek/v4/config.py` (FLASH) and by
  anthony-chaudhary/fak issue #12635 ("layers 0-1 use ratio 0; layers 2-42 alternate").
  `rope_scaling` (yarn, factor 16, original 65536, beta 32 / 1) and `num_hash_layers`
  3 from the same inline config.json.
- V4-Pro: every field below is listed, as checked against
  huggingface.co/deepseek-ai/DeepSeek-V4-Pro config.json, in a public review record of
  a "DeepSeek-V4-Pro dataflow" wiki page (hidden 7168, 61 layers, 128 heads, head_dim
  512, qk_rope 64, q_lora 1536, o_groups 16, o_lora 1024, window 128, index 64 x 128
  top-1024, 384 experts top-6, moe_intermediate 3072, sqrtsoftplus, routed scale 2.5,
  3 hash layers, hc 4 / 20 / 1e-6, yarn 16 / 65536, theta 1e4 / 1.6e5, swiglu 10,
  vocab 129280, untied, compress_ratios [128, 128, 4, 128, ..., 4, 0]); the same values
  are in pypto-lib's PRO preset. The schedule gives 31 HCA and 30 CSA layers, no
  sliding-only layer.
- Weight formats of the released folders (not part of the config class; used by
  serve/memory_plan.py): quantization_config fp8 e4m3 with ue8m0 128 x 128 block
  scales, `expert_dtype: fp4` for the routed experts (Pro: the review record above;
  Flash: pypto-lib's FLASH preset and fak #12635, "packed FP4 with per-32 E8M0 scales").
Not verified from a primary source: `rms_norm_eps` and `hc_eps` of Flash beyond the
rtp-llm copy (both 1e-6, also transformers' defaults), and `norm_topk_prob` for Flash
(true in the same copy).
"""

from __future__ import annotations

import types

from dspark_jax.config_deepseek_v4 import DeepseekV4Config
from dspark_jax.errors import DSparkError

_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

# Fields shared by both released config.json files (same values in each).
_COMMON = {
    "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280,
    "head_dim": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 1, "o_lora_rank": 1024,
    "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "num_hash_layers": 3,
    "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "compress_rope_theta": 160000, "rope_scaling": _YARN,
    "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
}


def _ratios(prefix: tuple[int, ...], layers: int) -> list[int]:
    """Per-layer compress ratios: `prefix`, then 4 / 128 alternating to `layers`, then the
    MTP layer's 0 (released config.json files list num_hidden_layers + 1 entries)."""
    body = [4 if i % 2 == 0 else 128 for i in range(layers - len(prefix))]
    return list(prefix) + body + [0]


FLASH_CONFIG_JSON = types.MappingProxyType({
    **_COMMON, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "q_lora_rank": 1024,
    "o_groups": 8, "index_topk": 512, "n_routed_experts": 256, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "compress_ratios": _ratios((0, 0), 43),
})

PRO_CONFIG_JSON = types.MappingProxyType({
    **_COMMON, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "index_topk": 1024, "n_routed_experts": 384, "moe_intermediate_size": 3072,
    "routed_scaling_factor": 2.5, "compress_ratios": _ratios((128, 128), 61),
})

CONFIG_JSON = {"deepseek-v4-flash": FLASH_CONFIG_JSON, "deepseek-v4-pro": PRO_CONFIG_JSON}

# Stored weight format of the released folders, per preset (see the module docstring).
RELEASED_FORMAT = {"deepseek-v4-flash": "fp4", "deepseek-v4-pro": "fp4"}

PRESETS: dict[str, DeepseekV4Config] = {
    name: DeepseekV4Config.from_hf(dict(hf), f"configs/models/deepseek_v4.py:{name}", "bfloat16")
    for name, hf in CONFIG_JSON.items()
}


def preset(name: str, dtype: str = "bfloat16") -> DeepseekV4Config:
    """The named preset in compute dtype `dtype`; an unknown name is a one-line error."""
    if name not in PRESETS:
        raise DSparkError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name] if dtype == "bfloat16" else PRESETS[name].replace(dtype=dtype)
