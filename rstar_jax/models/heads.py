"""Reward heads on the decoder backbone: a linear `score` layer on every position (HF *ForTokenClassification).

C = 1: the PPM / value head. Its raw output is what the losses train; `reported_value` squashes it to [-1, 1].
C = 2: the PRM step head (logit 1 = "step is correct"); `step_probability` reads P(correct).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.llama import linear, padded_forward
from rstar_jax.models.params import Params


def reward_logits(
    params: Params,
    cfg: ModelConfig,
    input_ids_BxT: jax.Array,
    attention_mask_BxT: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    **forward_kw: Any,
) -> jax.Array:
    """Head outputs [B, T, C] in fp32 at every position."""
    h = padded_forward(params, cfg, input_ids_BxT, attention_mask_BxT, compute_dtype, **forward_kw)
    return linear(h.astype(jnp.float32), params["score"])


def gather_positions(x_BxTxC: jax.Array, index_BxP: jax.Array) -> jax.Array:
    """x at per-row positions: [B, P, C]."""
    return jnp.take_along_axis(x_BxTxC, index_BxP[..., None], axis=1)


def reported_value(raw: jax.Array) -> jax.Array:
    return jnp.tanh(raw)


def step_probability(logits_xC: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits_xC, axis=-1)[..., 1]
