"""`quick_jit`: jax.jit for the inference programs, compiled with LLVM at -O1 on CPU.

Searches and evaluations compile many shapes of the sampler's programs (a cold self-evolution run: ~50), and on
CPU most of each compile is LLVM optimising elementwise code that is a small part of the run time (the matmuls
are library calls). At -O1 a SmolLM2 decode chunk compiles in 5.4 s instead of 8.9 s and a prefill in 2.9 s
instead of 4.3 s, and both run as fast (BUILD_NOTES). GPU and TPU keep their defaults; training keeps -O3 (its
elementwise work is large).

Linux caps a process's memory mappings (`vm.max_map_count`, 65530 by default) and XLA:CPU maps each compiled
program's kernels apart: a SmolLM2 prefill plus decode chunk takes ~740 mappings. A default-budget search meets
hundreds of shapes (prompt buckets x running rows x windows) and died after ~2 h with "LLVM compilation error:
Cannot allocate memory". So once half the cap is used, `quick_jit` drops every compiled program
(`jax.clear_caches()`); the ones still needed come back from the on-disk compilation cache (~2-4 s each).

Compiled programs also hold host memory: ~90 MB per SmolLM2 prefill plus decode chunk, all of it freed by
`jax.clear_caches()`. Where `vm.max_map_count` is raised (262144), the mapping cap lets ~250 such pairs pile up,
and a default-budget search was OOM-killed at 24 GB of RSS after an hour, where a fresh process ran the same call
at a 7 GB peak. So programs are also dropped once the process's memory beyond its live JAX arrays on the host
passes HOST_FRACTION of the machine's (or cgroup's) memory. What dropping cannot free (data held elsewhere) raises
that bar, so it does not repeat every check.

XLA:CPU allocates its buffers with malloc, and glibc keeps freed blocks in its arenas. Buffer sizes change from
call to call (prompt buckets, rows, windows), so `quick_jit` hands freed memory back (`malloc_trim`, glibc only)
at the same checks: on a running search it took RSS from 6.1 to 3.4 GB.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 1}
MAPS_FRACTION = 0.5  # of vm.max_map_count, past which compiled programs are dropped
# Counting 30k mappings takes ~45 ms, too slow for every call; mappings grow by at most ~2k a minute (a search)
HOST_FRACTION = 0.25  # of the host's memory that the process may hold beyond its live arrays before programs go
CHECK_EVERY_S = 10.0
_last_check = [float("-inf")]
_kept_after_drop = [0]  # bytes beyond live arrays right after the last drop: what dropping could not free


@functools.cache
def max_map_count() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def mappings_near_limit() -> bool:
    """Whether this process holds more than MAPS_FRACTION of the memory mappings Linux allows it (False where
    /proc does not tell)."""
    limit = max_map_count()
    if limit is None:
        return False
    with open("/proc/self/maps", "rb") as maps:
        return maps.read().count(b"\n") > MAPS_FRACTION * limit


@functools.cache
def host_memory() -> int | None:
    """Physical memory, or the cgroup's limit where that is lower (None where unknown)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def memory_beyond_arrays() -> int | None:
    """Resident bytes of this process that are not live JAX arrays on the host: compiled programs, Python, malloc."""
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    on_host = (a for a in jax.live_arrays() if not a.is_deleted() and all(d.platform == "cpu" for d in a.devices()))
    return rss - sum(a.nbytes for a in on_host)


def programs_hold_too_much_memory() -> bool:
    total, beyond = host_memory(), memory_beyond_arrays()
    if total is None or beyond is None:
        return False
    return beyond > max(HOST_FRACTION * total, _kept_after_drop[0] + HOST_FRACTION * total / 2)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def release_free_host_memory() -> None:
    """Return the pages of freed malloc blocks to the OS (~15 ms per 200 MB kept); a no-op where libc is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def housekeeping() -> None:
    """At most every CHECK_EVERY_S: hand freed host memory back, and drop every compiled program
    (`jax.clear_caches()`) once the process nears its mapping cap or its programs hold too much memory."""
    now = time.monotonic()
    if now - _last_check[0] < CHECK_EVERY_S:
        return
    _last_check[0] = now
    release_free_host_memory()
    if mappings_near_limit() or programs_hold_too_much_memory():
        jax.clear_caches()
        gc.collect()
        release_free_host_memory()
        _kept_after_drop[0] = memory_beyond_arrays() or 0


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
        housekeeping()
        return jitted[0](*args, **kwargs)

    return call
