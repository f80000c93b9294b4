"""Train a Qwen3-architecture target (next-token loss) from scratch, or continue an
exported one (`init_from`, with a fresh optimizer and schedule), and export it as a Hugging
Face folder. Used to build the bundled demo target with the project's own code.

    python -m train.pretrain --config configs/demo_target.py --set steps=2000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dspark_jax import checkpoints, mesh as mesh_lib, target
from dspark_jax.config import Qwen3Config
from dspark_jax.errors import DefaultsFormatter, DSparkError, cli_errors
from train import data
from train.checkpointing import Checkpointer
from train.config import _coerce, import_config
from train.loader import BatchLoader, PackedLoader
from train.step import TrainState, optimizer
from train.trainer import _log, _truncate_log, global_batch, place_unsharded
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    tokenizer_dir: str = ""               # folder with tokenizer.json (copied into the export)
    data_dir: str = ""
    dataset: str = ""
    init_from: str = ""                   # a Hugging Face folder of this shape to continue from (fresh optimizer)
    model: Qwen3Config = dataclasses.field(default_factory=lambda: Qwen3Config(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
        tie_word_embeddings=True, max_position_embeddings=1024))
    seq_len: int = 256
    batch_size: int = 16
    pack: bool = False                    # rows packed end to end with conversations (train.loader.PackedLoader)
    steps: int = 1000
    lr: float = 2e-3
    warmup_frac: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    compute_dtype: str = "float32"
    export_dtype: str = "bfloat16"
    mesh: str = "1x1"
    seed: int = 0
    out_dir: str = "runs/target"
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 20
    async_checkpoint: bool = True

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def lm_loss(params, batch, *, cfg: Qwen3Config):
    dt = cfg.jnp_dtype
    p = jax.tree.map(lambda x: x.astype(dt), params)
    ids, lengths = batch["input_ids"], batch["lengths"]
    hidden, _, _ = target.forward(cfg, p, ids, lengths)
    logits = target.logits(cfg, p, hidden[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mask = (jnp.arange(ids.shape[1] - 1)[None] < (lengths - 1)[:, None]).astype(jnp.float32)
    answer = batch["loss_mask"][:, 1:].astype(jnp.float32) * mask
    loss = jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)
    answer_loss = jnp.sum(nll * answer) / jnp.maximum(answer.sum(), 1)
    return loss, {"loss": loss, "answer_loss": answer_loss}


def make_step(cfg: Qwen3Config, tx):
    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: TrainState, batch):
        (_, metrics), grads = jax.value_and_grad(lm_loss, has_aux=True)(state.params, batch, cfg=cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), dict(metrics, grad_norm=optax.tree.norm(grads))
    return step


def run(pc: PretrainConfig, progress: bool = True, stop_after: int | None = None):
    """Train to pc.steps (resuming from the latest checkpoint) and export; `stop_after`
    ends the loop early at that step without exporting, as a killed run would (tests)."""
    from tqdm import tqdm

    os.makedirs(pc.out_dir, exist_ok=True)
    mesh = mesh_lib.make_mesh(pc.mesh)
    cfg = pc.model.replace(dtype=pc.compute_dtype)
    tx = optimizer(pc)
    shapes, axes = target.param_shapes_and_axes(cfg)
    params = (continued_params(pc) if pc.init_from else
              target.init_params(cfg.replace(dtype="float32"), jax.random.key(pc.seed)))
    params = mesh_lib.shard_tree(params, axes, mesh, mesh_lib.TRAINING_RULES)
    rep = NamedSharding(mesh, PartitionSpec())
    state = place_unsharded(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                       opt_state=jax.jit(tx.init)(params),
                                       rng=jax.random.key_data(jax.random.key(pc.seed))), rep)
    loader = (PackedLoader if pc.pack else BatchLoader)(
        data.load(pc.data_dir, pc.dataset)["train"], global_batch=pc.batch_size, seq_len=pc.seq_len,
        seed=pc.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        vocab_size=cfg.vocab_size)
    ckpt = Checkpointer(pc.out_dir, keep=pc.keep_checkpoints, async_save=pc.async_checkpoint)
    log_path = os.path.join(pc.out_dir, "metrics.jsonl")
    start = 0
    shape = {f"model.{k}": v for k, v in dataclasses.asdict(pc.model).items() if k != "dtype"}
    if ckpt.latest_step() is not None:   # a checkpoint of another model shape is refused in one line
        state, meta = ckpt.restore(ckpt.latest_step(), state, config=shape, shape_fields=tuple(shape))
        start = int(meta["data_position"])
        _truncate_log(log_path, start)
    step = make_step(cfg, tx)
    bar = tqdm(total=pc.steps, initial=start, desc="pretrain target", unit="step", disable=not progress)
    end = pc.steps if stop_after is None else min(pc.steps, stop_after)
    for s in range(start, end):
        state, metrics = step(state, global_batch(loader.batch(s), mesh))
        done = s + 1
        if done % pc.log_every == 0 or done == pc.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m["step"] = done
            _log(log_path, m)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        if done % pc.ckpt_every == 0 or done == pc.steps:
            ckpt.save(done, state, {"data_position": done, "step": done, "config": shape})
        bar.update(1)
    bar.close()
    ckpt.close()
    return export(pc, state.params) if end == pc.steps else None


def continued_params(pc: PretrainConfig):
    """The float32 parameters of `pc.init_from`, refused in one line unless it is a target
    of `pc.model`'s shape (the run continues training it with a fresh optimizer)."""
    if not os.path.exists(os.path.join(pc.init_from, "config.json")):
        raise DSparkError(f"init_from {pc.init_from}: no config.json there (expected an exported target folder)")
    cfg, params = target.load(pc.init_from, "float32")
    want = pc.model.replace(dtype="float32")
    if not isinstance(cfg, Qwen3Config) or cfg.replace(dtype="float32") != want:
        diff = [f"{k} {getattr(cfg, k, None)} there, {v} now" for k, v in dataclasses.asdict(want).items()
                if getattr(cfg, k, None) != v and k != "dtype"]
        raise DSparkError(f"init_from {pc.init_from}: another architecture ({'; '.join(diff) or type(cfg).__name__})")
    return jax.device_get(params)


def export(pc: PretrainConfig, params) -> str:
    """<out_dir>/model: config.json + model.safetensors + tokenizer files."""
    folder = os.path.join(pc.out_dir, "model")
    os.makedirs(folder, exist_ok=True)
    cfg = pc.model.replace(dtype=pc.export_dtype)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    checkpoints.save_tensors(checkpoints.to_tensors(host, dtype=cfg.jnp_dtype), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        src = os.path.join(pc.tokenizer_dir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(folder, name))
    return folder


def load_pretrain_config(path: str | None, sets: list[str]) -> PretrainConfig:
    import typing

    pc = import_config(path, PretrainConfig) if path else PretrainConfig()
    hints = typing.get_type_hints(PretrainConfig)
    model_hints = typing.get_type_hints(Qwen3Config)
    for item in sets:
        if "=" not in item:
            raise DSparkError(f"--set takes key=value; got '{item}'")
        key, value = (x.strip() for x in item.split("=", 1))
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in model_hints:
                raise DSparkError(f"--set {key}: no such model field")
            pc = pc.replace(model=pc.model.replace(**{name: _coerce(key, value, model_hints[name])}))
        elif key in hints and key != "model":
            pc = pc.replace(**{key: _coerce(key, value, hints[key])})
        else:
            raise DSparkError(f"--set {key}: no such config field (see train/pretrain.py)")
    if not pc.data_dir or not pc.dataset or not pc.tokenizer_dir:
        raise DSparkError("set data_dir, dataset and tokenizer_dir (config file or --set)")
    return pc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--config",
                   help="a Python file defining CONFIG = PretrainConfig(...) (default: PretrainConfig's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, model.* for the target's shape (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    with cli_errors("train.pretrain"):
        pc = load_pretrain_config(args.config, args.set)
        d, m = mesh_lib.parse_mesh(pc.mesh)
        mesh_lib.simulate_cpu_devices(d * m)
        print(f"target exported to {run(pc, progress=not args.no_progress)}")


if __name__ == "__main__":
    main()
