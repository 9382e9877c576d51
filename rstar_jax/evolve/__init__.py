"""Self-evolution: rounds of MCTS, labelling and training (`rstar-jax evolve`)."""

from rstar_jax.evolve.driver import run_evolve

__all__ = ["run_evolve"]
