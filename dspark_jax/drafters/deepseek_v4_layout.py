"""DeepSeek-V4 DSpark drafters in and out of folders, in DeepSeek's released layout.

DeepSeek-V4-Flash-DSpark / -Pro-DSpark ship the drafter inside the target checkpoint,
under the `mtp.*` namespace, with DeepSeek's original tensor names (as vLLM's
`DSparkDeepseekV4ForCausalLM`, SGLang's `DeepseekV4ForCausalLMDSpark`, mlx-vlm and
llama.cpp load them; no embedding or LM head: both are the target's):

    mtp.0.main_proj.weight [D, m*D], mtp.0.main_norm.weight       (H_ctx from the m taps)
    mtp.{i}.attn.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink}
    mtp.{i}.ffn.gate.{weight, bias}, mtp.{i}.ffn.experts.{j}.{w1, w2, w3}.weight,
    mtp.{i}.ffn.shared_experts.{w1, w2, w3}.weight, mtp.{i}.{attn_norm, ffn_norm}.weight,
    mtp.{i}.hc_{attn, ffn}_{fn, base, scale}                       (i = 0 .. L-1)
    mtp.{L-1}.hc_head_{fn, base, scale}, mtp.{L-1}.norm.weight,
    mtp.{L-1}.markov_head.markov_w1.weight [V, r], mtp.{L-1}.markov_head.markov_w2.weight [V, r],
    mtp.{L-1}.confidence_head.proj.weight [1, D + r]

config.json is the target's with `dspark_block_size`, `dspark_noise_token_id` (the
mask token), `dspark_target_layer_ids` (DeepSeek's ids: the layers whose INPUT streams
are tapped, = the project's tap ids + 1), `dspark_markov_rank` and
`num_nextn_predict_layers` (the draft layers). `load_folder` reads the `mtp.*` tensors
of such a folder: a released combined checkpoint, or what `save_folder` writes (the
config plus a model.safetensors of the `mtp.*` tensors alone, to pair with the
target's folder). FP8 tensors with block scales are dequantised as the target's are.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import traverse_util

from dspark_jax import checkpoints, fp8
from dspark_jax.config_deepseek_v4 import DeepseekV4Config
from dspark_jax.drafters import deepseek_v4_drafter as dv4
from dspark_jax.drafters.folders import STS_FILE, check_gamma, read_sts
from dspark_jax.errors import DSparkError
from dspark_jax.safetensors_io import open_folder

FIELDS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")

# flax module names -> DeepSeek's (inside a layer)
_LAYER = {"self_attn": "attn", "mlp": "ffn", "q_a_proj": "wq_a", "q_a_norm": "q_norm", "q_b_proj": "wq_b",
          "kv_proj": "wkv", "o_a_proj": "wo_a", "o_b_proj": "wo_b", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_dspark_folder(hf: dict) -> bool:
    """Whether a config.json describes a DeepSeek-V4 folder that carries a DSpark drafter."""
    return hf.get("model_type") == "deepseek_v4" and hf.get("dspark_target_layer_ids") is not None


def tensor_name(path: tuple[str, ...], last: int) -> tuple[str, int]:
    """Flax path (experts excluded) -> (DeepSeek name, input dims of a kernel)."""
    leaf = path[-1]
    if path[0] in ("fc", "hidden_norm"):
        return f"mtp.0.{'main_proj' if path[0] == 'fc' else 'main_norm'}.weight", 1
    if path[0] == "hc_head":
        return f"mtp.{last}.hc_head_{leaf.removeprefix('hc_')}", 1
    if path[0] in ("norm", "confidence_head"):
        return f"mtp.{last}." + ".".join(path[:-1]) + ".weight", 1
    if path[0] == "markov_head":
        return f"mtp.{last}.markov_head.{path[1]}.weight", 1
    i = int(re.fullmatch(r"layers_(\d+)", path[0]).group(1))
    if path[1] in ("attn_hc", "ffn_hc"):
        return f"mtp.{i}.hc_{path[1][:-3]}_{leaf}", 1
    if leaf == "sinks":
        return f"mtp.{i}.attn.attn_sink", 1
    if leaf == "e_score_correction_bias":
        return f"mtp.{i}.ffn.gate.bias", 1
    parts = [_LAYER.get(p, p) for p in path[1:-1]]
    return f"mtp.{i}." + ".".join(parts) + ".weight", 2 if path[-2] == "o_b_proj" else 1


def _to_torch(path, arr: np.ndarray, n_in: int) -> np.ndarray:
    if path[-1] != "kernel":
        return arr
    if path[-2] == "o_a_proj":                       # [g, w, r] -> [g * r, w]
        g, w, r = arr.shape
        return arr.transpose(0, 2, 1).reshape(g * r, w)
    ins = int(np.prod(arr.shape[:n_in]))
    return arr.reshape(ins, -1).T                    # [*in, *out] -> [out, in]


def _from_torch(path, arr: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if arr.size != int(np.prod(shape)):
        raise DSparkError(f"tensor {name} has shape {tuple(arr.shape)}; the config implies {shape}")
    if path[-1] != "kernel":
        return arr.reshape(shape)
    if path[-2] == "o_a_proj":
        g, w, r = shape
        return arr.reshape(g, r, w).transpose(0, 2, 1)
    return arr.T.reshape(shape)


def _experts(path) -> str:
    return f"mtp.{int(path[0].split('_')[1])}.ffn.experts"


def to_tensors(params, n_layers: int) -> dict[str, np.ndarray]:
    """Drafter parameters -> {DeepSeek name: array in PyTorch's [out, in] layout}."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        a = np.asarray(v)
        if path[-2] == "experts":
            pre = _experts(path)
            for j in range(a.shape[0]):
                if path[-1] == "gate_up_proj":
                    out[f"{pre}.{j}.w1.weight"], out[f"{pre}.{j}.w3.weight"] = a[j, 0], a[j, 1]
                else:
                    out[f"{pre}.{j}.w2.weight"] = a[j]
            continue
        name, n_in = tensor_name(path, n_layers - 1)
        out[name] = np.ascontiguousarray(_to_torch(path, a, n_in))
    return out


def drafter_config(target_hf: dict, drafter: dv4.DeepseekV4BlockDrafter) -> dict:
    """config.json: the target's config plus DeepSeek's DSpark fields."""
    cfg = drafter.cfg
    hf = dict(target_hf)
    hf.update(dspark_block_size=cfg.block_size, dspark_noise_token_id=cfg.mask_token_id,
              dspark_target_layer_ids=[i + 1 for i in cfg.target_layer_ids], dspark_markov_rank=cfg.markov_rank,
              num_nextn_predict_layers=cfg.arch.num_hidden_layers)
    return hf


def save_folder(folder: str, drafter: dv4.DeepseekV4BlockDrafter, params, target_hf: dict,
                sts_temperatures=None) -> None:
    """Write config.json and model.safetensors holding the `mtp.*` tensors (module docstring)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(drafter_config(target_hf, drafter), f, indent=2, sort_keys=True)
    checkpoints.save_tensors(to_tensors(params, drafter.cfg.arch.num_hidden_layers), folder)
    if sts_temperatures is not None:
        with open(os.path.join(folder, STS_FILE), "w") as f:
            json.dump({"temperatures": [float(t) for t in sts_temperatures]}, f, indent=2)


def folder_config(hf: dict, tcfg: DeepseekV4Config, path: str, dtype: str | None):
    """DrafterConfig of a V4 DSpark folder's config.json, checked against the target."""
    missing = [k for k in FIELDS if k not in hf]
    if missing:
        raise DSparkError(f"{path}: a deepseek_v4 folder without {missing[0]} holds no DSpark drafter")
    try:
        layers = int(hf.get("n_mtp_layers") or hf.get("num_nextn_predict_layers") or 0)
        taps = tuple(int(i) - 1 for i in hf["dspark_target_layer_ids"])
        mask, rank = int(hf["dspark_noise_token_id"]), int(hf["dspark_markov_rank"])
        block = int(hf["dspark_block_size"])
        experts = hf.get("dspark_n_routed_experts")
        top = hf.get("dspark_n_activated_experts")
    except (TypeError, ValueError) as e:
        raise DSparkError(f"{path}: a dspark field has the wrong type ({e})") from None
    if layers < 1:
        raise DSparkError(f"{path}: num_nextn_predict_layers must count the DSpark draft layers (>= 1); got {layers}")
    if not 0 <= mask < tcfg.vocab_size:
        raise DSparkError(f"{path}: dspark_noise_token_id {mask} is not a token of the {tcfg.vocab_size}-token "
                          "vocabulary")
    cfg = dv4.new_config(tcfg, num_layers=layers, target_layer_ids=taps, block_size=block, mask_token_id=mask,
                         markov_rank=rank, dtype=dtype)
    return cfg.replace(arch=dv4.draft_arch(cfg.arch, layers, experts and int(experts), top and int(top)))


def load_params(folder: str, template, dtype, n_layers: int):
    """The drafter's parameters from the `mtp.*` tensors of a folder (FP8 dequantised)."""
    hf = checkpoints.read_config(folder)
    block = fp8.block_size(hf, os.path.join(folder, "config.json"))
    index = open_folder(folder)

    def read(name):
        if name not in index:
            raise DSparkError(f"tensor {name} is missing from {folder}")
        return np.asarray(fp8.read_weight(index, name, block))

    out = {}
    for path, spec in traverse_util.flatten_dict(template).items():
        shape = tuple(spec.shape)
        want = np.float32 if spec.dtype == np.float32 else dtype
        if path[-2] == "experts":
            pre = _experts(path)
            pieces = ("w1", "w3") if path[-1] == "gate_up_proj" else ("w2",)
            arr = np.stack([np.stack([read(f"{pre}.{j}.{w}.weight") for w in pieces]) for j in range(shape[0])])
            out[path] = arr.reshape(shape).astype(want)
            continue
        name, _ = tensor_name(path, n_layers - 1)
        out[path] = _from_torch(path, read(name), shape, name).astype(want)
    return traverse_util.unflatten_dict(out)


def load_folder(folder: str, tcfg, *, kind: str = "auto", gamma: int | None = None, dtype: str | None = None,
                hf: dict | None = None):
    """(DeepseekV4BlockDrafter, params) from a V4 folder carrying `mtp.*` DSpark tensors."""
    hf = checkpoints.read_config(folder) if hf is None else hf
    path = os.path.join(folder, "config.json")
    if kind not in ("auto", "dspark", "mtp1"):
        raise DSparkError(f"--drafter {kind} was asked for but {folder} holds a dspark drafter (DeepSeek-V4 mtp.*)")
    if not isinstance(tcfg, DeepseekV4Config):
        raise DSparkError(f"{folder} holds a DeepSeek-V4 DSpark drafter; the target is "
                          f"{type(tcfg).__name__.removesuffix('Config')}")
    cfg = folder_config(hf, tcfg, path, dtype or tcfg.dtype)
    gamma = 1 if kind == "mtp1" else check_gamma(gamma, cfg.block_size, folder)
    drafter = dv4.DeepseekV4BlockDrafter(cfg, tcfg, gamma, read_sts(folder))
    template, _ = drafter.param_shapes_and_axes()
    return drafter, load_params(folder, template, cfg.arch.jnp_dtype, cfg.arch.num_hidden_layers)
