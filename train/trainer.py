"""The training loop: mesh, sharded state, data, checkpoints, logs, export.

`run(cfg)` trains (or resumes) a drafter and exports it in the DeepSpec layout to
`<out_dir>/drafter`, z-lab's to `<out_dir>/drafter_zlab`, EAGLE-3's to
`<out_dir>/drafter_eagle3` (cfg.export_layout; eagle3_layer=auto resolved first). The
same code runs on one CPU and on every host of a pod: each host loads its own slice of
every batch and the global arrays are assembled from those.

Guards before and during the run: the dataset's tokenizer must be the target's; the
step's memory per device is checked before the drafter state is allocated and again,
activations included, once the step is compiled (`train.memory`); a resumed checkpoint
must have this config's parameter shapes; a non-finite loss or gradient norm, tracked on
device and read at each log and checkpoint step, stops the run before any checkpoint or
export is written from that state. `metrics.jsonl` is cut back to the step the run
starts from, and an exported drafter's old STS calibration is set aside.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dspark_jax import checkpoints, mesh as mesh_lib, target
from dspark_jax.drafters import eagle3_export, zlab_export
from dspark_jax.drafters.folders import STS_FILE, save_block_drafter
from dspark_jax.errors import DSparkError
from train import data, memory, step as step_lib
from train.checkpointing import Checkpointer
from train.config import SHAPE_FIELDS, SHAPE_FIELDS_ABSENT, resolved
from train.loader import BatchLoader

STALE_STS = "sts_calibration.stale.json"


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: str, step: int) -> None:
    """Keep only log lines up to `step` (the step a run starts from): lines after it will
    be made again; a line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    with open(path, "w") as f:
        f.writelines(keep)


def setup(cfg, limit=None):
    """(mesh, tcfg, tparams, drafter, state, train_step, loader) for a config. With
    `limit` (from `memory.device_limit`), the drafter state and the target are checked
    against it from shapes before the drafter state is allocated."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.TRAINING_RULES
    tcfg, tparams = target.load(cfg.target, cfg.compute_dtype)
    splits = data.load(cfg.data_dir, cfg.dataset)
    data.check_tokenizer(cfg.data_dir, cfg.dataset, cfg.target, tcfg.vocab_size)
    loader = BatchLoader(splits["train"], global_batch=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         vocab_size=tcfg.vocab_size)
    tparams = target.shard(tcfg, tparams, mesh, rules)
    drafter = step_lib.build_drafter(cfg, tcfg, step_lib.mask_token_id(cfg, cfg.target, tcfg.vocab_size))
    tx = step_lib.optimizer(cfg)
    if limit is not None:    # the resident state, before it is allocated (activations: see run)
        memory.check(memory.abstract_estimate(cfg, drafter, tcfg, tx, tparams, mesh, activations=False), limit, cfg)
    _, axes = drafter.param_shapes_and_axes()
    init = step_lib.init_state(drafter, tx, cfg.seed)
    params = mesh_lib.shard_tree(init.params, axes, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_state = place_unsharded(jax.jit(tx.init)(params), rep)
    state = init.replace(params=params, opt_state=opt_state, step=jax.device_put(init.step, rep),
                         rng=jax.device_put(init.rng, rep))
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


@jax.jit
def _first_non_finite(first, metrics, step):
    """The first step whose loss or gradient norm was not finite (0: none yet), on device."""
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return jnp.where((first == 0) & ~ok, step, first)


def run(cfg, *, progress: bool = True, stop_after: int | None = None, export: bool = True):
    """Train to cfg.steps (resuming from the latest checkpoint). `stop_after` ends the
    loop early at that step without exporting, as a killed run would (tests)."""
    cfg = resolved(cfg)     # eagle3_layer=auto as the layer it builds (recorded, compared on resume)
    limit = memory.device_limit(cfg, mesh_lib.make_mesh(cfg.mesh))   # before this run allocates
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    mesh, tcfg, tparams, drafter, state, train_step, loader = setup(cfg, limit)
    if export:   # an export that cannot be faithful is refused before training, not after
        eagle3_export.check_exportable(drafter, eagle3_export.parse_layouts(cfg.export_layout))
    ckpt = Checkpointer(cfg.out_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    start = 0
    latest = ckpt.latest_step()
    cfg_json = json.loads(cfg.to_json())
    try:
        if latest is not None:
            state, meta = ckpt.restore(latest, state, config=cfg_json, shape_fields=SHAPE_FIELDS,
                                       absent=SHAPE_FIELDS_ABSENT)
            start = int(meta["data_position"])
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        if start < end:
            est = memory.compiled_estimate(train_step, state, tparams, global_batch(loader.batch(start), mesh))
            if est is None:      # no analysis from this backend: the traced upper bound
                est = memory.abstract_estimate(cfg, drafter, tcfg, step_lib.optimizer(cfg), tparams, mesh)
            memory.check(est, limit, cfg)
        if jax.process_index() == 0:
            _truncate_log(log_path, start)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                f.write(cfg.to_json())
            if latest is not None:
                print(f"resuming from step {start} of {cfg.steps} (checkpoint {ckpt.directory}/{latest})",
                      flush=True)
        state = _train(cfg, state, tparams, train_step, loader, mesh, ckpt, drafter, start, end, log_path,
                       progress)
    finally:
        ckpt.close()
    if export and end == cfg.steps:
        export_drafter(cfg, drafter, state.params, tparams)
    return state, drafter


def _train(cfg, state, tparams, train_step, loader, mesh, ckpt, drafter, start, end, log_path, progress):
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {drafter.kind}", unit="step",
               disable=not progress or jax.process_index() != 0)
    t0, last, saved = time.perf_counter(), start, start
    first_bad = jnp.zeros((), jnp.int32)
    for s in range(start, end):
        state, metrics = train_step(state, tparams, global_batch(loader.batch(s), mesh))
        done = s + 1
        first_bad = _first_non_finite(first_bad, metrics, done)   # on device: no host sync here
        log_now = done % cfg.log_every == 0 or done == end
        save_now = done % cfg.ckpt_every == 0 or done == cfg.steps
        if log_now:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            m.update(step=done, steps_per_second=(done - last) / (now - t0))
            t0, last = now, done
            if jax.process_index() == 0:
                _log(log_path, m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accept_rate']:.3f}")
        if log_now or save_now:
            bad = int(first_bad)
            if bad:
                bar.close()
                raise DSparkError(
                    f"the loss or gradient norm is not finite at step {bad}: training stopped at step {done}, "
                    f"nothing exported, no checkpoint written after step {saved}; lower lr ({cfg.lr}) or check "
                    "the data, then rerun (it resumes from the last checkpoint)")
        if save_now:
            ckpt.save(done, state, {"data_position": done, "step": done, "config": json.loads(cfg.to_json())})
            saved = done
        bar.update(1)
    bar.close()
    return state


def set_aside_sts(folder: str) -> None:
    """Rename a drafter folder's STS file (fitted to the weights about to be replaced)."""
    path = os.path.join(folder, STS_FILE)
    if os.path.exists(path):
        os.replace(path, os.path.join(folder, STALE_STS))
        print(f"moved the old {STS_FILE} (fitted to the previous weights) to {STALE_STS} in {folder}; "
              "run train.calibrate again for the new weights", flush=True)


def tparams_head(cfg) -> dict:
    """The target's embedding table (and untied LM head, [D, V]) read from its folder."""
    from dspark_jax.safetensors_io import open_folder

    index = open_folder(cfg.target)
    head = {"embed_tokens": {"embedding": np.asarray(index["model.embed_tokens.weight"], np.float32)}}
    if "lm_head.weight" in index:
        head["lm_head"] = {"kernel": np.asarray(index["lm_head.weight"], np.float32).T}
    return head


def export_drafter(cfg, drafter, params, tparams=None) -> str:
    """Write the trained drafter in each layout of cfg.export_layout: DeepSpec to
    <out_dir>/drafter, z-lab to <out_dir>/drafter_zlab, EAGLE-3 to <out_dir>/drafter_eagle3
    (refused in one line when not faithful). Returns the first folder written.

    Collective on multi-host runs (every process gathers the sharded parameters);
    process 0 writes. The target's embedding and LM head copies are read from its folder.
    """
    from jax.experimental import multihost_utils

    layouts = eagle3_export.parse_layouts(cfg.export_layout)
    eagle3_export.check_exportable(drafter, layouts)
    folder = os.path.join(cfg.out_dir, "drafter")
    suffix = {"deepspec": "", "zlab": zlab_export.ZLAB_SUFFIX, "eagle3": eagle3_export.EAGLE3_SUFFIX}
    folders = [folder + suffix[lay] for lay in layouts]
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    if jax.process_index() == 0 and "zlab" in layouts:
        zlab_export.save_zlab(folder + zlab_export.ZLAB_SUFFIX, drafter, host_params)
    if jax.process_index() == 0 and "eagle3" in layouts:   # with the target's embedding and LM head
        from train.eagle3_objective import with_target_head

        eagle3_export.save_eagle3_layout(folder + eagle3_export.EAGLE3_SUFFIX, drafter,
                                         with_target_head(host_params, tparams_head(cfg), drafter.tcfg))
    if jax.process_index() == 0 and "deepspec" in layouts:
        set_aside_sts(folder)
        v4 = type(drafter).__name__ == "DeepseekV4BlockDrafter"   # DeepSeek's mtp.* layout: no embedding, no head
        head = None if v4 else tparams_head(cfg)
        if v4:
            from dspark_jax.drafters.deepseek_v4_layout import save_folder

            save_folder(folder, drafter, host_params, checkpoints.read_config(cfg.target))
        elif drafter.kind == "eagle3":
            from dspark_jax.drafters.eagle3 import save_eagle3
            from train.eagle3_objective import with_target_head

            # Eagle3 trained with the target's frozen embedding and LM head: export those
            save_eagle3(folder, drafter, with_target_head(host_params, head, drafter.tcfg),
                        checkpoints.read_config(cfg.target))
        else:
            save_block_drafter(folder, drafter, host_params, checkpoints.read_config(cfg.target), head)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(cfg.target, name)
            if os.path.exists(src):
                with open(src, "rb") as f, open(os.path.join(folder, name), "wb") as g:
                    g.write(f.read())
    return folders[0]
