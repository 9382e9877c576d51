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

from collections import Counter
from pathlib import Path
from typing import Any

from rstar_jax.jsonl import InputError, write_jsonl
from rstar_jax.labels.ppm_pairs import PairConfig, ppm_pairs
from rstar_jax.labels.trajectories import sft_records, trajectories
from rstar_jax.labels.value_targets import value_records
from rstar_jax.search import tree_io


class LabelError(InputError):
    """Bad labelling input or settings (one line naming it)."""


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


def label_sft(trees_dir: str | Path, out: str | Path, *, top: int = 2, min_accuracy: float = 0.0) -> dict[str, Any]:
    """Policy SFT records: per problem the `top` best correct trajectories (`trajectories.py`)."""
    if top < 1 or not 0.0 <= min_accuracy <= 1.0:
        raise LabelError(f"label sft: need top >= 1 and 0 <= min_accuracy <= 1, got {top}, {min_accuracy}")
    trees = load_trees(trees_dir)
    records, dropped = [], Counter()
    for saved in trees:
        recs, reason = sft_records(saved, top, min_accuracy)
        records += recs
        if reason:
            dropped[reason] += 1
    return _write("sft", out, trees, records, {"problems": len(trees) - sum(dropped.values())}, dropped)


def label_ppm(trees_dir: str | Path, out: str | Path, cfg: PairConfig = PairConfig()) -> dict[str, Any]:
    """PPM preference pairs (`ppm_pairs.py`): step pairs, then answer-step pairs, tree by tree."""
    trees = load_trees(trees_dir)
    records, dropped = [], Counter()
    for saved in trees:
        records += ppm_pairs(saved, cfg, dropped)
    levels = Counter(r["level"] for r in records)
    return _write("ppm", out, trees, records, {"step_pairs": levels["step"], "answer_pairs": levels["answer"]},
                    dropped)


def label_value(trees_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """ReST-MCTS* value-model records (`value_targets.py`), one per trajectory."""
    trees = load_trees(trees_dir)
    records, dropped = [], Counter()
    for saved in trees:
        recs = value_records(saved)
        records += recs
        if not recs:
            dropped["no_answers"] += 1
    correct = sum(r["correct"] for r in records)
    return _write("value", out, trees, records, {"correct": correct, "wrong": len(records) - correct}, dropped)
