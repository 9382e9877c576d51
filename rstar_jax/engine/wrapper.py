"""`generate`: K completions for each of a list of prompts, through an engine sized for the call."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from rstar_jax.engine.api import Completion, Request, RequestError, SamplingConfig
from rstar_jax.engine.config import EngineConfig
from rstar_jax.engine.engine import Engine
from rstar_jax.engine.model import InferenceModel


def prompt_keys(key: Any, n: int) -> jax.Array:
    """One typed key per prompt from one key (prompt i: fold_in(key, i)) or from n keys (typed or raw uint32)."""
    key = jnp.stack(list(key)) if isinstance(key, (list, tuple)) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
    if key.shape != (n,):
        raise RequestError(f"generate: key must be one key or {n} keys (one per prompt), got shape {key.shape}")
    return key


def engine_config_for(prompts: Sequence[Sequence[int]], settings: SamplingConfig, base: EngineConfig = EngineConfig(),
                      shared: int = 0, groups: int = 1) -> EngineConfig:
    """`base` with room for these prompts and settings: slots for every sample (up to base.slots, in powers of
    two so that similar calls share programs, at least one per data group), lanes for the samples of a prompt, the
    new tokens asked for."""
    samples = len(prompts) * settings.num_samples
    longest = max(len(p) for p in prompts) - shared
    slots = max(groups, min(base.slots, 1 << (samples - 1).bit_length()))
    lanes = min(base.lanes, 1 << (settings.num_samples - 1).bit_length())
    max_prompt = max(base.block, -(-longest // base.block) * base.block)
    return dataclasses.replace(base, slots=slots, lanes=lanes, entries=0, max_prompt=max(max_prompt, base.block),
                               max_new_tokens=max(16, 1 << (settings.max_new_tokens - 1).bit_length()))


def generate(model: InferenceModel, tokenizer, prompts: Sequence[Sequence[int]], settings: SamplingConfig, key: Any,
             *, shared_prefix: Sequence[int] = (), config: EngineConfig | None = None,
             base: EngineConfig = EngineConfig()) -> list[list[Completion]]:
    """K completions per prompt (K = settings.num_samples), in prompt order.

    key: one key (prompt i then uses fold_in(key, i)) or one key per prompt. shared_prefix: tokens that the
    prompts start with; their keys/values are computed once. config: the engine's shape; default: `base` sized
    for the call (`engine_config_for`).
    """
    if not prompts:
        raise RequestError("generate: no prompts")
    keys = prompt_keys(key, len(prompts))
    config = config or engine_config_for(prompts, settings, base, len(shared_prefix), model.mesh.shape["data"])
    engine = Engine(model, tokenizer, config)
    engine.set_shared_prefix(shared_prefix)
    return engine.run([Request(p, settings, k) for p, k in zip(prompts, keys)])
