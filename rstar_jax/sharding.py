"""The mesh and THE logical-axis rules table (parameters, optimizer state, activations and the inference
engine's state), used by training, the engine and the reward scorer.

Model code and param layouts name logical axes (`embed`, `mlp`, `heads`, `vocab`, `batch`, ...);
`RULES` maps each to candidate mesh axes. A dimension takes its candidates minus mesh axes already used
by an earlier dimension of the same array, and drops them when the dimension does not divide evenly, so
the same table serves `[vocab, embed]` weights (vocab->tensor, embed->fsdp) and `[batch, length, embed]`
activations (batch->data+fsdp, embed left whole).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rstar_jax.config import MeshSection, RunConfigError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": (),
    "pair": (),
    "accum": (),
    # the inference engine's state: each data group (its slots and prompt entries) on one `data` shard
    "groups": ("data",),
    # parameters (and, through them, optimizer state)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "labels": (),
}


def resolve_mesh_shape(mesh: MeshSection, num_devices: int) -> tuple[int, int, int]:
    shape = list(mesh.shape)  # each size >= 1 or -1, at most one -1 (`MeshSection` checks)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise RunConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: {known} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise RunConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def make_mesh(mesh: MeshSection, devices: list | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
) -> PartitionSpec:
    """PartitionSpec for one array from its logical axes via `RULES` (see module docstring)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        cands = [a for a in RULES[name] if a not in used and mesh.shape[a] > 1] if name else []
        while cands and dim % math.prod(mesh.shape[a] for a in cands):
            cands.pop()
        used.update(cands)
        spec.append(None if not cands else cands[0] if len(cands) == 1 else tuple(cands))
    return PartitionSpec(*spec)


def param_specs(abstract_params: Any, axes_tree: Any, mesh, min_shard_elements: int) -> Any:
    """PartitionSpecs for parameters; small leaves (norms, biases) stay replicated."""

    def one(x, axes):
        if math.prod(x.shape) < min_shard_elements:
            return PartitionSpec()
        return logical_to_spec(axes, x.shape, mesh)

    return jax.tree.map(one, abstract_params, axes_tree, is_leaf=lambda a: isinstance(a, tuple))


def place_params(params: Any, mesh: jax.sharding.Mesh, min_shard_elements: int) -> Any:
    """Parameters in the stacked layout of `models.params` (host arrays) put on `mesh` by the rules table: each
    device receives only its own shard, never the whole model first."""
    from rstar_jax.models.params import logical_axes

    return jax.device_put(params, named(mesh, param_specs(params, logical_axes(params), mesh, min_shard_elements)))


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state: Any, specs_of_params: Any) -> Any:
    """Optimizer moments take their parameter's spec; counters and scalars are replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        abstract_opt_state,
        specs_of_params,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical axes under the mesh set with `jax.set_mesh` (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_specs(batch: dict[str, np.ndarray], mesh) -> dict[str, PartitionSpec]:
    """Host batches are `[A, B, ...]` (micro-batch, rows, ...): rows are split over the data axes."""
    return {k: logical_to_spec(("accum", "batch") + (None,) * (v.ndim - 2), v.shape, mesh) for k, v in batch.items()}


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Place a host batch (the same full batch on every process) onto the mesh."""
    specs = batch_specs(batch, mesh)
    return {
        k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]), lambda idx, v=v: v[idx])
        for k, v in batch.items()
    }


def init_distributed() -> None:
    """Join a multi-process run when the launch scripts asked for one (env), before any device is touched.

    RSTAR_COORDINATOR_ADDRESS / RSTAR_NUM_PROCESSES / RSTAR_PROCESS_ID: explicit (GPU hosts, local CPU tests);
    RSTAR_DISTRIBUTED=auto: let JAX detect the cluster (TPU VM pods, SLURM). Joins once per process.
    """
    if jax.distributed.is_initialized():
        return
    addr = os.environ.get("RSTAR_COORDINATOR_ADDRESS")
    if addr:
        try:
            n, pid = int(os.environ["RSTAR_NUM_PROCESSES"]), int(os.environ["RSTAR_PROCESS_ID"])
        except (KeyError, ValueError):
            raise RunConfigError(
                "RSTAR_COORDINATOR_ADDRESS is set but RSTAR_NUM_PROCESSES / RSTAR_PROCESS_ID are missing or not integers"
            ) from None
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    elif os.environ.get("RSTAR_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
