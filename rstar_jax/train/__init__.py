"""Training: losses, sharded train state and loop, orbax checkpoints, HF export."""

from rstar_jax.train.export import export_checkpoint
from rstar_jax.train.loop import run_training

__all__ = ["export_checkpoint", "run_training"]
