"""Add special tokens to a tokenizer and grow the model's embedding (and untied lm_head) to match.

Rows of existing tokens are kept bit for bit. Rows of the new tokens start at the mean of the existing
tokens' rows: a new token then looks like an average token instead of a random outlier, so the logits of
existing text are unchanged and the new token's initial probability is moderate.
"""

from __future__ import annotations

import jax.numpy as jnp

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.params import Params
from rstar_jax.models.tokenizer import Tokenizer

# rStar-Math's code-augmented CoT step format (see DESIGN.md, "Step format").
RSTAR_STEP_TOKENS = (
    "<code>", "<end_of_step>", "<end_of_code>", "<output>", "<end_of_output>", "<answer>", "<end_of_answer>",
)


def add_special_tokens(
    tokenizer: Tokenizer, params: Params, cfg: ModelConfig, tokens: tuple[str, ...] = RSTAR_STEP_TOKENS,
    pad_to_multiple_of: int = 1,
) -> tuple[Params, ModelConfig]:
    """Add `tokens` to `tokenizer` (in place) and return params/config with room for them.

    The vocabulary grows only when the new ids do not fit in the existing matrix (Qwen's matrices already
    have spare rows); `pad_to_multiple_of` rounds a grown vocabulary up for friendlier shapes.
    """
    old_size = tokenizer.vocab_size
    tokenizer.add_special_tokens(list(tokens))
    new_ids = sorted({tokenizer.token_to_id(t) for t in tokens} - set(range(old_size)))
    vocab = cfg.vocab_size
    if tokenizer.vocab_size > vocab:
        vocab = -(-tokenizer.vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    new_cfg = cfg.replace(vocab_size=vocab)
    embed_VxD = _grow(params["model"]["embed_tokens"]["weight"], vocab, old_size, new_ids)
    params = {**params, "model": {**params["model"], "embed_tokens": {"weight": embed_VxD}}}
    if "lm_head" in params:
        params["lm_head"] = {"weight": _grow(params["lm_head"]["weight"], vocab, old_size, new_ids)}
    return params, new_cfg


def _grow(weight_VxD: jnp.ndarray, vocab: int, old_size: int, new_ids: list[int]) -> jnp.ndarray:
    mean_D = weight_VxD[:old_size].astype(jnp.float32).mean(axis=0).astype(weight_VxD.dtype)
    pad = vocab - weight_VxD.shape[0]
    out_VxD = jnp.concatenate([weight_VxD, jnp.zeros((pad, weight_VxD.shape[1]), weight_VxD.dtype)]) if pad else weight_VxD
    if new_ids:
        out_VxD = out_VxD.at[jnp.asarray(new_ids)].set(mean_D)
    return out_VxD
