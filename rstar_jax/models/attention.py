"""Grouped-query attention over parts of keys and values, with one softmax across the parts.

Every attention in the project goes through `attention(q, parts)`: training and scoring attend over one part (the
sequence itself); the engine's prefill attends over the cached few-shot prefix, the prompt cache and the chunk,
and its decode over the prefix, the prompt cache (shared by a request's samples) and each sample's own tokens.

A part computes its softmax statistics alone (running max m, sum l of exp(s - m), unnormalised output o) in the
score layout its keys need, and only those (no key axis) move to the common [B, T, G, Q] layout, where
`combine` rescales and sums them. So a shared part is broadcast, never copied per row, and a part can be skipped
(`empty`) without changing the others' arithmetic: a row that reaches no key of a part gets m = -1e30 there,
whose weight exp(m - max) is exactly 0, the same as a skipped part.

Part kinds, by what their keys belong to:
* `row_part`: per row (the sequence itself, a decode slot's own tokens); scores [B, G, Q, T, S] (the layout that
  made a CPU train step 1.2x faster than [B, T, G, Q, S]).
* `shared_part`: one set for every row (the few-shot prefix); scores [G, B, T, Q, P], a plain matmul per head.
* `lane_part`: one set per prompt entry, read by the rows (decode slots) that sample from it. The rows' queries
  are gathered into the entry's K lanes (one per sample), so each entry's keys are read once per step for all of
  its samples; lanes without a row hold zeros and are dropped on the way back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


class Stats(NamedTuple):
    """One part's softmax statistics in the common layout."""

    m: jax.Array  # [B, T, G, Q] max score (NEG_INF where the row reaches no key of the part)
    l: jax.Array  # [B, T, G, Q] sum of exp(score - m)
    o: jax.Array  # [B, T, G, Q, E] sum of exp(score - m) * value, fp32


def split_heads(q_BxTxHxE: jax.Array, num_kv_heads: int) -> jax.Array:
    B, T, H, E = q_BxTxHxE.shape
    return q_BxTxHxE.reshape(B, T, num_kv_heads, H // num_kv_heads, E)


# The dots run in the inputs' dtype (XLA:CPU has no bf16 x bf16 -> fp32 batched dot); scores and softmax in fp32.
def _stats(s: jax.Array, v: jax.Array, pv_spec: str, perm: tuple[int, ...]) -> Stats:
    """(m, l, o) of masked fp32 scores `s` (keys on the last axis) permuted by `perm` from the score layout to the
    common one. The value dot keeps the score layout (`pv_spec`'s natural output order): asking it for the common
    order made XLA:CPU copy the scores transposed at every layer."""
    m = jax.lax.stop_gradient(s.max(-1))
    e = jnp.exp(s - m[..., None])
    o = jnp.einsum(pv_spec, e.astype(v.dtype), v).astype(jnp.float32)
    return Stats(jnp.transpose(m, perm), jnp.transpose(e.sum(-1), perm), jnp.transpose(o, (*perm, len(perm))))


def row_part(q_BxTxGxQxE: jax.Array, k: jax.Array, v: jax.Array, allowed_BxTxS: jax.Array, k_spec: str = "bsge",
             v_spec: str = "bsge") -> Stats:
    """Keys per row, named by `k_spec` / `v_spec` with s the key axis ("bsge": a sequence's own [B, S, G, E];
    "bges" / "bgse": a decode cache's layouts). `allowed` [B, T, S]."""
    scale = 1.0 / np.sqrt(q_BxTxGxQxE.shape[-1])
    s = jnp.einsum(f"btgqe,{k_spec}->bgqts", q_BxTxGxQxE, k).astype(jnp.float32) * scale
    s = jnp.where(allowed_BxTxS[:, None, None], s, NEG_INF)
    return _stats(s, v, f"bgqts,{v_spec}->bgqte", (0, 3, 1, 2))


def shared_part(q_BxTxGxQxE: jax.Array, k_GxExP: jax.Array, v_GxPxE: jax.Array, allowed: jax.Array) -> Stats:
    """Keys every row shares; `allowed` [P] or [B, P] (a row may not use the shared part)."""
    scale = 1.0 / np.sqrt(q_BxTxGxQxE.shape[-1])
    s = jnp.einsum("btgqe,gep->gbtqp", q_BxTxGxQxE, k_GxExP).astype(jnp.float32) * scale
    mask = allowed[None, :, None, None, :] if allowed.ndim == 2 else allowed
    s = jnp.where(mask, s, NEG_INF)
    return _stats(s, v_GxPxE, "gbtqp,gpe->gbtqe", (1, 2, 0, 3))


class Lanes(NamedTuple):
    """Which decode rows sample from which prompt entry: row r is lane `lane_R[r]` of entry `entry_R[r]`."""

    entry_R: jax.Array  # [R] int32
    lane_R: jax.Array  # [R] int32
    row_PxK: jax.Array  # [P, K] int32 the row in each lane, -1 where none


def lane_part(q_Rx1xGxQxE: jax.Array, k_PxGxExS: jax.Array, v_PxGxSxE: jax.Array, allowed_PxS: jax.Array,
              lanes: Lanes) -> Stats:
    """Keys per prompt entry, read once for all the rows (one query each) that sample from the entry."""
    scale = 1.0 / np.sqrt(q_Rx1xGxQxE.shape[-1])
    has_row = lanes.row_PxK >= 0
    q_PxKxGxQxE = jnp.where(has_row[..., None, None, None], q_Rx1xGxQxE[jnp.maximum(lanes.row_PxK, 0), 0], 0)
    s = jnp.einsum("pkgqe,pges->pgkqs", q_PxKxGxQxE, k_PxGxExS).astype(jnp.float32) * scale
    s = jnp.where(allowed_PxS[:, None, None, None, :], s, NEG_INF)
    m, l, o = _stats(s, v_PxGxSxE, "pgkqs,pgse->pgkqe", (0, 2, 1, 3))  # [P, K, G, Q] (+ E)
    at = (lanes.entry_R, lanes.lane_R)
    return Stats(m[at][:, None], l[at][:, None], o[at][:, None])


def empty(q_BxTxGxQxE: jax.Array) -> Stats:
    """The statistics of a part none of whose keys any row reaches (a skipped part)."""
    shape = q_BxTxGxQxE.shape[:-1]
    return Stats(jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.zeros(q_BxTxGxQxE.shape, jnp.float32))


def combine(parts: list[Stats], dtype) -> jax.Array:
    """One softmax across the parts: [B, T, H*E] in `dtype`. Rows that reach no key at all get zeros."""
    m = parts[0].m
    for p in parts[1:]:
        m = jnp.maximum(m, p.m)
    num, den = 0.0, 0.0
    for p in parts:
        w = jnp.exp(p.m - m)
        num = num + p.o * w[..., None]
        den = den + p.l * w
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    B, T, G, Q, E = out.shape
    return out.astype(dtype).reshape(B, T, G * Q * E)
