"""Host memory between the stages of a long process (an `evolve` run: searches, training, evaluation in turn).

What a stage leaves behind outlives it: its compiled programs (on XLA:CPU a SmolLM2 train step or an engine's
prefill and decode hold ~100 MB of host memory each) and the pages of freed buffers that glibc keeps in its
arenas. `release` hands both back once a stage has finished, so the next stage starts from the process's live
data alone instead of on top of every earlier stage's peak.
"""

from __future__ import annotations

import gc

import jax

from rstar_jax.backends.cpu import release_free_host_memory


def release() -> None:
    """Drop compiled programs and cached traces (the next stage compiles its own or loads them from the on-disk
    cache), collect garbage, and return freed malloc pages to the OS."""
    jax.clear_caches()
    gc.collect()
    release_free_host_memory()
