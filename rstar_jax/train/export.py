"""A training checkpoint -> an HF folder (policy: causal LM; PPM / PRM / value: token-classification reward model
whose config.json records the head kind, so it is read as it was trained: `models.heads.RewardHead`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.heads import RewardHead
from rstar_jax.models.hf_io import save_causal_lm, save_reward_model
from rstar_jax.models.tokenizer import load_tokenizer
from rstar_jax.train.checkpoint import find_step_dir, read_run_info, restore_params
from rstar_jax.train.state import abstract_params


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, write: bool = True) -> Path:
    """`checkpoint_dir`: a run folder (latest step), its `checkpoints/` folder, or one step folder. Under
    jax.distributed every process calls this (orbax restores collectively) and only the one with `write` saves."""
    run_dir, step_dir = find_step_dir(checkpoint_dir)
    info = read_run_info(run_dir)
    model_cfg = ModelConfig.from_hf_dict(info["model_config"], source=str(run_dir / "run.json"))
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), abstract_params(model_cfg, info["kind"])
    )
    params = jax.tree.map(np.asarray, restore_params(step_dir, target))
    if not write:
        return Path(out_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    if info["kind"] == "sft":
        return save_causal_lm(out_dir, model_cfg, params, tokenizer)
    return save_reward_model(out_dir, model_cfg, params, tokenizer, RewardHead(info["kind"]))
