"""DeepSeek-V4 folders -> (DeepseekV4Config, params).

Tensor names are accepted in both layouts, and mixed: DeepSeek's original names
(`embed.weight`, `layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`,
`hc_head_fn`, ...; transformers' save_pretrained writes these back, under `model.`, with
the main kv norm as `attn.norm`) and transformers' module names (`model.layers.N.
self_attn.q_a_proj.weight`, `mlp.experts.gate_up_proj`, ...). Every name is first
rewritten to the module-name form, then each parameter of the Flax template is read:
PyTorch [out, in] weights become our [*in, *out] kernels; per-expert w1 / w3 / w2 are
stacked into gate_up [X, 2, I, E] / down [X, E, I]. Float8 weights with a
`weight_scale_inv` / `scale` sibling are dequantised at load (dspark_jax/fp8.py) to
the compute dtype; the modules transformers keeps in float32 stay float32. `mtp.*`
tensors (the multi-token-prediction layers) are ignored as transformers does; any
other tensor the model does not use, or one it needs and the folder lacks, is a
one-line error.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from dspark_jax import fp8
from dspark_jax.checkpoints import _flat, _unflat, param_template, read_config
from dspark_jax.config_deepseek_v4 import DeepseekV4Config
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder

# original DeepSeek name pieces -> transformers' module names, applied in this order
_RENAMES = (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"), (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.wq_b\.", ".q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
)
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(w[123])\.weight$")


def canonical(name: str) -> str:
    """A tensor name in either layout -> transformers' module name without `model.`."""
    name = name[len("model."):] if name.startswith("model.") else name
    for pat, rep in _RENAMES:
        name = re.sub(pat, rep, name)
    return name


def _param_name(path: tuple[str, ...]) -> str:
    """Flax path -> canonical tensor name (our wrapper modules dropped)."""
    parts = []
    for i, p in enumerate(path):
        if p == "main" or (p == "compressor" and i and path[i - 1] == "indexer"):
            continue
        m = re.fullmatch(r"layers_(\d+)", p)
        parts.append(f"layers.{m.group(1)}" if m else p)
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _is_scale(name: str, index) -> bool:
    for suffix in fp8.SCALE_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] + ".weight" in index:
            return True
    return False


def load_deepseek_v4(folder: str, dtype: str | None = None):
    """(DeepseekV4Config, params as numpy) from a DeepSeek-V4 folder (module docstring)."""
    from dspark_jax.models.deepseek_v4 import DeepseekV4LM

    hf = read_config(folder)
    cfg = DeepseekV4Config.from_hf(hf, os.path.join(folder, "config.json"), dtype)
    block = fp8.block_size(hf, os.path.join(folder, "config.json"))
    index = open_folder(folder)
    names, experts = {}, {}
    for n in index:
        if n.startswith(("mtp.", "model.mtp.")) or _is_scale(n, index):
            continue
        c = canonical(n)
        m = _EXPERT.match(c)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = n
        else:
            names[c] = n
    if cfg.tie_word_embeddings:   # transformers ties lm_head to the embedding; a stored copy is unused
        names.pop("lm_head.weight", None)
    template, _ = param_template(DeepseekV4LM(cfg), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    used, out = set(), {}
    x_ = cfg.n_routed_experts
    for path, spec in _flat(template).items():
        name, shape = _param_name(path), tuple(spec.shape)

        def read(c):
            if c not in names:
                raise DSparkError(f"tensor {c} (model.{c} or its DeepSeek name) is missing from {folder}")
            used.add(c)
            return np.asarray(fp8.read_weight(index, names[c], block))

        if path[-1] in ("gate_up_proj", "down_proj") and path[-2] == "experts":
            prefix = name.rsplit(".", 1)[0]
            if name in names:
                arr = read(name).reshape(shape)
            else:
                got = experts.pop(prefix, {})
                want = ("w1", "w3") if path[-1] == "gate_up_proj" else ("w2",)
                missing = [f"{prefix}.{e}.{w}" for e in range(x_) for w in want if (e, w) not in got]
                if missing:
                    raise DSparkError(f"tensor {missing[0]}.weight is missing from {folder}")
                arrs = [[np.asarray(fp8.read_weight(index, got[(e, w)], block)) for w in want] for e in range(x_)]
                arr = np.stack([np.stack(a) for a in arrs])
                arr = arr.reshape(shape)
                if path[-1] == "gate_up_proj":
                    experts[prefix] = {k: v for k, v in got.items() if k[1] == "w2"}
                else:
                    experts[prefix] = {k: v for k, v in got.items() if k[1] != "w2"}
                if not experts[prefix]:
                    del experts[prefix]
        else:
            arr = read(name)
            if path[-1] == "kernel":
                if path[-2] == "o_a_proj":       # [g * r, w] -> [g, w, r]
                    g, w, r = shape
                    arr = _check(arr, (g * r, w), name).reshape(g, r, w).transpose(0, 2, 1)
                else:                            # [out, in] -> [*in, *out]
                    arr = _check(arr, None, name, shape).T.reshape(shape)
            else:
                arr = _check(arr, None, name, shape).reshape(shape)
        out[path] = arr.astype(spec.dtype)   # the template holds float32 where transformers keeps it
    extra = sorted(set(names) - used) + [f"{p}.*" for p in experts]
    if extra:
        raise DSparkError(f"{folder}: tensor {names.get(extra[0], extra[0])} is not used by a deepseek_v4 model "
                          f"with this config.json ({len(extra)} unexpected)")
    return cfg, _unflat(out)


def _check(arr: np.ndarray, want2d, name: str, shape=None) -> np.ndarray:
    n = int(np.prod(shape)) if shape is not None else None
    if (want2d is not None and tuple(arr.shape) != want2d) or (n is not None and arr.size != n):
        raise DSparkError(f"tensor {name} has shape {tuple(arr.shape)}; the config implies "
                          f"{want2d if want2d is not None else shape}")
    return arr
