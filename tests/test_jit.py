"""quick_jit drops its compiled programs before the process runs out of memory mappings, and hands freed host
memory back to the OS."""

import ctypes
import os
import threading

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


def rss_mb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


@pytest.mark.skipif(jit._malloc_trim() is None, reason="needs glibc")
def test_freed_host_memory_goes_back_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    seen: dict = {}

    def worker():  # like XLA's threads: blocks below the mmap threshold, from a thread's own arena
        blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MB
        for b in blocks:
            libc.memset(b, 1, 64 << 10)
        seen["held"] = rss_mb()
        for b in blocks[:-1]:  # the last one stays live above the others, as a later buffer would
            libc.free(b)
        seen["freed"], seen["last"] = rss_mb(), blocks[-1]

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    try:
        assert seen["held"] - seen["freed"] < 50  # glibc kept the freed 200 MB
        jit.release_free_host_memory()
        assert rss_mb() < seen["held"] - 150
    finally:
        libc.free(seen["last"])


def test_quick_jit_calls_release_host_memory_at_its_checks(monkeypatch):
    calls = []
    monkeypatch.setattr(jit, "release_free_host_memory", lambda: calls.append(1))
    monkeypatch.setattr(jit, "CHECK_EVERY_S", 0.0)
    quick_jit(lambda x: x + 1)(jnp.ones(2))
    assert calls
    monkeypatch.setattr(jit, "CHECK_EVERY_S", 3600.0)  # the next check is an hour away
    quick_jit(lambda x: x + 2)(jnp.ones(2))
    assert len(calls) == 1


@pytest.mark.skipif(jit.host_memory() is None or jit.memory_beyond_arrays() is None, reason="needs Linux /proc")
def test_live_arrays_do_not_count_as_program_memory():
    jnp.full(4, 1.0).block_until_ready()  # JAX's own first-use memory is not what this measures
    before = jit.memory_beyond_arrays()
    big = jnp.full((256, 2**20 // 4), 2.0)  # 256 MB written on the host
    big.block_until_ready()
    assert abs(jit.memory_beyond_arrays() - before) < 64 << 20


@pytest.mark.skipif(jit.host_memory() is None or jit.memory_beyond_arrays() is None, reason="needs Linux /proc")
def test_compiled_programs_are_dropped_when_they_hold_too_much_memory(monkeypatch):
    traces = []

    @quick_jit
    def step(x):
        traces.append(x.shape)
        return x * 3

    step(jnp.ones(5))
    monkeypatch.setattr(jit, "CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(jit, "_kept_after_drop", [0])
    monkeypatch.setattr(jit, "HOST_FRACTION", 1.0)  # far from the machine's memory: programs kept
    step(jnp.ones(5))
    assert len(traces) == 1
    monkeypatch.setattr(jit, "HOST_FRACTION", 0.0)  # as if the programs held too much: all dropped
    step(jnp.ones(5))
    assert len(traces) == 2
    assert 0 < jit._kept_after_drop[0] < rss_mb() << 21
    # a bar at half of what this process holds anyway: what the drop could not free (plus half the bar) raises
    # it, so the next checks keep the programs instead of dropping them every time
    monkeypatch.setattr(jit, "HOST_FRACTION", jit._kept_after_drop[0] / 2 / jit.host_memory())
    step(jnp.ones(5))
    step(jnp.ones(5))
    assert len(traces) == 2
