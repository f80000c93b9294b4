"""Write an Eagle3 drafter as an EAGLE-3 folder (`LlamaForCausalLMEagle3`, the EAGLE /
SpecForge layout SGLang and vLLM load); refuse, in one line, every drafter that folder
cannot hold faithfully.

The folder is read as drafters/eagle3_layout.py reads it, and that reader runs the very
module this project's Eagle3 drafter runs (`EagleLayoutModule` is an `Eagle3Module`):
one Llama decoder layer (`midlayer`) whose q/k/v read [input_layernorm(embed);
hidden_norm(g)], residual g, `fc` over the target features concatenated in layer order,
`norm`, `lm_head`. So an Eagle3 drafter goes out unchanged when it has exactly that:

- one draft layer of Llama shape (a `LlamaConfig` arch: what drafter=eagle3 trains with
  eagle3_layer=llama, `midlayer_arch`, for a Qwen3 or Llama 3 target, and on a Llama 3
  target with the target's layer when that has this shape): plain attention, no q/k
  norms, the draft's RoPE (plain or Llama 3 scaled) written as `rope_theta` /
  `rope_scaling`, `head_dim = hidden / heads`, no attention bias. A Qwen3-shaped draft
  layer (eagle3_layer=target on a Qwen3 target) RMS-normalises each query and key head,
  which `LlamaForCausalLMEagle3` has no tensor or switch for: refused;
- three taps, in increasing order (the serving systems capture features in layer order),
  written explicitly as `eagle_config.eagle_aux_hidden_state_layer_ids` (a tap id here is
  decoder layer k's output, which is what SGLang's layer id k reads; the default
  "inputs of layers 2, L//2, L-3" is never relied on);
- the full vocabulary: `draft_vocab_size = vocab_size`, `d2t` zeros, `t2d` all true (the
  identity maps), `lm_head.weight` the drafter's full head and `embed_tokens.weight` its
  embedding (drafter=eagle3 trains with the target's frozen copies).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from dspark_jax import checkpoints
from dspark_jax.config import Qwen3Config
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.drafters import eagle3, eagle3_layout, zlab_export
from dspark_jax.errors import DSparkError

LAYOUTS = ("deepspec", "zlab", "eagle3")
EAGLE3_SUFFIX = "_eagle3"   # <out_dir>/drafter_eagle3 beside the DeepSpec <out_dir>/drafter


def parse_layouts(text: str) -> tuple[str, ...]:
    """"deepspec", "zlab", "eagle3" or several comma-separated -> the layouts, checked."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [n for n in names if n not in LAYOUTS]
    if not names or bad or len(set(names)) != len(names):
        raise DSparkError(f"export_layout must be one or more of deepspec, zlab, eagle3 (comma-separated); "
                          f"got '{text}'")
    return names


def midlayer_arch(arch) -> LlamaConfig:
    """The draft-layer config `arch` (a Qwen3 or Llama 3 target's, reshaped for the draft)
    as EAGLE-3's midlayer: a LlamaConfig without q/k norms or attention bias, head_dim =
    hidden / heads, the target's RoPE (a Llama target's scaling kept; Qwen3's plain RoPE
    at its rope_theta). What train.train builds for eagle3_layer=llama."""
    if not isinstance(arch, Qwen3Config):
        raise DSparkError(f"eagle3_layer=llama needs a Qwen3 or Llama 3 target; got a {type(arch).__name__} one")
    heads = arch.num_attention_heads
    if arch.hidden_size % heads:
        raise DSparkError(f"eagle3_layer=llama: hidden_size {arch.hidden_size} is not a multiple of "
                          f"{heads} heads (EAGLE-3's midlayer has head_dim = hidden / heads)")
    shape = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch) if f.init}
    shape.update(head_dim=arch.hidden_size // heads, attention_bias=False)
    if isinstance(arch, LlamaConfig):
        return LlamaConfig(**shape)
    return LlamaConfig(**shape, rope_type="default")


def eagle3_refusal(drafter) -> str | None:
    """Why `drafter` has no faithful EAGLE-3 folder (None when it has one)."""
    kind = getattr(drafter, "kind", type(drafter).__name__)
    if kind != "eagle3" or not isinstance(drafter, eagle3.Eagle3Drafter):
        return (f"a {kind} drafter is not an Eagle3 drafter (the {eagle3_layout.LAYOUT} layout holds Eagle3 "
                "drafters only)")
    if type(drafter) is eagle3_layout.EagleLayoutDrafter:
        return f"it was loaded from an {eagle3_layout.LAYOUT} folder already (copy that folder)"
    if type(drafter) is not eagle3.Eagle3Drafter:
        return f"a {type(drafter).__name__} reads its target's embedding and LM head in its own way"
    arch, taps = drafter.cfg.arch, drafter.cfg.target_layer_ids
    if type(arch) is not LlamaConfig:
        return (f"its draft layer is a {type(arch).__name__} layer (RMS norms on each query and key head); "
                "LlamaForCausalLMEagle3's midlayer is a Llama layer without them (train.train's "
                "eagle3_layer=llama trains that layer for any target)")
    if arch.num_hidden_layers != 1:
        return f"it has {arch.num_hidden_layers} draft layers; LlamaForCausalLMEagle3 has one midlayer"
    if arch.attention_bias:
        return "its attention has biases; LlamaForCausalLMEagle3's q/k/v/o projections have none"
    if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
        return (f"its head_dim {arch.head_dim} x {arch.num_attention_heads} heads is not hidden_size "
                f"{arch.hidden_size} (EAGLE's midlayer derives head_dim from them)")
    if len(taps) != 3:
        return f"it reads {len(taps)} target layers {list(taps)}; the {eagle3_layout.LAYOUT} fc reads 3"
    if list(taps) != sorted(set(taps)):
        return (f"its taps {list(taps)} are not in increasing order (the serving systems concatenate the "
                "captured features in layer order)")
    return None


def check_exportable(drafter, layouts) -> None:
    """One-line DSparkError unless every layout in `layouts` holds `drafter` faithfully."""
    others = tuple(lay for lay in layouts if lay != "eagle3")
    if others:
        zlab_export.check_exportable(drafter, others)
    if "eagle3" in layouts:
        why = eagle3_refusal(drafter)
        if why:
            raise DSparkError(f"cannot export this {getattr(drafter, 'kind', '?')} drafter in the "
                              f"{eagle3_layout.LAYOUT} layout: {why}")


def eagle3_hf_config(drafter, dtype: str) -> dict:
    """config.json of an EAGLE-3 folder for a faithful `drafter`: the draft layer's Llama
    config, draft_vocab_size = vocab_size, the taps written out."""
    arch = drafter.cfg.arch
    hf = arch.replace(dtype=dtype).to_hf()
    hf.update(architectures=[eagle3_layout.ARCH], model_type="llama", tie_word_embeddings=False,
              draft_vocab_size=arch.vocab_size, torch_dtype=dtype, use_cache=True,
              eagle_config={"eagle_aux_hidden_state_layer_ids": list(drafter.cfg.target_layer_ids),
                            "use_aux_hidden_state": True})
    return hf


def _rename(path: tuple[str, ...]) -> str:
    path = ("midlayer",) + tuple(path[1:]) if path[0] == "layers_0" else tuple(path)
    return checkpoints.tensor_name(path, prefix="")


def save_eagle3_layout(folder: str, drafter, params, *, dtype: str = "float32") -> str:
    """Write `drafter` (parameters `params`, embed_tokens and lm_head included) to `folder`
    in the EAGLE-3 layout, tensors in `dtype`; refuses unfaithful drafters first (nothing
    written). Returns folder."""
    check_exportable(drafter, ("eagle3",))
    if dtype not in ("float32", "bfloat16"):
        raise DSparkError(f"export dtype must be float32 or bfloat16; got '{dtype}'")
    missing = [k for k in ("embed_tokens", "lm_head", "fc", "norm", "layers_0") if k not in params]
    if missing:
        raise DSparkError(f"cannot export this eagle3 drafter: its parameters lack {missing}")
    np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16
    tensors = checkpoints.to_tensors(params, prefix="", dtype=np_dtype, rename=_rename)
    vocab = drafter.cfg.arch.vocab_size
    tensors["d2t"] = np.zeros(vocab, np.int64)     # the identity: target id = draft id + 0
    tensors["t2d"] = np.ones(vocab, bool)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(eagle3_hf_config(drafter, dtype), f, indent=2, sort_keys=True)
    checkpoints.save_tensors(tensors, folder)
    return folder


def export_folder(draft: str, target: str, out: str, *, dtype: str = "float32") -> str:
    """Load the DeepSpec Eagle3 folder `draft` against the target folder `target` and
    write it to `out` in the EAGLE-3 layout."""
    from dspark_jax import drafters
    from dspark_jax import target as target_lib

    if os.path.abspath(draft) == os.path.abspath(out):
        raise DSparkError(f"--out {out} is the drafter folder itself; name another folder")
    tcfg, _ = target_lib.load(target)
    drafter, params = drafters.load(draft, tcfg, dtype="float32")
    return save_eagle3_layout(out, drafter, params, dtype=dtype)
