"""Drawing next tokens, one row per sample, each row with its own temperature, top-p, top-k and key.

Settings are arrays, so requests with different settings share one program: temperature 0 is greedy (argmax),
top-k 0 and top-p 1 are off. The order is transformers': temperature -> top-k -> top-p -> categorical. A row's
draw inverts the CDF of softmax(logits / temperature) with one uniform from its key: `jax.random.categorical`
draws a Gumbel per vocabulary entry instead (~90 ms per step for 96 rows of a 49k vocabulary on CPU, ~3 ms here).
Filtering needs a sort of the vocabulary, so it runs (under a conditional) only when some row asks for it.

Keys: sample k of a request with key `key` draws its token t with fold_in(fold_in(key, k), t), so what a sample
draws depends on its request's key, k and t alone: not on its slot, its neighbours or when it was admitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rstar_jax.backends import cpu
from rstar_jax.models.attention import NEG_INF


def token_key(key_data: jax.Array, sample: jax.Array, t: jax.Array) -> jax.Array:
    """The key of sample `sample`'s token t, from its request's raw key data (vmapped over rows)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), sample), t)


def first_above(cdf_NxM: jax.Array, target_N: jax.Array, p_NxM: jax.Array) -> jax.Array:
    """Index of the first entry whose cumulative mass exceeds the target, never past the last entry of positive
    mass (where rounding puts the target at the very top)."""
    M = cdf_NxM.shape[-1]
    last = M - 1 - jnp.argmax(p_NxM[:, ::-1] > 0, axis=-1)
    return jnp.minimum(jnp.sum(cdf_NxM <= target_N[:, None], axis=-1), last)


def draw(u_N: jax.Array, logits_NxV: jax.Array, temperature_N: jax.Array) -> jax.Array:
    """One token per row from softmax(logits / temperature) by inverting its CDF at u in [0, 1). NEG_INF entries
    are never drawn."""
    if cpu.tuned():
        return cpu.draw(u_N, logits_NxV, temperature_N, first_above)
    x = logits_NxV.astype(jnp.float32)
    p = jnp.exp((x - x.max(-1, keepdims=True)) / temperature_N[:, None])
    cdf = jnp.cumsum(p, axis=-1)
    return first_above(cdf, u_N * cdf[:, -1], p).astype(jnp.int32)


def argmax(logits_NxV: jax.Array) -> jax.Array:
    return cpu.argmax(logits_NxV) if cpu.tuned() else jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)


def filter_top(logits_NxV: jax.Array, temperature_N: jax.Array, top_p_N: jax.Array, top_k_N: jax.Array) -> jax.Array:
    """Logits outside each row's top-k, then outside its top-p nucleus (of the top-k renormalised), set to NEG_INF.
    A positive temperature keeps the order of the logits, so the cut is found on the sorted raw logits."""
    V = logits_NxV.shape[-1]
    sorted_NxV = -jnp.sort(-logits_NxV, axis=-1)
    k_N = jnp.where(top_k_N > 0, jnp.minimum(top_k_N, V), V)
    in_k = jnp.arange(V)[None] < k_N[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, sorted_NxV, -jnp.inf) / temperature_N[:, None], axis=-1)
    keep = in_k & ((top_p_N[:, None] >= 1.0) | ((jnp.cumsum(probs, axis=-1) - probs) < top_p_N[:, None]))
    threshold = jnp.take_along_axis(sorted_NxV, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
    return jnp.where(logits_NxV < threshold, NEG_INF, logits_NxV)


def next_tokens(logits_NxV: jax.Array, keys_N: jax.Array, temperature_N: jax.Array, top_p_N: jax.Array,
                top_k_N: jax.Array, live_N: jax.Array) -> jax.Array:
    """The next token of every row; rows with temperature 0 are greedy. Only live rows decide whether the
    sampling and filtering branches run at all."""
    greedy = temperature_N <= 0
    sampled = live_N & ~greedy
    temperature = jnp.where(greedy, 1.0, temperature_N).astype(jnp.float32)
    filtering = sampled & ((top_k_N > 0) | (top_p_N < 1.0))
    logits = jax.lax.cond(filtering.any(), lambda x: filter_top(x, temperature, top_p_N, top_k_N), lambda x: x,
                          logits_NxV)

    def sample(x):
        return draw(jax.vmap(jax.random.uniform)(keys_N), x, temperature)

    drawn = jax.lax.cond(sampled.any(), sample, lambda x: jnp.zeros(x.shape[:1], jnp.int32), logits)
    return jnp.where(greedy, argmax(logits_NxV), drawn)
