"""`quick_jit`: jax.jit for the inference programs, compiled with LLVM at -O1 on CPU.

Searches and evaluations compile many shapes of the sampler's programs (a cold self-evolution run: ~50), and on
CPU most of each compile is LLVM optimising elementwise code that is a small part of the run time (the matmuls
are library calls). At -O1 a SmolLM2 decode chunk compiles in 5.4 s instead of 8.9 s and a prefill in 2.9 s
instead of 4.3 s, and both run as fast (BUILD_NOTES). GPU and TPU keep their defaults; training keeps -O3 (its
elementwise work is large).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def quick_jit(fn: Callable | None = None, **jit_kwargs: Any):
    """Decorator like `functools.partial(jax.jit, **jit_kwargs)`; the jit is built on the first call, when the
    backend is known (importing must not start one: the sandbox forks its workers before JAX starts)."""
    if fn is None:
        return functools.partial(quick_jit, **jit_kwargs)
    jitted: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not jitted:
            options = CPU_OPTIONS if jax.default_backend() == "cpu" else None
            jitted.append(jax.jit(fn, compiler_options=options, **jit_kwargs))
        return jitted[0](*args, **kwargs)

    return call
