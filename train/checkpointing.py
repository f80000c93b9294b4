"""Orbax checkpoints of the training state: periodic, asynchronous, resumable.

Each checkpoint holds the TrainState (step, float32 params, optimizer state, RNG) and a
JSON item with the data position and the config; the data position is the step (see
loader.py), stored explicitly so a reader needs no code to know where a run stands.

Restoring under a config whose parameter shapes differ from the checkpoint's is refused
in one line naming the fields that differ (read from the checkpoint's own config record
before the state is touched), instead of Orbax's structure-mismatch traceback.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dspark_jax.errors import DSparkError


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like_state, *, config: dict | None = None, shape_fields=(), absent=None):
        """Restore into the shapes, dtypes and shardings of `like_state`; returns (state, meta).

        With `config` (the run's config as JSON data), a checkpoint whose recorded config
        differs in any of `shape_fields`, or whose arrays do not fit `like_state`, raises
        a one-line DSparkError naming the differing fields and how to start fresh. `absent`
        maps a shape field to the value a checkpoint that does not record it was made with
        (one written before the field existed); other unrecorded fields are not compared."""
        saved = {}
        if config is not None:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            saved = dict(absent or {}, **(meta.get("config") or {}))
            changed = [f for f in shape_fields if f in saved and saved[f] != config.get(f)]
            if changed:
                raise self._mismatch(step, changed, saved, config)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises several types for trees that do not match
            if config is None:
                raise
            changed = sorted(f for f in set(saved) | set(config) if saved.get(f) != config.get(f))
            raise self._mismatch(step, changed, saved, config, str(e).strip().splitlines()[0]) from None
        return out["state"], out["meta"]

    def _mismatch(self, step, changed, saved, config, detail="") -> DSparkError:
        diffs = ", ".join(f"{f} {saved.get(f)!r} there, {config.get(f)!r} now" for f in changed) or "no config field differs: was the target changed?"
        why = f" ({detail[:160]})" if detail else ""
        return DSparkError(
            f"the checkpoint at step {step} in {self.directory} holds another architecture than this config "
            f"({diffs}){why}; to start fresh use a new out_dir or delete {self.directory}, "
            "or resume with the checkpoint's values")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
