"""Will one training step fit? Peak bytes per device, checked before the first step.

- `abstract_estimate` works from shapes alone (`jax.eval_shape`, nothing allocated):
  drafter parameters and their gradients, the optimizer state (all float32, split as the
  training mesh rules split them), the target's parameters as placed, and the
  activations one batch keeps for the backward pass (the residuals of `jax.vjp` of the
  loss, divided over the `data` axis; counted before XLA fuses them, so an upper bound).
- `compiled_estimate`: arguments + outputs - donated aliases + temporaries from the
  compiled step's `memory_analysis()`, where the backend reports it (XLA's own figure).

The trainer checks the state part of the first before allocating the drafter state,
then the second once the step is compiled (the first, activations included, where the
backend reports no analysis). The limit is `memory_limit_mb` when set, else the device's
`bytes_limit` on an accelerator, else (CPU) the host's `MemAvailable` shared by the
mesh's devices on this host. A step over it is refused with one line naming the
estimate, the limit and the config fields that lower it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from dspark_jax import mesh as mesh_lib
from dspark_jax.errors import DSparkError

MiB = 2 ** 20


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / MiB:.1f} MiB"


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs): each leaf's
    shard shape where it carries a sharding, its whole shape otherwise."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak bytes per device of one training step and where they come from."""

    peak: int
    parts: dict            # name -> bytes per device
    source: str            # "eval_shape" or "compiled step"

    def describe(self) -> str:
        return ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v)


def abstract_state(drafter, tx, seed: int, mesh):
    """(params, opt_state) as ShapeDtypeStructs; params carry their training shardings."""
    from train import step as step_lib

    state = jax.eval_shape(lambda: step_lib.init_state(drafter, tx, seed))
    _, axes = drafter.param_shapes_and_axes()
    shardings = mesh_lib.tree_shardings(axes, state.params, mesh, mesh_lib.TRAINING_RULES)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.params, shardings)
    return params, state.opt_state


def activation_bytes(drafter, tcfg, cfg, params, tparams, batch_shapes) -> int:
    """Bytes of the residuals the loss keeps for its backward pass, for one global batch:
    the outputs of `jax.vjp`'s traced program that are not its inputs (traced, not run)."""
    from jax.extend.core import Var

    from train import step as step_lib

    loss = functools.partial(step_lib.loss_fn, drafter=drafter, tcfg=tcfg, cfg=cfg)

    def residuals(p, tp, batch):
        key = jax.random.key(0)
        _, vjp = jax.vjp(lambda q: loss(q, tp, batch, key)[0], p)
        return vjp            # a pytree whose leaves are the residuals

    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, tparams))
    jaxpr = jax.make_jaxpr(residuals)(*plain, batch_shapes).jaxpr
    inputs = set(jaxpr.invars)
    kept = {v for v in jaxpr.outvars if isinstance(v, Var) and v not in inputs}
    return sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize for v in kept)


def abstract_estimate(cfg, drafter, tcfg, tx, tparams, mesh, *, activations: bool = True) -> Estimate:
    """The step's peak per device from shapes alone (see the module docstring); without
    `activations`, the resident state only (drafter state and target)."""
    params, opt_state = abstract_state(drafter, tx, cfg.seed, mesh)
    p_dev, p_all = per_device_bytes(params), _total_bytes(params)
    opt_dev = _total_bytes(opt_state) * p_dev // max(p_all, 1)     # moments follow the params' split
    parts = {"drafter params + grads": 2 * p_dev, "optimizer": opt_dev, "target": per_device_bytes(tparams)}
    if activations:
        b = cfg.batch_size
        batch = {"input_ids": jax.ShapeDtypeStruct((b, cfg.seq_len), np.int32),
                 "loss_mask": jax.ShapeDtypeStruct((b, cfg.seq_len), np.int32),
                 "lengths": jax.ShapeDtypeStruct((b,), np.int32)}
        parts["activations"] = activation_bytes(drafter, tcfg, cfg, params, tparams, batch) // mesh.shape["data"]
    return Estimate(peak=sum(parts.values()), parts=parts, source="eval_shape")


def compiled_estimate(step_fn, *args) -> Estimate | None:
    """The step's peak per device from its compiled program's memory analysis (None where
    the backend reports none). Compiling here costs nothing extra: the jitted `step_fn`
    called with arguments of the same shapes and shardings reuses this executable."""
    compiled = step_fn.lower(*args).compile()
    try:
        ma = compiled.memory_analysis()
    except Exception:  # backends without the analysis raise or return None
        ma = None
    if ma is None:
        return None
    parts = {"arguments": int(ma.argument_size_in_bytes),
             "outputs not donated": max(0, int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)),
             "temporaries": int(ma.temp_size_in_bytes)}
    return Estimate(peak=sum(parts.values()), parts=parts, source="compiled step")


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_limit(cfg, mesh) -> tuple[int | None, str]:
    """(bytes one device may use, what that is) for this config and mesh."""
    if cfg.memory_limit_mb > 0:
        return cfg.memory_limit_mb * MiB, "memory_limit_mb"
    dev = mesh.devices.flat[0]
    if dev.platform == "cpu":
        avail = host_available_bytes()
        local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        if avail is None:
            return None, "host RAM"
        return avail // max(local, 1), f"host RAM available, shared by {local} CPU device(s)"
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some runtimes do not implement memory_stats
        limit = None
    return (int(limit) if limit else None), f"{dev.device_kind} memory"


def check(est: Estimate | None, limit: tuple[int | None, str], cfg) -> None:
    """Raise a one-line DSparkError when the estimate exceeds the limit."""
    nbytes, what = limit
    if est is None or nbytes is None or cfg.memory_limit_mb < 0 or est.peak <= nbytes:
        return
    raise DSparkError(
        f"one training step needs about {gib(est.peak)} per device ({est.describe()}; from the {est.source}) "
        f"but a device has {gib(nbytes)} ({what}); lower batch_size ({cfg.batch_size}), seq_len ({cfg.seq_len}) "
        f"or num_anchors ({cfg.num_anchors}), or draft_layers / draft_intermediate_size, or use a larger mesh "
        f"(now {cfg.mesh}); memory_limit_mb=-1 skips this check")
