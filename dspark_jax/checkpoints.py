"""Hugging Face folders in and out: config.json + safetensors <-> Flax parameter trees.

The Flax tree mirrors the PyTorch module names, so a parameter path maps to a tensor
name mechanically: `layers_3/self_attn/q_proj/kernel` <-> `model.layers.3.self_attn.
q_proj.weight`. PyTorch Linear weights are [out, in]; our kernels are [*in, *out] (heads
split out), so loading transposes and reshapes, saving does the reverse.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import Qwen3Config, dtype_of
from dspark_jax.errors import DSparkError
from dspark_jax.models.registry import MODEL_TYPES as SUPPORTED_TARGETS
from dspark_jax.safetensors_io import TensorIndex, open_folder, save_file


def read_config(folder: str) -> dict:
    """config.json of a folder as a dict, with one-line errors for the usual mistakes."""
    if not os.path.isdir(folder):
        raise DSparkError(f"model folder {folder} does not exist")
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise DSparkError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise DSparkError(f"{path} must hold a JSON object")
    return cfg


def rope_theta_of(hf: dict, path: str) -> float:
    """Accept both `rope_theta` (older files) and `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise DSparkError(f"{path}: rope_type '{rope_type}' is not supported (only 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise DSparkError(f"{path}: no rope_theta (top level or in rope_parameters)")
    return float(theta)


def _require(hf: dict, keys, path: str):
    missing = [k for k in keys if k not in hf]
    if missing:
        raise DSparkError(f"{path}: missing field(s) {', '.join(missing)}")


def qwen3_config(hf: dict, path: str = "config.json", dtype: str | None = None) -> Qwen3Config:
    """Build a Qwen3Config from a Hugging Face config dict."""
    model_type = hf.get("model_type")
    if model_type != "qwen3":
        raise DSparkError(f"{path}: unknown model_type '{model_type}' for a Qwen3 model "
                          f"(supported targets: {', '.join(SUPPORTED_TARGETS)})")
    _require(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"), path)
    if hf.get("use_sliding_window"):
        raise DSparkError(f"{path}: use_sliding_window=true is not supported for qwen3")
    if hf.get("hidden_act", "silu") != "silu":
        raise DSparkError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    heads = hf["num_attention_heads"]
    return Qwen3Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=rope_theta_of(hf, path), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        dtype=dtype or _dtype_name(hf))


def _dtype_name(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "bfloat16" if name == "bfloat16" else "float32"


# ------------------------------------------------------------------- path <-> tensor name

def tensor_name(path: tuple[str, ...], prefix: str = "model.") -> str:
    """Flax parameter path -> Hugging Face tensor name."""
    parts = []
    for p in path:
        m = re.fullmatch(r"layers_(\d+)", p)
        parts.append(f"layers.{m.group(1)}" if m else p)
    leaf = parts[-1]
    parts[-1] = "weight" if leaf in ("kernel", "embedding", "weight") else leaf
    name = ".".join(parts)
    return name if name.startswith("lm_head") else prefix + name


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(getattr(k, "key", str(k)) for k in kp): v
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def _to_flax(arr: np.ndarray, shape: tuple[int, ...], leaf: str, name: str, file: str) -> np.ndarray:
    """[out, in] torch weight -> our [*in, *out] kernel; other leaves are reshaped only."""
    if leaf == "kernel":
        ok = arr.ndim == 2 and any(
            math.prod(shape[:k]) == arr.shape[1] and math.prod(shape[k:]) == arr.shape[0]
            for k in range(1, len(shape)))
        if not ok:
            k = 2 if len(shape) == 3 and name.endswith("o_proj.weight") else 1
            want = (math.prod(shape[k:]), math.prod(shape[:k]))
            raise DSparkError(f"tensor {name} in {file} has shape {tuple(arr.shape)}; the config implies {want}")
        return np.asarray(arr).T.reshape(shape)
    if math.prod(arr.shape) != math.prod(shape) or arr.ndim > len(shape):
        raise DSparkError(f"tensor {name} in {file} has shape {tuple(arr.shape)}; the config implies {shape}")
    return np.asarray(arr).reshape(shape)


def load_tree(index: TensorIndex, template, *, prefix: str = "model.", dtype=jnp.float32,
              rename: Callable[[tuple[str, ...]], str] | None = None, folder: str = ""):
    """Fill a parameter tree shaped like `template` (e.g. from jax.eval_shape) from tensors."""
    out = {}
    for path, spec in _flat(template).items():
        name = rename(path) if rename else tensor_name(path, prefix)
        if name not in index:
            raise DSparkError(f"tensor {name} is missing from the safetensors in {folder or 'the folder'}")
        arr = _to_flax(index[name], tuple(spec.shape), path[-1], name, index.file_of(name))
        out[path] = arr.astype(dtype)
    return _unflat(out)


def to_tensors(params, *, prefix: str = "model.", dtype=None,
               rename: Callable[[tuple[str, ...]], str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of load_tree: a parameter tree -> {HF tensor name: [out, in] array}."""
    out = {}
    for path, v in _flat(params).items():
        a = np.asarray(jax.device_get(v))
        if dtype is not None:
            a = a.astype(dtype)
        if path[-1] == "kernel":
            n_in = 2 if len(a.shape) == 3 and path[-2] == "o_proj" else 1
            a = a.reshape(math.prod(a.shape[:n_in]), -1).T
        elif path[-1] == "bias":
            a = a.reshape(-1)
        out[rename(path) if rename else tensor_name(path, prefix)] = np.ascontiguousarray(a)
    return out


def save_tensors(tensors: dict[str, np.ndarray], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def param_template(module: nn.Module, *args, **kwargs):
    """(shape tree, logical-axes tree) of a module's parameters; allocates nothing."""
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    axes = nn.get_partition_spec(boxed)
    return nn.unbox(boxed), axes


def init_module_params(module: nn.Module, rng: jax.Array, *args):
    """A module's random (unboxed) parameters. Only the initialisers run: the forward is
    traced on the inputs' shapes and never executed (`flax.linen.Module.lazy_init`)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    return nn.unbox(module.lazy_init(rng, *shapes)["params"])


def load_qwen3(folder: str, dtype: str | None = None):
    """(Qwen3Config, params as numpy) from a Hugging Face Qwen3 folder."""
    from dspark_jax.models.qwen3 import Qwen3LM

    hf = read_config(folder)
    cfg = qwen3_config(hf, os.path.join(folder, "config.json"), dtype)
    dtype_of(cfg.dtype)
    template, _ = param_template(Qwen3LM(cfg), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    params = load_tree(open_folder(folder), template, prefix="model.", dtype=cfg.jnp_dtype,
                       folder=folder)
    return cfg, params


def load_llama(folder: str, dtype: str | None = None):
    """(LlamaConfig, params as numpy) from a Hugging Face Llama 3 folder (`model_type:
    llama`); the decoder is Qwen3LM with Llama's attention, the tensor names are the same."""
    from dspark_jax.config_llama import LlamaConfig
    from dspark_jax.models.qwen3 import Qwen3LM

    cfg = LlamaConfig.from_hf(read_config(folder), os.path.join(folder, "config.json"), dtype)
    template, _ = param_template(Qwen3LM(cfg), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    params = load_tree(open_folder(folder), template, prefix="model.", dtype=cfg.jnp_dtype, folder=folder)
    return cfg, params


def load_gemma4(folder: str, dtype: str | None = None):
    """(Gemma4Config, params as numpy) from a Hugging Face Gemma 4 folder.

    Reads `gemma4_text` folders (tensors under `model.`) and the top-level `gemma4`
    layout (Gemma4ForConditionalGeneration: the decoder under `model.language_model.`;
    vision and audio tensors are ignored). KV-shared layers' k/v tensors, if present,
    are ignored as transformers does.
    """
    from dspark_jax.config_gemma4 import Gemma4Config, text_tensor_prefix
    from dspark_jax.models.gemma4 import Gemma4LM

    hf = read_config(folder)
    cfg = Gemma4Config.from_hf(hf, os.path.join(folder, "config.json"), dtype)
    template, _ = param_template(Gemma4LM(cfg), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    params = load_tree(open_folder(folder), template, prefix=text_tensor_prefix(hf), dtype=cfg.jnp_dtype,
                       folder=folder)
    return cfg, params
