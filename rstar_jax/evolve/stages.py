"""Resumable stages: a stage folder is finished exactly when its `state.json` exists.

A stage's work must itself be resumable or cheap to redo: searches skip finished problems, training resumes from
its last checkpoint, label files are rewritten whole. `state.json` is written (atomically) only after the work
returned, so a process killed at any point reruns the unfinished stage and nothing after it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rstar_jax import memory
from rstar_jax.jsonl import write_json
from rstar_jax.runtime import Runtime

STATE = "state.json"


def finished(folder: Path) -> dict[str, Any] | None:
    """The result of a finished stage, else None."""
    state = folder / STATE
    return json.loads(state.read_text())["result"] if state.is_file() else None


def run_stage(folder: Path, label: str, work: Callable[[Path], dict[str, Any]], rt: Runtime) -> dict[str, Any]:
    """Run `work(folder)` unless the stage finished before; returns its result with `wall_s` (the finishing
    attempt's seconds) and `attempts` (how many runs it took). Every process of a multi-process run does the work
    (searches split their problems, training is one program over all); process 0's result is the stage's."""
    done = finished(folder)
    if done is not None:
        print(f"evolve: {label}: finished earlier", file=sys.stderr, flush=True)
        return done
    lead = rt.process_index == 0
    attempts = None  # counted by process 0 alone (the others would read its file while it writes)
    if lead:
        attempts_file = folder / ".attempts"
        attempts = int(attempts_file.read_text()) + 1 if attempts_file.is_file() else 1
        folder.mkdir(parents=True, exist_ok=True)
        attempts_file.write_text(str(attempts))
        print(f"evolve: {label}" + (f" (resuming, attempt {attempts})" if attempts > 1 else ""), file=sys.stderr,
              flush=True)
    rt.barrier(f"{label}: started")
    t0 = time.perf_counter()
    result = work(folder) | {"wall_s": round(time.perf_counter() - t0, 2), "attempts": attempts}
    if lead:
        write_json(folder / STATE, {"status": "done", "result": result})
    rt.barrier(f"{label}: done")
    memory.release()  # the next stage starts without this one's programs and freed buffers
    return finished(folder)
