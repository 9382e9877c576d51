"""The engine's device programs: `shared_prefill`, `prefill` (one chunk per row) and `decode` (a fixed number
of steps). Each takes the state (donated), returns the new state and a `Report`, and compiles once per static
setting: the model config, the layout, the prompt blocks it reads and the CPU switch. On the CPU path every
program reads all blocks (conditionals skip the unreached ones), so each compiles once; elsewhere `read` takes a
power of two of blocks (`Layout.bucket`), a few programs in all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rstar_jax.backends import cpu
from rstar_jax.engine import sample, stops
from rstar_jax.engine.config import Layout
from rstar_jax.engine.layers import DecodeRows, PrefillRows, decode_attention, prefill_attention
from rstar_jax.engine.state import (DONE, IDLE, PENDING, REASON_LENGTH, REASON_NONE, REASON_STOP, RUNNING,
                                    EngineState, SharedPrefix, report)
from rstar_jax.models.attention import Lanes, combine, row_part, split_heads
from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import embed, lm_head, run_layers, segment_mask
from rstar_jax.models.params import Params

INT_MAX = jnp.iinfo(jnp.int32).max


def per_group(x_DxP: jax.Array, idx_DxR: jax.Array) -> jax.Array:
    """x[d, idx[d, r]]: a per-entry field read at each row's entry."""
    return jax.vmap(lambda x, i: x[i])(x_DxP, jnp.maximum(idx_DxR, 0))


def compute_dtype(params: Params) -> Any:
    return params["model"]["embed_tokens"]["weight"].dtype


# ---------------------------------------------------------------------------------------------
# Shared prefix


def _shared_prefill(params: Params, tokens_1xP: jax.Array, length: jax.Array, *, cfg: ModelConfig) -> SharedPrefix:
    """Keys/values of a right-padded prefix whose first `length` tokens are real."""
    P = tokens_1xP.shape[1]
    positions = jnp.arange(P)[None]
    valid = positions < length
    allowed = segment_mask(positions, valid.astype(jnp.int32))

    def attend(q, k, v, cache):
        out = combine([row_part(split_heads(q, k.shape[2]), k, v, allowed)], q.dtype)
        return out, (jnp.moveaxis(k[0], 0, -1), jnp.moveaxis(v[0], 0, 1))  # [G, E, P], [G, P, E]

    _, kv = run_layers(params, cfg, embed(params, tokens_1xP, compute_dtype(params)), positions, attend)
    return SharedPrefix(tuple(k for k, _ in kv), tuple(v for _, v in kv), valid[0], jnp.asarray(length, jnp.int32))


shared_prefill = cpu.jit_inference(_shared_prefill, static_argnames=("cfg",))


def empty_shared_prefix(cfg: ModelConfig, dtype: Any) -> SharedPrefix:
    G, E, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    k, v = jnp.zeros((G, E, 1), dtype), jnp.zeros((G, 1, E), dtype)
    return SharedPrefix((k,) * L, (v,) * L, jnp.zeros((1,), bool), jnp.int32(0))


# ---------------------------------------------------------------------------------------------
# Prefill


def _prefill(params: Params, st: EngineState, shared: SharedPrefix, table: stops.StopTable, rows: PrefillRows, *,
             cfg: ModelConfig, lay: Layout, read: int) -> tuple[EngineState, Any]:
    tuned = cpu.tuned()
    D, R, C = rows.tokens_DxRxC.shape
    used = rows.n_DxR > 0
    start = used & (rows.offset_DxR == 0)
    d_R = jnp.broadcast_to(jnp.arange(D)[:, None], (D, R))
    e_R = jnp.where(used, rows.entry_DxR, lay.entries)  # out of range: an unused row writes nothing

    def put(x, value, where=start):  # a per-entry field, set from the rows that start their prompt
        return x.at[d_R, jnp.where(where, e_R, lay.entries)].set(value, mode="drop")

    # a request's first chunk resets its entry and sets its settings
    st = st.replace(
        entry_len_DxP=put(st.entry_len_DxP, jnp.zeros_like(rows.offset_DxR)),
        entry_shared_DxP=put(st.entry_shared_DxP, rows.shared_DxR), entry_key_DxP=put(st.entry_key_DxP, rows.key_DxR),
        entry_sample0_DxP=put(st.entry_sample0_DxP, rows.sample0_DxR),
        entry_lanes_DxP=put(st.entry_lanes_DxP, jnp.zeros_like(rows.lanes_DxR)),
        entry_order_DxP=put(st.entry_order_DxP, rows.order_DxR),
        entry_temperature_DxP=put(st.entry_temperature_DxP, rows.temperature_DxR),
        entry_top_p_DxP=put(st.entry_top_p_DxP, rows.top_p_DxR), entry_top_k_DxP=put(st.entry_top_k_DxP, rows.top_k_DxR),
        entry_max_new_DxP=put(st.entry_max_new_DxP, rows.max_new_DxR),
        entry_stops_DxPxM=put(st.entry_stops_DxPxM, rows.stops_DxRxM),
        lane_state_DxPxK=put(st.lane_state_DxPxK, jnp.full((D, R, lay.lanes), IDLE, jnp.int8)),
        out_len_DxPxK=put(st.out_len_DxPxK, jnp.zeros((D, R, lay.lanes), jnp.int32)),
        out_reason_DxPxK=put(st.out_reason_DxPxK, jnp.zeros((D, R, lay.lanes), jnp.int8)),
    )
    base_DxR = jnp.where(rows.shared_DxR, shared.length, 0)
    positions = (base_DxR + rows.offset_DxR)[..., None] + jnp.arange(C)
    end_DxR = rows.offset_DxR + rows.n_DxR
    block_live = (jnp.arange(read) * lay.block)[:, None, None] < jnp.where(used, end_DxR, 0)[None]
    shared_row = shared.valid_P0[None] & rows.shared_DxR.reshape(-1, 1)
    attend = prefill_attention(rows, shared_row, block_live.any((1, 2)), read, lay.block, tuned)
    h = embed(params, rows.tokens_DxRxC.reshape(D * R, C), compute_dtype(params))
    h, caches = run_layers(params, cfg, h, positions.reshape(D * R, C), attend,
                           list(zip(st.caches, zip(shared.k, shared.v))))
    # several chunks of one prompt may share a call: the entry holds up to the furthest
    entry_len = st.entry_len_DxP.at[d_R, e_R].max(end_DxR, mode="drop")
    st = st.replace(caches=tuple(c for c, _ in caches), entry_len_DxP=entry_len)

    # rows that end their prompt: draw each lane's first token and make the lanes pending
    last = used & rows.last_DxR
    h_last = jnp.take_along_axis(h.reshape(D, R, C, -1), jnp.maximum(rows.n_DxR - 1, 0)[..., None, None], axis=2)
    logits = lm_head(params, cfg, h_last.reshape(D * R, -1))  # [D*R, V]
    K = lay.lanes
    k_ = jnp.arange(K)
    keys = jax.vmap(lambda key, s0: jax.vmap(lambda k: sample.token_key(key, s0 + k, 0))(k_))(
        rows.key_DxR.reshape(D * R, -1), rows.sample0_DxR.reshape(-1))  # [D*R, K]
    rep = lambda x: jnp.repeat(x.reshape(-1), K)  # noqa: E731
    first = sample.next_tokens(jnp.repeat(logits, K, axis=0), keys.reshape(-1), rep(rows.temperature_DxR),
                               rep(rows.top_p_DxR), rep(rows.top_k_DxR), rep(last)).reshape(D, R, K)
    window = jnp.concatenate([jnp.full((D * R * K, lay.stop_len - 1), -1, jnp.int32), first.reshape(-1, 1)], 1)
    stopped = stops.matches(table, window, jnp.repeat(rows.stops_DxRxM.reshape(D * R, -1), K, axis=0)).reshape(D, R, K)
    too_long = (rows.max_new_DxR <= 1)[..., None]
    in_use = k_[None, None] < rows.lanes_DxR[..., None]
    state = jnp.where(stopped | too_long, DONE, PENDING).astype(jnp.int8)
    state = jnp.where(in_use, state, IDLE).astype(jnp.int8)
    reason = jnp.where(stopped, REASON_STOP, jnp.where(too_long, REASON_LENGTH, REASON_NONE)).astype(jnp.int8)
    ee = jnp.where(last, e_R, lay.entries)
    st = st.replace(
        entry_lanes_DxP=put(st.entry_lanes_DxP, rows.lanes_DxR, last),
        lane_state_DxPxK=put(st.lane_state_DxPxK, state, last),
        out_reason_DxPxK=put(st.out_reason_DxPxK, reason, last),
        out_len_DxPxK=put(st.out_len_DxPxK, jnp.where(in_use, 1, 0), last),
        out_tokens_DxPxKxT=st.out_tokens_DxPxKxT.at[d_R, ee, :, 0].set(first, mode="drop"),
    )
    return st, report(st)


prefill = cpu.jit_inference(_prefill, static_argnames=("cfg", "lay", "read"), donate_argnums=(1,))


# ---------------------------------------------------------------------------------------------
# Decode


def admit(st: EngineState, lay: Layout) -> EngineState:
    """Free slots take the pending lanes of their group, earliest admitted entry first, lanes in order."""
    K, P = lay.lanes, lay.entries

    def one(lane_state_PxK, order_P, slot_entry_S, slot_lane_S):
        free = slot_lane_S < 0
        pending = (lane_state_PxK == PENDING).reshape(-1)
        prio = jnp.where(pending, (order_P[:, None] * K + jnp.arange(K)).reshape(-1), INT_MAX)
        queue = jnp.argsort(prio)  # pending lanes first, in admission order
        rank = jnp.cumsum(free) - 1
        take = free & (rank < pending.sum())
        lane_id = queue[jnp.clip(rank, 0, P * K - 1)]
        taken = jnp.where(take, lane_id, P * K)
        lane_state = lane_state_PxK.reshape(-1).at[taken].set(RUNNING, mode="drop").reshape(P, K)
        return (lane_state, jnp.where(take, lane_id // K, slot_entry_S), jnp.where(take, lane_id % K, slot_lane_S))

    lane_state, slot_entry, slot_lane = jax.vmap(one)(st.lane_state_DxPxK, st.entry_order_DxP, st.slot_entry_DxS,
                                                      st.slot_lane_DxS)
    return st.replace(lane_state_DxPxK=lane_state, slot_entry_DxS=slot_entry, slot_lane_DxS=slot_lane)


def decode_step(params: Params, cfg: ModelConfig, lay: Layout, read: int, st: EngineState, shared: SharedPrefix,
                table: stops.StopTable) -> EngineState:
    """One token for every running lane, then the stop check; finished lanes free their slots."""
    tuned = cpu.tuned()
    st = admit(st, lay)
    D, S, P, K, T = lay.groups, lay.slots, lay.entries, lay.lanes, lay.suffix
    live = st.slot_lane_DxS >= 0
    e, lane = jnp.maximum(st.slot_entry_DxS, 0), jnp.maximum(st.slot_lane_DxS, 0)
    d = jnp.broadcast_to(jnp.arange(D)[:, None], (D, S))
    t = st.out_len_DxPxK[d, e, lane]  # tokens so far; token t-1 is fed now
    fed = st.out_tokens_DxPxKxT[d, e, lane, jnp.maximum(t - 1, 0)]
    entry = lambda x: per_group(x, e)  # noqa: E731
    uses_shared = entry(st.entry_shared_DxP)
    positions = jnp.where(uses_shared, shared.length, 0) + entry(st.entry_len_DxP) + t - 1
    row_PxK = jnp.full((D, P, K), -1, jnp.int32).at[d, jnp.where(live, e, P), lane].set(
        jnp.broadcast_to(jnp.arange(S)[None], (D, S)), mode="drop")
    reach = jnp.where(live, entry(st.entry_len_DxP), 0)
    rows = DecodeRows(Lanes(e, lane, row_PxK), t, live, st.entry_len_DxP,
                      shared.valid_P0[None] & uses_shared.reshape(-1, 1),
                      ((jnp.arange(read) * lay.block)[:, None, None] < reach[None]).any((1, 2)))
    attend = decode_attention(rows, read, lay.block, tuned)
    h = embed(params, fed.reshape(D * S, 1), compute_dtype(params))
    h, caches = run_layers(params, cfg, h, positions.reshape(D * S, 1), attend,
                           list(zip(st.caches, zip(shared.k, shared.v))))
    logits = lm_head(params, cfg, h[:, 0])

    keys = jax.vmap(sample.token_key)(entry(st.entry_key_DxP).reshape(D * S, -1),
                                      (entry(st.entry_sample0_DxP) + lane).reshape(-1), t.reshape(-1))
    token = sample.next_tokens(logits, keys, entry(st.entry_temperature_DxP).reshape(-1),
                               entry(st.entry_top_p_DxP).reshape(-1), entry(st.entry_top_k_DxP).reshape(-1),
                               live.reshape(-1)).reshape(D, S)
    e_w = jnp.where(live & (t < T), e, P)  # out of range: nothing written
    out_tokens = st.out_tokens_DxPxKxT.at[d, e_w, lane, t].set(token, mode="drop")
    t1 = t + 1
    J = lay.stop_len
    idx = t1[..., None] - J + jnp.arange(J)  # the last J tokens, newest last
    window = jnp.where(idx >= 0, out_tokens[d[..., None], e[..., None], lane[..., None], jnp.maximum(idx, 0)], -1)
    stopped = stops.matches(table, window.reshape(D * S, J), entry(st.entry_stops_DxPxM).reshape(D * S, -1)).reshape(D, S)
    too_long = t1 >= jnp.minimum(entry(st.entry_max_new_DxP), T)
    done = live & (stopped | too_long)
    e_l = jnp.where(live, e, P)
    e_d = jnp.where(done, e, P)
    return st.replace(
        caches=tuple(c for c, _ in caches),
        out_tokens_DxPxKxT=out_tokens,
        out_len_DxPxK=st.out_len_DxPxK.at[d, e_l, lane].set(t1, mode="drop"),
        lane_state_DxPxK=st.lane_state_DxPxK.at[d, e_d, lane].set(DONE, mode="drop"),
        out_reason_DxPxK=st.out_reason_DxPxK.at[d, e_d, lane].set(
            jnp.where(stopped, REASON_STOP, REASON_LENGTH).astype(jnp.int8), mode="drop"),
        slot_entry_DxS=jnp.where(done, -1, st.slot_entry_DxS), slot_lane_DxS=jnp.where(done, -1, st.slot_lane_DxS),
    )


def cancel(st: EngineState, reason_DxPxK: jax.Array) -> EngineState:
    """End the pending and running lanes given a reason (host-found stop strings, aborted requests)."""
    hit = (reason_DxPxK > 0) & ((st.lane_state_DxPxK == PENDING) | (st.lane_state_DxPxK == RUNNING))
    D, S = st.slot_lane_DxS.shape
    d = jnp.broadcast_to(jnp.arange(D)[:, None], (D, S))
    freed = (st.slot_lane_DxS >= 0) & hit[d, jnp.maximum(st.slot_entry_DxS, 0), jnp.maximum(st.slot_lane_DxS, 0)]
    return st.replace(lane_state_DxPxK=jnp.where(hit, DONE, st.lane_state_DxPxK).astype(jnp.int8),
                      out_reason_DxPxK=jnp.where(hit, reason_DxPxK, st.out_reason_DxPxK).astype(jnp.int8),
                      slot_entry_DxS=jnp.where(freed, -1, st.slot_entry_DxS),
                      slot_lane_DxS=jnp.where(freed, -1, st.slot_lane_DxS))


def _decode(params: Params, st: EngineState, shared: SharedPrefix, table: stops.StopTable, cancel_DxPxK: jax.Array,
            *, cfg: ModelConfig, lay: Layout, read: int) -> tuple[EngineState, Any]:
    st = cancel(st, cancel_DxPxK)
    st = jax.lax.fori_loop(0, lay.steps, lambda _, s: decode_step(params, cfg, lay, read, s, shared, table), st)
    return st, report(st)


decode = cpu.jit_inference(_decode, static_argnames=("cfg", "lay", "read"), donate_argnums=(1,))
