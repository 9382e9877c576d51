"""rstar-jax: self-evolved deep thinking for small math reasoners, in JAX."""

__version__ = "0.1.0"
