"""What a decoder layer attends to in the engine: the `attend` callbacks of `llama.run_layers` for prefill and
decode. They read and write the engine's caches; the layer itself is the model's one `decoder_layer`.

Per layer, `run_layers` hands each callback `(LayerCache, (shared k, shared v))` and gets the new caches back.
Blocks of the prompt cache beyond `read` are never touched; on the CPU path the blocks up to `read` that no row
reaches are skipped by a conditional (`live_N`), so one program serves every prompt length there.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rstar_jax.backends import cpu
from rstar_jax.engine.state import LayerCache
from rstar_jax.models.attention import Lanes, Stats, combine, empty, lane_part, row_part, shared_part, split_heads


def storage(x: jax.Array, tuned: bool) -> jax.Array:
    return cpu.to_storage(x) if tuned else x


def loaded(x: jax.Array, dtype: Any, tuned: bool) -> jax.Array:
    return cpu.from_storage(x, dtype) if tuned else x


def per_group(f: Callable, *args: Any) -> Any:
    """`jax.vmap(f)` over the leading data-group axis; with one group, f on it directly: a size-1 leading axis made
    XLA:CPU copy each cache block into another layout at every layer of every step."""
    if jax.tree.leaves(args)[0].shape[0] == 1:
        return jax.tree.map(lambda x: x[None], f(*jax.tree.map(lambda x: x[0], args)))
    return jax.vmap(f)(*args)


def maybe_skip(live: jax.Array, part: Callable[[], Stats], q: jax.Array, tuned: bool) -> Stats:
    """A part computed only where some row reaches it: a conditional on the CPU path, always elsewhere (a part no
    row reaches adds exactly nothing either way, see `models.attention`)."""
    return jax.lax.cond(live, part, lambda: empty(q)) if tuned else part()


class DecodeRows(NamedTuple):
    """What one decode step's rows (slots) attend with; leading [D, S] axes."""

    lanes: Lanes  # per group: entry_R, lane_R [D, S], row_PxK [D, P, K]
    t_DxS: jax.Array  # tokens the slot's sample has; the token fed now is its token t-1 (suffix slot t-1)
    live_DxS: jax.Array
    entry_len_DxP: jax.Array
    shared_row: jax.Array  # [D*S, P0] which shared-prefix keys each row reads
    block_live_N: jax.Array  # bool: some live row's entry reaches block n


def decode_attention(rows: DecodeRows, read: int, block: int, tuned: bool):
    D, S = rows.t_DxS.shape

    def attend(q, k, v, cache):
        layer, (shared_k, shared_v) = cache
        G = k.shape[2]
        T = layer.suffix_k.shape[-1]
        d, s = jnp.meshgrid(jnp.arange(D), jnp.arange(S), indexing="ij")
        at = jnp.where(rows.live_DxS, rows.t_DxS - 1, T)  # T is out of range: a free slot writes nothing
        k_DxSxGxE, v_DxSxGxE = (storage(x.reshape(D, S, G, -1), tuned) for x in (k, v))
        suffix_k = layer.suffix_k.at[d, s, :, :, at].set(k_DxSxGxE, mode="drop")
        suffix_v = layer.suffix_v.at[d, s, :, at, :].set(v_DxSxGxE, mode="drop")
        q5 = split_heads(q, G)  # [D*S, 1, G, Q, E]
        parts = [shared_part(q5, shared_k, shared_v, rows.shared_row)]
        qd = q5.reshape(D, S, *q5.shape[1:])
        for n in range(read):
            allowed_DxPxW = n * block + jnp.arange(block)[None, None] < rows.entry_len_DxP[..., None]
            ek, ev = (loaded(x[n], k.dtype, tuned) for x in (layer.entry_k, layer.entry_v))

            def part(n=n, ek=ek, ev=ev, allowed=allowed_DxPxW):
                st = per_group(lane_part, qd, ek, ev, allowed, rows.lanes)
                return Stats(*(x.reshape(D * S, *x.shape[2:]) for x in st))

            parts.append(maybe_skip(rows.block_live_N[n], part, q5, tuned))
        allowed_BxT = (jnp.arange(T)[None] < rows.t_DxS.reshape(-1, 1))[:, None]  # [D*S, 1, T]
        flat = lambda x: loaded(x.reshape(D * S, *x.shape[2:]), k.dtype, tuned)  # noqa: E731
        parts.append(row_part(q5, flat(suffix_k), flat(suffix_v), allowed_BxT, "bges", "bgse"))
        return combine(parts, q.dtype), (layer._replace(suffix_k=suffix_k, suffix_v=suffix_v), (shared_k, shared_v))

    return attend


class PrefillRows(NamedTuple):
    """One prefill call's rows: a chunk of one request's prompt each; leading [D, R] axes."""

    tokens_DxRxC: jax.Array  # int32
    entry_DxR: jax.Array  # int32 the entry the chunk belongs to
    offset_DxR: jax.Array  # int32 where the chunk starts in the prompt (after the shared prefix)
    n_DxR: jax.Array  # int32 real tokens in the chunk; 0 for an unused row
    last_DxR: jax.Array  # bool the chunk ends its prompt: draw the first tokens
    shared_DxR: jax.Array  # bool the prompt continues the shared prefix
    key_DxR: jax.Array  # uint32 [D, R, ...] raw data of the request's PRNG key
    sample0_DxR: jax.Array  # int32
    lanes_DxR: jax.Array  # int32 samples (lanes) of this entry
    order_DxR: jax.Array  # int32
    temperature_DxR: jax.Array  # float32
    top_p_DxR: jax.Array  # float32
    top_k_DxR: jax.Array  # int32
    max_new_DxR: jax.Array  # int32
    stops_DxRxM: jax.Array  # bool


def prefill_attention(rows: PrefillRows, shared_row: jax.Array, block_live_N: jax.Array, read: int, block: int,
                      tuned: bool):
    D, R, C = rows.tokens_DxRxC.shape
    i = jnp.arange(C)
    pos_DxRxC = rows.offset_DxR[..., None] + i  # position in the prompt
    real_DxRxC = i < rows.n_DxR[..., None]
    end_DxR = rows.offset_DxR + rows.n_DxR
    d = jnp.broadcast_to(jnp.arange(D)[:, None, None], (D, R, C))
    e = jnp.broadcast_to(rows.entry_DxR[..., None], (D, R, C))

    def attend(q, k, v, cache):
        layer, (shared_k, shared_v) = cache
        G = k.shape[2]
        k5, v5 = (storage(x.reshape(D, R, C, G, -1), tuned) for x in (k, v))
        entry_k, entry_v = list(layer.entry_k), list(layer.entry_v)
        for n in range(read):  # the chunk's keys/values into its entry's blocks
            local = pos_DxRxC - n * block
            at = jnp.where(real_DxRxC & (local >= 0) & (local < block), local, block)
            entry_k[n] = entry_k[n].at[d, e, :, :, at].set(k5, mode="drop")
            entry_v[n] = entry_v[n].at[d, e, :, at, :].set(v5, mode="drop")
        q5 = split_heads(q, G)  # [D*R, C, G, Q, E]
        parts = [shared_part(q5, shared_k, shared_v, shared_row)]
        take = lambda x, idx: per_group(lambda x, i: x[i], x, idx)  # noqa: E731  the rows' entries
        for n in range(read):  # then the chunk attends to its entry up to itself, block by block
            kv_pos = n * block + jnp.arange(block)
            allowed = (kv_pos[None, None] <= pos_DxRxC[..., None]) & (kv_pos[None, None] < end_DxR[..., None, None])

            def part(n=n, allowed=allowed):
                kr, vr = (loaded(take(x[n], rows.entry_DxR), k.dtype, tuned).reshape(D * R, *x[n].shape[2:])
                          for x in (entry_k, entry_v))
                return row_part(q5, kr, vr, allowed.reshape(D * R, C, block), "bges", "bgse")

            parts.append(maybe_skip(block_live_N[n], part, q5, tuned))
        new = layer._replace(entry_k=tuple(entry_k), entry_v=tuple(entry_v))
        return combine(parts, q.dtype), (new, (shared_k, shared_v))

    return attend
