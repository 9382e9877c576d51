"""Orbax checkpoints (the only module importing orbax) and export of a checkpoint to an HF folder.

A run folder holds `checkpoints/<step>/{params,opt_state,meta}`, `run.json` (kind, model spec, model config,
run config) and `tokenizer/`. Saves are asynchronous and keep the last N; a save that is cut off (SIGKILL)
leaves only a temporary folder that restore ignores. Every process calls save and restore; restoring
takes the target shardings, so a checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rstar_jax.train.state import TrainState


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (message names the folder)."""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_names=("params", "opt_state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Save at `state.step`; `meta` is JSON (data position, seed, config) and must be equal on all processes."""
        step = int(jax.device_get(state.step))
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
        )

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """`target`: a TrainState of `jax.ShapeDtypeStruct`s carrying the shardings to restore onto."""
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                opt_state=ocp.args.StandardRestore(target.opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = dict(out["meta"])
        state = TrainState(step=jax.device_put(np.int32(meta["step"]), target.step.sharding), params=out["params"], opt_state=out["opt_state"])
        return state, meta

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()


def restore_params(step_dir: Path, target_params: Any) -> Any:
    """Only the `params` item of one step folder (no optimizer state is read)."""
    return ocp.StandardCheckpointer().restore(step_dir / "params", target_params)


def find_step_dir(path: str | Path) -> tuple[Path, Path]:
    """(run folder, step folder) from a run folder, its `checkpoints/` folder or one step folder."""
    path = Path(path).resolve()
    for run, ckpts in ((path, path / "checkpoints"), (path.parent, path)):
        if (run / "run.json").is_file() and ckpts.is_dir():
            steps = sorted((int(p.name), p) for p in ckpts.iterdir() if p.name.isdigit() and (p / "params").is_dir())
            if not steps:
                raise CheckpointError(f"{path}: no finished checkpoint in {ckpts}")
            return run, steps[-1][1]
    if (path.parent.parent / "run.json").is_file() and (path / "params").is_dir():
        return path.parent.parent, path
    raise CheckpointError(f"{path}: not a training run folder, its checkpoints/ folder, or a checkpoint step folder")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{run_dir / 'run.json'}: unreadable run description ({e})") from None
