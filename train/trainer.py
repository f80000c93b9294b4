"""The training loop: mesh, sharded state, data, checkpoints, logs, export.

`run(cfg)` trains (or resumes) a drafter and exports it in the DeepSpec layout to
`<out_dir>/drafter`. The same code runs on one CPU and on every host of a pod: each host
loads its own slice of every batch and the global arrays are assembled from those.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dspark_jax import checkpoints, mesh as mesh_lib, target
from dspark_jax.drafters import loading
from train import data, step as step_lib
from train.checkpointing import Checkpointer
from train.loader import BatchLoader


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines from after the checkpoint (they will be re-made)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def setup(cfg):
    """(mesh, tcfg, tparams, drafter, tx, state, train_step, loader) for a config."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.TRAINING_RULES
    tcfg, tparams = target.load(cfg.target, cfg.compute_dtype)
    tparams = target.shard(tcfg, tparams, mesh, rules)
    drafter = step_lib.build_drafter(cfg, tcfg, step_lib.mask_token_id(cfg, cfg.target, tcfg.vocab_size))
    tx = step_lib.optimizer(cfg)
    _, axes = drafter.param_shapes_and_axes()
    init = step_lib.init_state(drafter, tx, cfg.seed)
    params = mesh_lib.shard_tree(init.params, axes, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_state = place_unsharded(jax.jit(tx.init)(params), rep)
    state = init.replace(params=params, opt_state=opt_state, step=jax.device_put(init.step, rep),
                         rng=jax.device_put(init.rng, rep))
    splits = data.load(cfg.data_dir, cfg.dataset)
    loader = BatchLoader(splits["train"], global_batch=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())
    train_step = step_lib.make_train_step(drafter, tcfg, cfg, tx)
    return mesh, tcfg, tparams, drafter, state, train_step, loader


def place_unsharded(tree, replicated: NamedSharding):
    """Put leaves that jit left on one device (e.g. optimizer step counters) on the mesh,
    replicated, so the step's inputs already carry its output shardings (no recompile)."""
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                        tree)


def global_batch(local: dict, mesh) -> dict:
    """Per-host numpy batches -> global jax arrays sharded over `data`."""
    out = {}
    for k, v in local.items():
        spec = PartitionSpec("data", *([None] * (v.ndim - 1)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
    return out


def run(cfg, *, progress: bool = True, stop_after: int | None = None, export: bool = True):
    """Train to cfg.steps (resuming from the latest checkpoint). `stop_after` ends the
    loop early at that step without exporting, as a killed run would (tests)."""
    from tqdm import tqdm

    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    mesh, tcfg, tparams, drafter, state, train_step, loader = setup(cfg)
    ckpt = Checkpointer(cfg.out_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        start = int(meta["data_position"])
        _truncate_log(log_path, start)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {drafter.kind}", unit="step",
               disable=not progress or jax.process_index() != 0)
    t0, last = time.perf_counter(), start
    metrics = {}
    for s in range(start, end):
        state, metrics = train_step(state, tparams, global_batch(loader.batch(s), mesh))
        done = s + 1
        if done % cfg.log_every == 0 or done == end:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            m.update(step=done, steps_per_second=(done - last) / (now - t0))
            t0, last = now, done
            if jax.process_index() == 0:
                _log(log_path, m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accept_rate']:.3f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            ckpt.save(done, state, {"data_position": done, "step": done, "config": json.loads(cfg.to_json())})
        bar.update(1)
    bar.close()
    ckpt.close()
    if export and end == cfg.steps:
        export_drafter(cfg, drafter, state.params, tparams)
    return state, drafter


def export_drafter(cfg, drafter, params, tparams=None) -> str:
    """Write the trained drafter to <out_dir>/drafter in the DeepSpec layout.

    Collective on multi-host runs (every process gathers the sharded parameters);
    process 0 writes. The target's embedding and LM head copies are read from its folder.
    """
    from jax.experimental import multihost_utils

    from dspark_jax.safetensors_io import open_folder

    folder = os.path.join(cfg.out_dir, "drafter")
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    if jax.process_index() == 0:
        index = open_folder(cfg.target)
        head = {"embed_tokens": {"embedding": np.asarray(index["model.embed_tokens.weight"], np.float32)}}
        if "lm_head.weight" in index:
            head["lm_head"] = {"kernel": np.asarray(index["lm_head.weight"], np.float32).T}
        if drafter.kind == "eagle3":
            from dspark_jax.drafters.eagle3 import save_eagle3
            from train.eagle3_objective import with_target_head

            # Eagle3 trained with the target's frozen embedding and LM head: export those
            save_eagle3(folder, drafter, with_target_head(host_params, head, drafter.tcfg),
                        checkpoints.read_config(cfg.target))
        else:
            loading.save_block_drafter(folder, drafter, host_params, checkpoints.read_config(cfg.target), head)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(cfg.target, name)
            if os.path.exists(src):
                with open(src, "rb") as f, open(os.path.join(folder, name), "wb") as g:
                    g.write(f.read())
    return folder
