"""Training objectives for the four model kinds.

Every loss returns sums, not means: `(loss_sum, weight_sum, stats)` where `stats` are further sums
(correct predictions, ...). The train step adds them over micro-batches and devices and divides once,
so the update is the same whatever the batch is split into, and the loss is a mean over the global
batch (not a sum), keeping the learning rate independent of batch size.

Batch layouts (one micro-batch; T is the padded length):
  sft / prm / value   input_ids, positions, segment_ids [B, T]  (segment 0 = padding; packing => >1 segment per row)
                      targets [B, T] (next token id, P(step correct), or value) and weights [B, T]
  ppm                 input_ids, positions, segment_ids [B, 2, T] (pair member 0 = positive, 1 = negative),
                      last [B, 2] (index of the step's last token), weights [B] (1/(n_pos*n_neg); 0 = padding)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import score_head
from rstar_jax.models.llama import forward, lm_head
from rstar_jax.models.params import Params

KINDS = ("sft", "ppm", "prm", "value")
NUM_LABELS = {"sft": None, "ppm": 1, "prm": 2, "value": 1}

LossOut = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


def causal_lm_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array) -> LossOut:
    """Token cross-entropy; prompt and padding positions carry weight 0."""
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = logz_BxT - picked_BxT
    # The target is a top prediction (ties count): XLA:CPU's argmax over 49k entries is a scalar loop.
    correct = (picked_BxT >= jnp.max(logits_BxTxV, axis=-1)) * weights_BxT
    return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT), {"correct": jnp.sum(correct)}


def bradley_terry_loss(r_pos_B: jax.Array, r_neg_B: jax.Array, weights_B: jax.Array) -> LossOut:
    """-log sigmoid(r_pos - r_neg) on raw scores, each pair weighted (rStar-Math: 1/(n_pos*n_neg) per prefix)."""
    margin_B = r_pos_B - r_neg_B
    correct = (margin_B > 0) * weights_B
    return jnp.sum(-jax.nn.log_sigmoid(margin_B) * weights_B), jnp.sum(weights_B), {"correct": jnp.sum(correct)}


def step_classification_loss(logits_BxTx2: jax.Array, p_correct_BxT: jax.Array, weights_BxT: jax.Array) -> LossOut:
    """PRM cross-entropy at step ends against P(correct): hard labels are 0/1, soft labels MC fractions."""
    logp_BxTx2 = jax.nn.log_softmax(logits_BxTx2, axis=-1)
    ce_BxT = -(p_correct_BxT * logp_BxTx2[..., 1] + (1.0 - p_correct_BxT) * logp_BxTx2[..., 0])
    predicted = logits_BxTx2[..., 1] > logits_BxTx2[..., 0]
    correct = (predicted == (p_correct_BxT >= 0.5)) * weights_BxT
    return jnp.sum(ce_BxT * weights_BxT), jnp.sum(weights_BxT), {"correct": jnp.sum(correct)}


def value_mse_loss(v_BxT: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array) -> LossOut:
    """Squared error against ReST-MCTS* quality values at step ends."""
    se_BxT = jnp.square(v_BxT - targets_BxT)
    return jnp.sum(se_BxT * weights_BxT), jnp.sum(weights_BxT), {"abs_err": jnp.sum(jnp.sqrt(se_BxT) * weights_BxT)}


def loss_fn(kind: str, cfg: ModelConfig, **model_kw: Any) -> Callable[[Params, dict[str, jax.Array]], LossOut]:
    """`(params, micro_batch) -> (loss_sum, weight_sum, stats)`; `model_kw` goes to `llama.forward`."""

    def sft(params, b):
        h = forward(params, cfg, b["input_ids"], b["positions"], b["segment_ids"], **model_kw)
        return causal_lm_loss(lm_head(params, cfg, h), b["targets"], b["weights"])

    def prm(params, b):
        h = forward(params, cfg, b["input_ids"], b["positions"], b["segment_ids"], **model_kw)
        return step_classification_loss(score_head(params, h), b["targets"], b["weights"])

    def value(params, b):
        h = forward(params, cfg, b["input_ids"], b["positions"], b["segment_ids"], **model_kw)
        return value_mse_loss(score_head(params, h)[..., 0], b["targets"], b["weights"])

    def ppm(params, b):
        B, P, T = b["input_ids"].shape
        flat = [b[k].reshape(B * P, T) for k in ("input_ids", "positions", "segment_ids")]
        r_BPxT = score_head(params, forward(params, cfg, *flat, **model_kw))[..., 0]
        r_Bx2 = jnp.take_along_axis(r_BPxT.reshape(B, P, T), b["last"][..., None], axis=-1)[..., 0]
        return bradley_terry_loss(r_Bx2[:, 0], r_Bx2[:, 1], b["weights"])

    return {"sft": sft, "ppm": ppm, "prm": prm, "value": value}[kind]
