"""Resuming a batch mid-search: the loop state of MCTS (saved after every policy call) and ReST-MCTS* (after every
iteration).

At the default budget one batch of MCTS is ~200 policy calls (about two hours on a 2-core CPU), so losing the batch
in flight on a crash or a preempted host loses real work. The state file holds everything a search loop carries
from one step to the next: the device tree's arrays, the host node records, loop arrays (ReST-MCTS*'s end gate; an
MCTS rollout's current leaves), the batch's `Stats` and wall time, and how many iterations (and levels of the
iteration in flight) are done. Every request's key is derived from (problem key, iteration, level), so a search
continued from the file builds the same trees as one that never stopped. The file is one `.npz` (arrays plus a JSON
header) written to a temporary name and renamed, so it is always whole; a file whose fingerprint (problem ids,
search config) differs from the batch's is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from rstar_jax.search.policy import Stats
from rstar_jax.search.tree import Tree

VERSION = 1


@dataclasses.dataclass
class LoopState:
    done: int  # outer iterations finished
    tree: Tree
    nodes: list[list[dict[str, Any]]]  # per problem, the host node records
    flags: dict[str, np.ndarray]  # per-problem loop arrays (ReST-MCTS*: `done` by the end gate)
    level: int = 0  # levels of iteration `done` already expanded (MCTS: a rollout cut short)


class BatchCheckpoint:
    """The state file of one batch: `load` restores (and fills `stats`), `save` after each iteration, `clear` at
    the end. `fingerprint` must be JSON-serialisable and identify the batch and its settings."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from the file
        self.t0 = time.perf_counter()
        self.wall_before = 0.0  # wall seconds this batch ran before the last resume

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def load(self, stats: Stats) -> LoopState | None:
        if not self.path.is_file():
            return None
        with np.load(self.path) as data:
            header = json.loads(str(data["header"]))
            if header.get("version") != VERSION or header.get("fingerprint") != self.fingerprint:
                return None
            tree = Tree(**{f.name: jnp.asarray(data[f"tree.{f.name}"]) for f in dataclasses.fields(Tree)})
            flags = {k: data[f"flag.{k}"] for k in header["flags"]}
        s = header["stats"]
        stats.seconds.update(s["seconds"])
        stats.tokens.update(s["tokens"])
        stats.programs.update(s["programs"])
        stats.policy_calls = s["policy_calls"]
        self.wall_before, self.t0 = header["wall_s"], time.perf_counter()
        return LoopState(header["done"], tree, header["nodes"], flags, header.get("level", 0))

    def save(self, state: LoopState, stats: Stats) -> None:
        header = {"version": VERSION, "fingerprint": self.fingerprint, "done": state.done, "level": state.level,
                  "nodes": state.nodes, "flags": sorted(state.flags), "wall_s": self.elapsed(),
                  "stats": {"seconds": stats.seconds, "tokens": stats.tokens, "programs": stats.programs,
                            "policy_calls": stats.policy_calls}}
        arrays = {f"tree.{f.name}": np.asarray(getattr(state.tree, f.name)) for f in dataclasses.fields(Tree)}
        arrays |= {f"flag.{k}": np.asarray(v) for k, v in state.flags.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp.npz")
        np.savez_compressed(tmp, header=np.asarray(json.dumps(header, ensure_ascii=False)), **arrays)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
