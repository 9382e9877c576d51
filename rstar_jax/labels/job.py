"""`rstar-jax label sft|ppm|value`: a folder of saved trees in, one JSONL file of training records out.

Input: a search's output folder or its `trees/` folder (`search/tree_io.py`). Trees are labelled in problem-id
order and each tree's records in node order, so the same trees always give the same file. Labelling is fast
and deterministic, so the file is written whole (to a temporary name, then renamed) and a rerun redoes it.

Each job returns a summary, which the CLI prints as JSON:
    {"kind", "out", "problems", "trajectories", "records", "kept": {...}, "dropped": {reason: count}}
sft:   kept problems; dropped problems by reason (no_answers, low_accuracy, no_correct)
ppm:   kept step / answer pairs; dropped pairs by the filter that dropped them (q_gap, mean_q, edit_distance)
value: kept records of correct / wrong trajectories; problems without a graded answer dropped (no_answers)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from rstar_jax.config import at_least, require
from rstar_jax.jsonl import InputError, check_output_file, write_jsonl
from rstar_jax.labels.ppm_pairs import PairConfig, ppm_pairs
from rstar_jax.labels.trajectories import sft_records, trajectories
from rstar_jax.labels.value_targets import value_records
from rstar_jax.search import tree_io


class LabelError(InputError):
    """Bad labelling input or settings (one line naming it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TreesLabelConfig:
    """`label value`, and what every `label` of saved trees takes."""

    trees: str  # a search's output folder or its trees/
    out: str  # output JSONL


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTLabelConfig(TreesLabelConfig):
    top: int = 2  # trajectories per problem
    min_accuracy: float = 0.0  # drop problems whose trajectory accuracy is lower

    def __post_init__(self):
        at_least(1, top=self.top)
        require(0 <= self.min_accuracy <= 1, "min_accuracy", self.min_accuracy, "in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPMLabelConfig(TreesLabelConfig):
    pairs: PairConfig = PairConfig()


def load_trees(trees_dir: str | Path) -> list[tree_io.SavedTree]:
    """Every saved tree of `trees_dir` (or of its `trees/` folder), sorted by problem id."""
    root = Path(trees_dir)
    if not root.is_dir():
        raise LabelError(f"{trees_dir}: no such folder (expected a search's output folder or its trees/)")
    folder = root / "trees" if (root / "trees").is_dir() else root
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))  # dot files: unfinished writes
    if not files:
        raise LabelError(f"{trees_dir}: no saved trees (*.json) found")
    trees = []
    for path in files:
        saved = tree_io.load(path)
        problem = saved.meta.get("problem")
        if not isinstance(problem, dict) or not isinstance(problem.get("question"), str) or "id" not in problem:
            raise LabelError(f"{path}: the tree names no problem (needs problem.id and problem.question)")
        trees.append(saved)
    return sorted(trees, key=lambda t: str(t.meta["problem"]["id"]))


def _write(kind: str, out: str | Path, trees: list[tree_io.SavedTree], records: list, kept: dict[str, int],
           dropped: Counter) -> dict[str, Any]:
    """Write the records; returns the job's summary."""
    write_jsonl(out, records)
    return {"kind": kind, "out": str(out), "problems": len(trees),
            "trajectories": sum(len(trajectories(t)) for t in trees), "records": len(records), "kept": kept,
            "dropped": dict(sorted(dropped.items()))}


def _load(cfg: TreesLabelConfig) -> list[tree_io.SavedTree]:
    check_output_file(cfg.out)  # before reading the trees
    return load_trees(cfg.trees)


def label_sft(cfg: SFTLabelConfig) -> dict[str, Any]:
    """Policy SFT records: per problem the `top` best correct trajectories (`trajectories.py`)."""
    trees = _load(cfg)
    records, dropped = [], Counter()
    for saved in trees:
        recs, reason = sft_records(saved, cfg.top, cfg.min_accuracy)
        records += recs
        if reason:
            dropped[reason] += 1
    return _write("sft", cfg.out, trees, records, {"problems": len(trees) - sum(dropped.values())}, dropped)


def label_ppm(cfg: PPMLabelConfig) -> dict[str, Any]:
    """PPM preference pairs (`ppm_pairs.py`): step pairs, then answer-step pairs, tree by tree."""
    trees = _load(cfg)
    records, dropped = [], Counter()
    for saved in trees:
        records += ppm_pairs(saved, cfg.pairs, dropped)
    levels = Counter(r["level"] for r in records)
    return _write("ppm", cfg.out, trees, records, {"step_pairs": levels["step"], "answer_pairs": levels["answer"]},
                  dropped)


def label_value(cfg: TreesLabelConfig) -> dict[str, Any]:
    """ReST-MCTS* value-model records (`value_targets.py`), one per trajectory."""
    trees = _load(cfg)
    records, dropped = [], Counter()
    for saved in trees:
        recs = value_records(saved)
        records += recs
        if not recs:
            dropped["no_answers"] += 1
    correct = sum(r["correct"] for r in records)
    return _write("value", cfg.out, trees, records, {"correct": correct, "wrong": len(records) - correct}, dropped)
