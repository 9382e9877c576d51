"""Batched step scoring with a reward model (PPM, PRM or value head) at inference time.

Tokenisation matches training (`train/data.py`): the prompt and each step are encoded separately and concatenated,
and a step's score is read at its last token. Reported scores: 1-label heads give tanh(raw) in [-1, 1];
2-label heads give P(step correct) in [0, 1].
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import reported_value, reward_logits, step_probability
from rstar_jax.models.params import Params


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two (>= minimum) up to 256, then the next multiple of 256: similar batches share programs."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 256 else -(-n // 256) * 256


def batch_bucket(n: int) -> int:
    """Rows of a scoring call: powers of two up to 4, then multiples of 4 (every padding row costs a full row)."""
    return bucket(n) if n <= 4 else -(-n // 4) * 4


def encode_steps(tokenizer, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps and the index of each step's last token (-1 for an empty step)."""
    ids = tokenizer.encode(prompt)
    ends = []
    for step in steps:
        piece = tokenizer.encode(step)
        ids += piece
        ends.append(len(ids) - 1 if piece else -1)
    return ids, ends


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _scores(params, ids_BxT, mask_BxT, *, cfg, compute_dtype):
    logits = reward_logits(params, cfg, ids_BxT, mask_BxT, compute_dtype=compute_dtype)
    return reported_value(logits[..., 0]) if logits.shape[-1] == 1 else step_probability(logits)


def score_steps(
    params: Params,
    cfg: ModelConfig,
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_size: int = 16,
    compute_dtype: Any = jnp.float32,
) -> list[list[float]]:
    """For each (prompt, steps): one reported score per step. Batches and lengths are bucketed (few compiles)."""
    encoded = [encode_steps(tokenizer, p, s) for p, s in items]
    out: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        B, T = batch_bucket(len(chunk)), bucket(max(len(ids) for ids, _ in chunk), 16)
        ids_BxT = np.zeros((B, T), np.int32)
        mask_BxT = np.zeros((B, T), np.int32)
        for i, (ids, _) in enumerate(chunk):
            ids_BxT[i, : len(ids)], mask_BxT[i, : len(ids)] = ids, 1
        scores_BxT = np.asarray(_scores(params, ids_BxT, mask_BxT, cfg=cfg, compute_dtype=compute_dtype))
        out += [[float(scores_BxT[i, e]) if e >= 0 else float("nan") for e in ends] for i, (_, ends) in enumerate(chunk)]
    return out
