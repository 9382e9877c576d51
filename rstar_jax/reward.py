"""Batched step scoring with a reward model (PPM, PRM or value head) at inference time.

The head's kind (`models.heads.RewardHead`, recorded in the model's config.json) says how its logits are read:
PPM tanh(raw / 5) in [-1, 1], value clip(raw, 0, 1), PRM P(step correct). Its input format says where:

* `steps` (the project's heads): tokenisation matches training (`train/data.py`): the prompt and each step are
  encoded separately and concatenated, and a step's score is read at its last token.
* `qwen-prm` (Qwen2.5-Math-PRM, as its model card runs it): system / user (the problem) / assistant (the steps,
  each followed by `<extra_0>`) rendered with the tokenizer's chat template, encoded whole; a step's score is read
  at its `<extra_0>`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import RewardHead, reward_logits
from rstar_jax.models.params import Params


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two (>= minimum) up to 256, then the next multiple of 256: similar batches share programs."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 256 else -(-n // 256) * 256


def batch_bucket(n: int) -> int:
    """Rows of a scoring call: powers of two up to 4, then multiples of 4 (every padding row costs a full row)."""
    return bucket(n) if n <= 4 else -(-n // 4) * 4

QWEN_PRM_SEPARATOR = "<extra_0>"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def encode_steps(tokenizer, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps and the index of each step's last token (-1 for an empty step)."""
    ids = tokenizer.encode(prompt)
    ends = []
    for step in steps:
        piece = tokenizer.encode(step)
        ids += piece
        ends.append(len(ids) - 1 if piece else -1)
    return ids, ends


def encode_qwen_prm(tokenizer, problem: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Qwen2.5-Math-PRM's input: the chat with every step followed by `<extra_0>`; the separators' indices."""
    sep = tokenizer.token_to_id(QWEN_PRM_SEPARATOR)
    if sep is None:
        raise ValueError(f"{tokenizer.source}: no {QWEN_PRM_SEPARATOR} token, so not a Qwen2.5-Math-PRM tokenizer")
    messages = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": problem},
                {"role": "assistant", "content": "".join(s + QWEN_PRM_SEPARATOR for s in steps)}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    ends = [i for i, t in enumerate(ids) if t == sep]
    if len(ends) != len(steps):  # a step that itself holds the separator text
        raise ValueError(f"qwen-prm input: {len(ends)} {QWEN_PRM_SEPARATOR} tokens for {len(steps)} steps")
    return ids, ends


@functools.partial(jax.jit, static_argnames=("cfg", "head", "compute_dtype"))
def _scores(params, ids_BxT, mask_BxT, *, cfg, head, compute_dtype):
    return head.read(reward_logits(params, cfg, ids_BxT, mask_BxT, compute_dtype=compute_dtype))


def score_steps(
    params: Params,
    cfg: ModelConfig,
    tokenizer,
    head: RewardHead,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_size: int = 16,
    compute_dtype: Any = jnp.float32,
) -> list[list[float]]:
    """For each (prompt, steps): one reported score per step. Batches and lengths are bucketed (few compiles)."""
    encode = encode_qwen_prm if head.input_format == "qwen-prm" else encode_steps
    encoded = [encode(tokenizer, p, s) for p, s in items]
    out: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        B, T = batch_bucket(len(chunk)), bucket(max(len(ids) for ids, _ in chunk), 16)
        ids_BxT = np.zeros((B, T), np.int32)
        mask_BxT = np.zeros((B, T), np.int32)
        for i, (ids, _) in enumerate(chunk):
            ids_BxT[i, : len(ids)], mask_BxT[i, : len(ids)] = ids, 1
        scores_BxT = np.asarray(_scores(params, ids_BxT, mask_BxT, cfg=cfg, head=head, compute_dtype=compute_dtype))
        out += [[float(scores_BxT[i, e]) if e >= 0 else float("nan") for e in ends] for i, (_, ends) in enumerate(chunk)]
    return out
