"""EAGLE-3 drafter folders in the EAGLE / SpecForge layout (`LlamaForCausalLMEagle3`),
served as they are by the Eagle3 drafter of eagle3.py.

Fields and conventions are those of the EAGLE authors' `eagle/model/cnets.py` and
`eagle/model/modeling_llama_kv.py` at EAGLE_REVISION, and of SpecForge's
`specforge/modeling/draft/llama3_eagle.py` at SPECFORGE_REVISION (read, not copied):

- config.json is a Llama config of the one draft layer (`model_type: llama`,
  `num_hidden_layers: 1`, the target's full `vocab_size`) plus `draft_vocab_size`.
- Weights: `midlayer.*` (a Llama decoder layer whose q/k/v read [input_layernorm(embed);
  hidden_norm(g)], 2 x hidden wide, residual g), `fc.weight` (3 x target hidden ->
  hidden, over the target features concatenated in layer order), `norm.weight`,
  `lm_head.weight` ([draft_vocab_size, hidden]), `d2t` ([draft_vocab_size], target id =
  draft id + d2t[draft id]) and `t2d` ([vocab_size] booleans). `embed_tokens.weight` is
  a frozen copy of the target's; where the folder lacks it the target's is used.
- Features: EAGLE captures the input of target decoder layers 2, L // 2 and L - 3 (L the
  target's layer count), i.e. the outputs of layers 1, L // 2 - 1 and L - 4 in this
  project's tap numbering (a tap is a decoder layer's output). SGLang uses the same
  default; an `eagle_config.eagle_aux_hidden_state_layer_ids` list is read as SGLang
  reads it (layer id k = decoder layer k's output, which is what a tap id is here).
- The reduced vocabulary: the draft distribution over the full vocabulary is the
  softmax over the draft vocabulary placed at the d2t-mapped ids, zero elsewhere
  (`EagleLayoutDrafter.logits` scatters the draft logits into -inf).

Switches the reference code knows but this drafter does not compute (`norm_before_residual`,
`fc_norm`, a `target_hidden_size` other than `hidden_size`, more than one draft layer,
`eagle_config.use_aux_hidden_state: false`) are refused by name.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dspark_jax import checkpoints
from dspark_jax.config import Qwen3Config
from dspark_jax.config_llama import LlamaConfig
from dspark_jax.drafters import eagle3
from dspark_jax.drafters.zlab import looks_like  # the one classifier of drafter layouts by their fields
from dspark_jax.errors import DSparkError
from dspark_jax.models.layers import Proj, embedding
from dspark_jax.safetensors_io import open_folder

EAGLE_REVISION = "cb7e0841fe0c206c6ed74a197ad5e2a1f13f5a2b"
SPECFORGE_REVISION = "a6b6b0230009d15ec2a97a57384e6f53f0f96946"
ARCH = "LlamaForCausalLMEagle3"
LAYOUT = "EAGLE-3"
# field -> the values that change nothing (accepted); any other value is refused by name
SWITCHES = {"norm_before_residual": (None, False), "fc_norm": (None, False)}
EAGLE_CONFIG_SWITCHES = {"use_aux_hidden_state": (None, True), "use_input_layernorm_in_first_layer": (None, True)}
# tensors that only other layouts hold: (name prefix, the layout it belongs to)
_FOREIGN_TENSORS = (("layers.", "DeepSpec or z-lab DFlash"), ("markov_head.", "DeepSpec DSpark"),
                    ("hidden_norm.", "z-lab DFlash"))


def _neutral(value, neutral: tuple) -> bool:
    return any(value is v or (type(value) is type(v) and value == v) for v in neutral)


def claims(hf: dict, path: str) -> bool:
    """True when config.json names LlamaForCausalLMEagle3; a one-line error when its
    `architectures` and its fields name different layouts (either way round)."""
    archs = [str(a) for a in hf.get("architectures") or []]
    seen = looks_like(hf)
    if ARCH not in archs:
        if seen == LAYOUT and not any("DFlash" in a for a in archs):
            raise DSparkError(f"{path}: looks like an {LAYOUT} folder (it has draft_vocab_size or eagle_config) but "
                              f"architectures says {archs}; an {LAYOUT} folder says [\"{ARCH}\"]")
        return False
    if seen not in (LAYOUT, None):
        raise DSparkError(f"{path}: architectures says {ARCH} ({LAYOUT} layout) but the folder looks like a {seen} "
                          f"folder; an {LAYOUT} config holds draft_vocab_size and no target_layer_ids")
    return True


def default_taps(num_target_layers: int) -> tuple[int, ...]:
    """EAGLE's / SGLang's default: the inputs of decoder layers 2, L // 2 and L - 3, as
    tap ids here (a decoder layer's output): 1, L // 2 - 1, L - 4."""
    return tuple(i - 1 for i in (2, num_target_layers // 2, num_target_layers - 3))


def _refuse_switches(hf: dict, path: str) -> None:
    ecfg = hf.get("eagle_config") if isinstance(hf.get("eagle_config"), dict) else {}
    for where, fields, known in (("", hf, SWITCHES), ("eagle_config.", ecfg, EAGLE_CONFIG_SWITCHES)):
        for name, neutral in known.items():
            if name in fields and not _neutral(fields[name], neutral):
                raise DSparkError(f"{path}: {where}{name} = {fields[name]!r} is not supported for {LAYOUT} drafters "
                                  f"(only {' or '.join(repr(v) for v in neutral)})")
    if hf.get("num_hidden_layers", 1) != 1:
        raise DSparkError(f"{path}: num_hidden_layers = {hf['num_hidden_layers']} is not supported for {LAYOUT} "
                          "drafters (one midlayer)")
    ths = hf.get("target_hidden_size")
    if ths is not None and ths != hf.get("hidden_size"):
        raise DSparkError(f"{path}: target_hidden_size = {ths} is not supported (only the draft hidden_size "
                          f"{hf.get('hidden_size')})")


def layout_config(hf: dict, path: str, tcfg, dtype: str | None) -> tuple[eagle3.Eagle3Config, int]:
    """(Eagle3Config with a LlamaConfig arch, draft_vocab_size) of an EAGLE-3 config.json."""
    _refuse_switches(hf, path)
    arch = LlamaConfig.from_hf(dict(hf, model_type="llama"), path, dtype).replace(tie_word_embeddings=False)
    draft_vocab = hf.get("draft_vocab_size", arch.vocab_size)
    if not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= arch.vocab_size:
        raise DSparkError(f"{path}: draft_vocab_size {draft_vocab!r} is not in 1..vocab_size {arch.vocab_size}")
    ecfg = hf.get("eagle_config") if isinstance(hf.get("eagle_config"), dict) else {}
    ids = ecfg.get("eagle_aux_hidden_state_layer_ids")
    taps = default_taps(tcfg.num_hidden_layers) if ids is None else tuple(int(i) for i in ids)
    if len(taps) != 3:
        raise DSparkError(f"{path}: eagle_aux_hidden_state_layer_ids {list(taps)} must name 3 target layers")
    return eagle3.Eagle3Config(arch=arch, target_layer_ids=taps, ttt_length=7, block_size=7), draft_vocab


class EagleLayoutModule(eagle3.Eagle3Module):
    """Eagle3Module named as the EAGLE-3 checkpoint: `midlayer`, `lm_head` over the draft
    vocabulary, a `d2t` int32 parameter, and `embed_tokens` only when the folder has it."""

    draft_vocab: int = 0
    own_embedding: bool = True

    def setup(self):
        a, dt = self.cfg.arch, self.cfg.arch.jnp_dtype
        if self.own_embedding:
            self.embed_tokens = embedding(a.vocab_size, a.hidden_size, dt, "embed_tokens")
        self.fc = Proj((a.hidden_size,), ("mlp", "embed"), dtype=dt)
        self.layers = [eagle3.Eagle3Layer(a, name="midlayer")]
        self.norm = self.make_norm()
        self.lm_head = Proj((self.draft_vocab,), ("embed", None), dtype=dt)
        self.d2t = self.param("d2t", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                              (self.draft_vocab,), jnp.int32)

    def __call__(self, feats, tokens, q_lens):
        """Initialisation pass: touches every parameter, returns the features."""
        del tokens, q_lens
        h = self.project(feats)
        emb = self.embed_tokens(jnp.zeros(h.shape[:-1], jnp.int32)) if self.own_embedding else h
        h, _ = self.decode_embedded(h, emb, jnp.zeros(h.shape[:-1], jnp.int32), jnp.ones(h.shape[:-1], bool))
        return self.logits(h), self.d2t

    def logits(self, h):
        """Pre-norm hidden [..., D] -> full-vocabulary logits [..., V] float32: the draft
        logits at ids draft id + d2t[draft id], -inf at every other id."""
        small = self.lm_head(self.norm(h)).astype(jnp.float32)
        ids = jnp.arange(self.draft_vocab, dtype=jnp.int32) + self.d2t
        full = jnp.full(small.shape[:-1] + (self.cfg.arch.vocab_size,), -jnp.inf, jnp.float32)
        return full.at[..., ids].set(small)


@dataclasses.dataclass(frozen=True)
class EagleLayoutDrafter(eagle3.Eagle3Drafter):
    """An Eagle3Drafter over an EAGLE-3 folder's parameters (see the module docstring)."""

    draft_vocab: int = 0
    own_embedding: bool = True

    @property
    def module(self) -> EagleLayoutModule:
        return EagleLayoutModule(self.cfg, draft_vocab=self.draft_vocab, own_embedding=self.own_embedding)

    def decode(self, dparams, tparams, g, tokens, positions, valid, kv):
        """The cached decode on the folder's embedding, or the target's when it has none."""
        if self.own_embedding:
            return super().decode(dparams, tparams, g, tokens, positions, valid, kv)
        emb = tparams["embed_tokens"]["embedding"][tokens].astype(self.cfg.arch.jnp_dtype)
        return self.module.apply({"params": dparams}, g, emb, positions, valid, kv, method="decode_embedded")


def _rename(path: tuple[str, ...]) -> str:
    return checkpoints.tensor_name(path, prefix="")


def check_maps(d2t: np.ndarray, index, vocab: int, folder: str) -> None:
    """d2t must send the draft vocabulary to distinct target ids, and t2d (when present)
    must mark exactly those ids."""
    ids = np.arange(d2t.shape[0]) + d2t
    if ids.min() < 0 or ids.max() >= vocab or np.unique(ids).size != ids.size:
        raise DSparkError(f"{folder}: d2t does not map the {d2t.shape[0]} draft ids to distinct ids of the "
                          f"{vocab}-token vocabulary (target id = draft id + d2t[draft id])")
    if "t2d" in index:
        t2d = np.asarray(index["t2d"]).astype(bool)
        if t2d.shape != (vocab,) or set(np.flatnonzero(t2d).tolist()) != set(ids.tolist()):
            raise DSparkError(f"{folder}: t2d does not mark exactly the target ids that d2t maps to")


def load_eagle_layout(folder: str, tcfg, *, gamma: int | None, dtype: str, hf: dict):
    """(EagleLayoutDrafter, params as numpy) from an EAGLE-3 folder, checked against the
    target config; gamma defaults to 7 (the DeepSpec Eagle3 default)."""
    path = os.path.join(folder, "config.json")
    if not isinstance(tcfg, Qwen3Config):
        raise DSparkError(f"{folder}: {LAYOUT} drafters are supported for Qwen3 and Llama 3 targets; the target's "
                          f"config is a {type(tcfg).__name__}")
    cfg, draft_vocab = layout_config(hf, path, tcfg, dtype)
    index = open_folder(folder)
    for name in index:
        for prefix, layout in _FOREIGN_TENSORS:
            if name.startswith(prefix):
                raise DSparkError(f"{folder}: tensor {name} belongs to the {layout} layout, not {LAYOUT}; "
                                  "check the folder's architectures")
    gamma = cfg.block_size if gamma is None else int(gamma)
    eagle3.check_fits_target(cfg, tcfg, gamma, path)
    drafter = EagleLayoutDrafter(cfg=cfg, tcfg=tcfg, gamma=gamma, draft_vocab=draft_vocab,
                                 own_embedding="embed_tokens.weight" in index)
    template, _ = drafter.param_shapes_and_axes()
    template = dict(template)
    template.pop("d2t")
    params = checkpoints.load_tree(index, template, dtype=cfg.arch.jnp_dtype, rename=_rename, folder=folder)
    if "d2t" in index:
        d2t = np.asarray(index["d2t"]).astype(np.int64)
        if d2t.shape != (draft_vocab,):
            raise DSparkError(f"{folder}: d2t has shape {list(d2t.shape)}, not [{draft_vocab}] (draft_vocab_size)")
    elif draft_vocab == cfg.arch.vocab_size:
        d2t = np.zeros(draft_vocab, np.int64)  # the reference drops the maps of a full draft vocabulary
    else:
        raise DSparkError(f"{folder}: tensor d2t is missing (draft_vocab_size {draft_vocab} < vocab_size "
                          f"{cfg.arch.vocab_size})")
    check_maps(d2t, index, cfg.arch.vocab_size, folder)
    params = dict(params, d2t=d2t.astype(np.int32))
    return drafter, params
