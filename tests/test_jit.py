"""quick_jit drops its compiled programs before the process runs out of memory mappings."""

import os

import jax.numpy as jnp
import pytest

from rstar_jax import jit
from rstar_jax.jit import quick_jit


def mappings() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


@pytest.mark.skipif(not os.path.exists("/proc/sys/vm/max_map_count"), reason="needs Linux /proc")
def test_compiled_programs_are_dropped_near_the_mapping_limit(monkeypatch):
    traces = []

    @quick_jit
    def step(x):
        traces.append(x.shape)
        return jnp.tanh(x) * 2 + 1

    step(jnp.ones(3))
    step(jnp.ones(3))
    assert len(traces) == 1  # far below the limit: the compiled program is kept
    for n in range(4, 24):  # 20 more programs, each with its own mappings
        step(jnp.ones(n))
    before = mappings()
    monkeypatch.setattr(jit, "MAPS_FRACTION", 0.0)  # as if the process were at the limit
    monkeypatch.setattr(jit, "CHECK_EVERY_S", 0.0)
    assert float(step(jnp.zeros(3))[0]) == 1.0
    assert len(traces) == 22  # the shape was compiled again: every program had been dropped
    assert mappings() < before
