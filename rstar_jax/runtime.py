"""Start-up order in one place: the sandbox pool is forked (by the caller, before JAX starts a backend), then
`start` joins the multi-process run the launch scripts asked for, then builds the mesh, then models are loaded.

A search-shaped job (search, label mc, eval, processbench, the evolve search and eval stages) runs one engine per
process over that process's own devices and takes a deterministic share of the problems (`Runtime.share`);
training stays one SPMD program over every process (`train.loop`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence, TypeVar

import jax

from rstar_jax import sharding
from rstar_jax.config import MeshSection

T = TypeVar("T")
BARRIER_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # a share of a long search; the coordination service's ids are int64 ms
_BARRIERS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Runtime:
    process_index: int
    process_count: int
    mesh: jax.sharding.Mesh  # over this process's own devices

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every process_count-th, from its index (the same split on every run)."""
        return list(items[self.process_index :: self.process_count])

    def barrier(self, name: str) -> None:
        """Wait until every process reached this point (a no-op alone).

        A key-value barrier of the coordination service, not a device collective: processes reach it minutes or
        hours apart (one still searching its share, process 0 writing exports), far past a collective's timeout.
        Every process passes the same barriers in the same order, so a counter makes each id unique.
        """
        if self.process_count > 1:
            from jax._src import distributed

            barrier_id = f"rstar_jax/{next(_BARRIERS)}/{name}"
            distributed.global_state.client.wait_at_barrier(barrier_id, BARRIER_TIMEOUT_MS)

    @property
    def suffix(self) -> str:
        """A per-process file-name part ("" alone, ".p{i}" among several)."""
        return f".p{self.process_index}" if self.process_count > 1 else ""


def start(mesh: MeshSection) -> Runtime:
    """Join the multi-process run (RSTAR_COORDINATOR_ADDRESS / RSTAR_NUM_PROCESSES / RSTAR_PROCESS_ID, or
    RSTAR_DISTRIBUTED=auto) once, then the inference mesh over this process's devices."""
    sharding.init_distributed()
    return Runtime(jax.process_index(), jax.process_count(), sharding.make_mesh(mesh, jax.local_devices()))
