"""The engine's device state: prompt caches (entries), samples' own caches (slots), lanes, outputs; all
preallocated at start with fixed shapes (legend in `engine.config`), and sharded by the rules table: the leading
data-group axis D over `data`, kv heads over `tensor` where they divide.

A request's prompt (after the shared prefix) is prefilled into an entry; its samples are the entry's lanes. A lane
is IDLE, PENDING (its first token drawn at the end of the prefill, waiting for a slot), RUNNING (in a slot) or
DONE. A slot holds one running lane and that sample's own keys/values; when the sample stops the slot takes the
next pending lane of its data group, inside the decode program (`decode.admit`). Every token a lane draws goes to
`out_tokens`, which the host reads back only for requests that finished (or that it checks for stop strings).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rstar_jax import sharding
from rstar_jax.backends import cpu
from rstar_jax.engine.config import Layout
from rstar_jax.models.config import ModelConfig

IDLE, PENDING, RUNNING, DONE = 0, 1, 2, 3  # lane states
KEY_SHAPE = (2,)  # raw data of a default (threefry) PRNG key
REASON_NONE, REASON_STOP, REASON_LENGTH, REASON_CANCELLED = 0, 1, 2, 3


class LayerCache(NamedTuple):
    """One layer's caches: an entry's prompt in N blocks (separate arrays, so a program reads only the blocks it
    needs without slicing, which XLA:CPU would copy at every step), and each slot's own tokens."""

    entry_k: tuple[jax.Array, ...]  # N x [D, P, G, E, W] keys as the attention dots read them
    entry_v: tuple[jax.Array, ...]  # N x [D, P, G, W, E]
    suffix_k: jax.Array  # [D, S, G, E, T]
    suffix_v: jax.Array  # [D, S, G, T, E]


@flax.struct.dataclass
class EngineState:
    caches: tuple[LayerCache, ...]  # one per layer
    entry_len_DxP: jax.Array  # int32 prompt tokens in the entry's cache
    entry_shared_DxP: jax.Array  # bool the prompt continues the shared prefix
    entry_key_DxP: jax.Array  # uint32 [D, P, ...] raw data of the request's PRNG key
    entry_sample0_DxP: jax.Array  # int32 sample index of lane 0 (a request with more than K samples spans entries)
    entry_lanes_DxP: jax.Array  # int32 lanes in use; 0 until the prompt is fully prefilled
    entry_order_DxP: jax.Array  # int32 admission order: earlier entries' lanes take free slots first
    entry_temperature_DxP: jax.Array  # float32, 0 = greedy
    entry_top_p_DxP: jax.Array  # float32
    entry_top_k_DxP: jax.Array  # int32, 0 = off
    entry_max_new_DxP: jax.Array  # int32 tokens each sample may draw
    entry_stops_DxPxM: jax.Array  # bool which device stop patterns apply
    lane_state_DxPxK: jax.Array  # int8 IDLE | PENDING | RUNNING | DONE
    out_tokens_DxPxKxT: jax.Array  # int32 the tokens each lane drew
    out_len_DxPxK: jax.Array  # int32
    out_reason_DxPxK: jax.Array  # int8 REASON_*
    slot_entry_DxS: jax.Array  # int32 the running lane's entry, -1 for a free slot
    slot_lane_DxS: jax.Array  # int32 -1 for a free slot


class SharedPrefix(NamedTuple):
    """Keys/values of the prefix that requests may continue (the few-shot block), computed once per engine
    (`programs.shared_prefill`) and read by every row; not part of the donated state."""

    k: tuple[jax.Array, ...]  # L x [G, E, P0]
    v: tuple[jax.Array, ...]  # L x [G, P0, E]
    valid_P0: jax.Array  # bool real tokens (the rest pads P0)
    length: jax.Array  # int32 real tokens


class Report(NamedTuple):
    """What the host reads after a program: copies, so the state itself can be donated to the next program."""

    entry_lanes_DxP: jax.Array
    lane_state_DxPxK: jax.Array
    out_len_DxPxK: jax.Array
    out_reason_DxPxK: jax.Array
    out_tokens_DxPxKxT: jax.Array


def report(st: EngineState) -> Report:
    return Report(st.entry_lanes_DxP, st.lane_state_DxPxK, st.out_len_DxPxK, st.out_reason_DxPxK,
                  st.out_tokens_DxPxKxT)


def storage_dtype(dtype: Any, tuned: bool) -> Any:
    return cpu.to_storage(jnp.zeros((), dtype)).dtype if tuned else jnp.dtype(dtype)


def _logical_axes(lay: Layout, L: int) -> EngineState:
    """The state's tree with each leaf's logical axes (`sharding.RULES`)."""
    g, kv = "groups", "kv_heads"
    cache = LayerCache(tuple((g, None, kv, None, None) for _ in range(lay.blocks)),
                       tuple((g, None, kv, None, None) for _ in range(lay.blocks)),
                       (g, None, kv, None, None), (g, None, kv, None, None))
    per_entry, per_lane = (g, None), (g, None, None)
    return EngineState((cache,) * L, per_entry, per_entry, (g, None, None), per_entry, per_entry, per_entry, per_entry,
                       per_entry, per_entry, per_entry, per_lane, per_lane, (g, None, None, None), per_lane, per_lane,
                       per_entry, per_entry)


def _empty(lay: Layout, cfg: ModelConfig, dtype: Any, tuned: bool) -> EngineState:
    D, S, P, K, W, T = lay.groups, lay.slots, lay.entries, lay.lanes, lay.block, lay.suffix
    G, E = cfg.num_key_value_heads, cfg.head_dim
    store = storage_dtype(dtype, tuned)
    z = lambda *shape: jnp.zeros(shape, store)  # noqa: E731
    cache = lambda: LayerCache(tuple(z(D, P, G, E, W) for _ in range(lay.blocks)),  # noqa: E731
                               tuple(z(D, P, G, W, E) for _ in range(lay.blocks)), z(D, S, G, E, T), z(D, S, G, T, E))
    i32 = lambda *shape, fill=0: jnp.full(shape, fill, jnp.int32)  # noqa: E731
    return EngineState(
        caches=tuple(cache() for _ in range(cfg.num_hidden_layers)),
        entry_len_DxP=i32(D, P), entry_shared_DxP=jnp.zeros((D, P), bool),
        entry_key_DxP=jnp.broadcast_to(jax.random.key_data(jax.random.key(0)), (D, P, *KEY_SHAPE)),
        entry_sample0_DxP=i32(D, P), entry_lanes_DxP=i32(D, P), entry_order_DxP=i32(D, P),
        entry_temperature_DxP=jnp.zeros((D, P), jnp.float32), entry_top_p_DxP=jnp.ones((D, P), jnp.float32),
        entry_top_k_DxP=i32(D, P), entry_max_new_DxP=i32(D, P, fill=1),
        entry_stops_DxPxM=jnp.zeros((D, P, lay.stops), bool),
        lane_state_DxPxK=jnp.zeros((D, P, K), jnp.int8), out_tokens_DxPxKxT=i32(D, P, K, T),
        out_len_DxPxK=i32(D, P, K), out_reason_DxPxK=jnp.zeros((D, P, K), jnp.int8),
        slot_entry_DxS=i32(D, S, fill=-1), slot_lane_DxS=i32(D, S, fill=-1),
    )


def state_shardings(lay: Layout, cfg: ModelConfig, dtype: Any, tuned: bool, mesh) -> EngineState:
    abstract = jax.eval_shape(lambda: _empty(lay, cfg, dtype, tuned))
    axes = _logical_axes(lay, cfg.num_hidden_layers)
    specs = jax.tree.map(lambda x, a: sharding.logical_to_spec(a, x.shape, mesh), abstract, axes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def init_state(lay: Layout, cfg: ModelConfig, dtype: Any, tuned: bool, mesh) -> EngineState:
    """The empty state, created directly in its shardings (one small program)."""
    shardings = state_shardings(lay, cfg, dtype, tuned, mesh)

    def empty_state() -> EngineState:
        return _empty(lay, cfg, dtype, tuned)

    return jax.jit(empty_state, out_shardings=shardings)()
