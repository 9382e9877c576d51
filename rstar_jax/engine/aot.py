"""The engine's programs lowered and compiled ahead of time on abstract inputs, for a model and mesh that need not
exist here (a 7B model on a pod's mesh, on fake CPU devices): what a pod run would compile, checked on a laptop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rstar_jax import sharding
from rstar_jax.config import MeshSection
from rstar_jax.engine import programs
from rstar_jax.engine.config import EngineConfig, Layout
from rstar_jax.engine.layers import PrefillRows
from rstar_jax.engine.model import InferenceModel
from rstar_jax.engine.state import KEY_SHAPE, SharedPrefix, _empty, state_shardings
from rstar_jax.engine.stops import MAX_CLASSES, StopTable
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import init_params, logical_axes


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any = jnp.bfloat16,
                   min_shard_elements: int = MeshSection().min_shard_elements) -> InferenceModel:
    """The plain-path inference parameters of `cfg` as shapes with their shardings (per-layer list layout)."""
    stacked = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=dtype))
    specs = sharding.param_specs(stacked, logical_axes(stacked), mesh, min_shard_elements)
    top = {k: v for k, v in stacked["model"].items() if k != "layers"}
    params = {**{k: v for k, v in stacked.items() if k != "model"}, "model": dict(top)}
    per_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked["model"]["layers"])
    layer_specs = jax.tree.map(lambda s: PartitionSpec(*s[1:]), specs["model"]["layers"],
                               is_leaf=lambda s: isinstance(s, PartitionSpec))
    params["model"]["layers"] = [per_layer] * cfg.num_hidden_layers
    param_specs = {**{k: v for k, v in specs.items() if k != "model"},
                   "model": {**{k: v for k, v in specs["model"].items() if k != "layers"},
                             "layers": [layer_specs] * cfg.num_hidden_layers}}
    return InferenceModel(_abstract(params, sharding.named(mesh, param_specs)), cfg, mesh, False)


def lower_programs(model: InferenceModel, config: EngineConfig, read: int | None = None,
                   shared_len: int = 512) -> dict[str, Any]:
    """`prefill` and `decode` of `model` (e.g. from `abstract_model`) lowered on abstract inputs, by name.
    `read`: prompt blocks the programs read (default: all)."""
    lay: Layout = config.layout(model.mesh.shape["data"])
    read = lay.blocks if read is None else read
    cfg, mesh, dtype = model.cfg, model.mesh, model.params["model"]["embed_tokens"]["weight"].dtype
    replicated = NamedSharding(mesh, PartitionSpec())
    rep = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)  # noqa: E731
    state = _abstract(jax.eval_shape(lambda: _empty(lay, cfg, dtype, False)),
                      state_shardings(lay, cfg, dtype, False, mesh))
    G, E, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    shared = SharedPrefix(tuple(rep((G, E, shared_len), dtype) for _ in range(L)),
                          tuple(rep((G, shared_len, E), dtype) for _ in range(L)), rep((shared_len,), bool),
                          rep((), jnp.int32))
    table = StopTable(rep((lay.stops, lay.stop_len), jnp.int32), rep((lay.stops, lay.stop_len), jnp.int32),
                      rep((MAX_CLASSES, cfg.vocab_size), bool), rep((lay.stops,), bool))
    D, R, C, M, K = lay.groups, lay.rows, lay.chunk, lay.stops, lay.lanes
    i32, f32 = np.int32, np.float32
    rows = PrefillRows(rep((D, R, C), i32), rep((D, R), i32), rep((D, R), i32), rep((D, R), i32), rep((D, R), bool),
                       rep((D, R), bool), rep((D, R, *KEY_SHAPE), np.uint32), rep((D, R), i32), rep((D, R), i32),
                       rep((D, R), i32), rep((D, R), f32), rep((D, R), f32), rep((D, R), i32), rep((D, R), i32),
                       rep((D, R, M), bool))
    static = dict(cfg=cfg, lay=lay, read=read, tuned=model.tuned)
    return {
        "prefill": programs.prefill.lower(model.params, state, shared, table, rows, **static),
        "decode": programs.decode.lower(model.params, state, shared, table, rep((D, lay.entries, K), np.int8), **static),
    }


def compile_programs(model: InferenceModel, config: EngineConfig, read: int | None = None,
                     shared_len: int = 512) -> dict[str, Any]:
    """`lower_programs`, compiled ahead of time."""
    return {name: low.compile() for name, low in lower_programs(model, config, read, shared_len).items()}
