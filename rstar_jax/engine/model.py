"""A model made ready for the engine: parameters placed on the mesh straight from the host, shard by shard, by
the rules table; then cast to the compute dtype, the layer stack split into per-layer trees (each weight read in
place) and, on the CPU path, projections stored [in, out] (`backends.cpu`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rstar_jax import sharding
from rstar_jax.backends import cpu
from rstar_jax.config import MeshSection
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import unstack_layers
from rstar_jax.models.params import Params


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    params: Params  # per-layer list under model.layers, in the compute dtype, on `mesh`
    cfg: ModelConfig
    mesh: jax.sharding.Mesh
    tuned: bool  # the CPU path (`backends.cpu.tuned()` when it was prepared)

    @property
    def dtype(self) -> Any:
        return self.params["model"]["embed_tokens"]["weight"].dtype


def single_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(MeshSection(data=1), jax.local_devices()[:1])


def load_policy(spec: str, inference, mesh: jax.sharding.Mesh):
    """(the loaded model, its `InferenceModel`): weights read once, placed straight into their shards on `mesh` and
    laid out for the engine in `inference.dtype` (`inference`: a command's `config.InferenceConfig`)."""
    from rstar_jax.models.hf_io import load_model

    lm = load_model(spec, dtype="float32", mesh=mesh, min_shard_elements=inference.mesh.min_shard_elements)
    return lm, prepare(lm.params, lm.cfg, inference.dtype, mesh=mesh,
                       min_shard_elements=inference.mesh.min_shard_elements)


def _layout(params: Params, dtype: Any, tuned: bool) -> Params:
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    layers = cast["model"]["layers"]
    layers = unstack_layers(layers) if isinstance(layers, dict) else layers
    cast["model"]["layers"] = [cpu.transpose_weights(layer) if tuned else layer for layer in layers]
    return cast


def prepare(params: Params, cfg: ModelConfig, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
            tuned: bool | None = None, min_shard_elements: int = MeshSection().min_shard_elements) -> InferenceModel:
    """`params` in the stacked layout of `models.params` (host numpy or device arrays)."""
    mesh = mesh if mesh is not None else single_device_mesh()
    tuned = cpu.tuned() if tuned is None else tuned
    if isinstance(params["model"]["layers"], dict):
        params = sharding.place_params(params, mesh, min_shard_elements)
    out = jax.jit(_layout, static_argnums=(1, 2), donate_argnums=())(params, jnp.dtype(dtype), tuned)
    return InferenceModel(out, cfg, mesh, tuned)

