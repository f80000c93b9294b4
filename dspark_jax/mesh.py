"""One mesh for everything, and the only place where logical axes meet mesh axes.

Model code names logical axes only (`batch`, `embed`, `heads`, ...). This module maps
them onto a two-axis device mesh `(data, model)` built from a string `DATAxMODEL`:

    mesh = make_mesh("4x2")                       # 4-way data x 2-way model parallel
    params = shard_tree(params, param_axes, mesh, SERVING_RULES)

Two rule tables exist: serving (weights tensor-parallel over `model`, replicated over
`data`) and training (additionally FSDP: the `embed` dimension of weights split over
`data`). A mesh axis that does not divide a dimension is dropped for that array (it is
replicated along that axis instead): tiny test models then still run on any mesh.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dspark_jax.errors import DSparkError

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None = replicated)
SERVING_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("expert", "model"),  # expert parallelism: the X axis of MoE expert weights
    ("group_width", "model"),  # inside a grouped projection: split when the groups are fewer than `model`
    ("embed", None),
    ("head_dim", None),
    ("seq", None),
    ("cache_seq", None),
    ("layers", None),
    ("norm", None),
    ("rank", None),
    ("joint", None),  # concatenated inputs of small heads ([h; e], [s; e; h])
)

# FSDP over `data` on the embed dimension of weights; activations still shard batch.
TRAINING_RULES: tuple[tuple[str, str | None], ...] = tuple(
    (name, "data" if name == "embed" else axis) for name, axis in SERVING_RULES)

_MESH_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_mesh(spec: str) -> tuple[int, int]:
    """`"4x2"` -> `(4, 2)`; anything else raises a one-line DSparkError."""
    m = _MESH_RE.match(str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise DSparkError(f"mesh must look like DATAxMODEL with positive sizes (e.g. 8x1, 4x2); got '{spec}'")
    return int(m.group(1)), int(m.group(2))


def simulate_cpu_devices(count: int) -> None:
    """Ask XLA for `count` host devices; only effective before jax initialises a backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def make_mesh(spec: str = "1x1", devices=None) -> Mesh:
    """Build the `(data, model)` mesh for a `DATAxMODEL` string.

    Uses the first DATA*MODEL devices. On a CPU-only machine call
    `simulate_cpu_devices(n)` before jax is first used to get more than one device.
    """
    data, model = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need > len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                    "before jax starts)")
        raise DSparkError(f"mesh {data}x{model} needs {need} devices but {len(devices)} are available{hint}")
    grid = np.array(devices[:need], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical: tuple | PartitionSpec | None, shape: tuple[int, ...], mesh: Mesh,
                    rules=SERVING_RULES) -> PartitionSpec:
    """Translate one array's logical axis names into a PartitionSpec on `mesh`.

    A mesh axis is used at most once per array and only where it divides the dimension.
    """
    if logical is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(tuple(logical), shape):
        axis = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise DSparkError(f"logical axis '{name}' has no mesh rule; add it to dspark_jax/mesh.py")
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return PartitionSpec(*out)


def _is_axes(x) -> bool:
    return x is None or isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=SERVING_RULES):
    """NamedSharding for every leaf of `shapes_tree`, from a parallel tree of logical axes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, np.shape(x), mesh, rules)),
        axes_tree, shapes_tree, is_leaf=_is_axes)


def shard_tree(tree, axes_tree, mesh: Mesh, rules=SERVING_RULES):
    """`device_put` every array of `tree` with the sharding its logical axes ask for."""
    return jax.device_put(tree, tree_shardings(axes_tree, tree, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Shard dimension 0 (the batch) over `data` when it divides, replicate the rest."""
    axes = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, (batch_size,) + (1,) * (ndim - 1), mesh))
