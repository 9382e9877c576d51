"""The saved-tree format (version 1): what the search writes per problem and later stages read back.

A tree is two files in `DIR/trees/`, named from the problem id (`tree_stem`):

* `{stem}.npz`: one array per node statistic, node i at index i (node 0 is the root, the question):
    parent [N] int32 (-1 for the root), depth [N] int32, visits [N] int32, value [N] float32 (Q / V: the
    node's mean value), first_value [N] float32, terminal [N] int8 (0 open, 1 answer, 2 invalid, 3 exhausted:
    `Tree` constants), reward [N] float32 (terminal reward), correct [N] int8 (-1 unknown, 0 wrong, 1 correct),
    num_tokens [N] int32 (tokens of the node text).
* `{stem}.json`: {"format": "rstar-jax-tree", "version": 1, "arrays": "{stem}.npz", "problem": {id, question,
  answer}, "method", "mode", "answer" (the search's pick), ... search metadata, "nodes": [one object per node:
  text (the step as generated; a code terminal includes its `<output>` observation), kind (root |
  intermediate | code_terminal | answer_terminal | invalid), answer, correct, score (reward-model score),
  observation (code output or the failure line), reason (why invalid), exec_status (sandbox status),
  num_tokens (tokens the policy generated)]}.

Baselines (chains, beams) are saved in the same format: each sampled chain is a path from the root.
Both files are written to temporary names and renamed, the json last, so a json on disk means a whole tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rstar_jax.jsonl import InputError
from rstar_jax.math.steps import StepKind
from rstar_jax.search.tree import Tree

FORMAT = "rstar-jax-tree"
VERSION = 1
ARRAYS = {"parent": np.int32, "depth": np.int32, "visits": np.int32, "value": np.float32,
          "first_value": np.float32, "terminal": np.int8, "reward": np.float32, "correct": np.int8,
          "num_tokens": np.int32}
ROOT_NODE = {"text": "", "kind": "root"}


@dataclasses.dataclass(frozen=True)
class SavedTree:
    meta: dict[str, Any]  # everything of the json but "nodes"
    arrays: dict[str, np.ndarray]  # ARRAYS, one entry per node
    nodes: list[dict[str, Any]]  # per node: text, kind, answer, ... (see the module docstring)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.nodes]
        for i, p in enumerate(self.arrays["parent"][1:], 1):
            kids[int(p)].append(i)
        return kids


def tree_stem(problem_id: str) -> str:
    """A file-name-safe stem, unique per id (a short hash keeps ids that sanitise alike apart)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", problem_id)[:80]
    return f"{safe}-{hashlib.sha256(problem_id.encode()).hexdigest()[:8]}"


def from_device(tree: Tree, b: int, nodes: list[dict[str, Any]], meta: dict[str, Any]) -> SavedTree:
    """Row `b` of a device `Tree` (its first `num_nodes` nodes) with the host's node records."""
    n = int(tree.num_nodes_B[b])
    if len(nodes) != n:
        raise ValueError(f"from_device: {len(nodes)} node records for a tree of {n} nodes")
    row = lambda x: np.asarray(x[b, :n])  # noqa: E731
    arrays = {"parent": row(tree.parent_BxN), "depth": row(tree.depth_BxN), "visits": row(tree.visits_BxN),
              "value": row(tree.values()), "first_value": row(tree.first_value_BxN),
              "terminal": row(tree.terminal_BxN), "reward": row(tree.reward_BxN), "correct": row(tree.correct_BxN),
              "num_tokens": row(tree.token_len_BxN)}
    return SavedTree(meta, {k: v.astype(ARRAYS[k]) for k, v in arrays.items()}, nodes)


class TreeBuilder:
    """A host-side tree for searches that do not keep device trees (baselines): add nodes, then `build`."""

    def __init__(self):
        self.nodes: list[dict[str, Any]] = [dict(ROOT_NODE)]
        self.cols: dict[str, list] = {k: [0] for k in ARRAYS}
        self.cols["parent"][0] = -1
        self.cols["correct"][0] = Tree.UNKNOWN

    def add(self, parent: int, child, value: float = 0.0) -> int:
        """Append `child` (a policy.Child) under `parent` with one visit; returns its node id."""
        kind = child.kind
        terminal = {StepKind.ANSWER_TERMINAL: Tree.ANSWER, StepKind.INVALID: Tree.INVALID}.get(kind, Tree.NOT_TERMINAL)
        correct = Tree.UNKNOWN if child.correct is None else int(child.correct)
        row = {"parent": parent, "depth": self.cols["depth"][parent] + 1, "visits": 1, "value": value,
               "first_value": value, "terminal": terminal, "reward": value if terminal else 0.0,
               "correct": correct, "num_tokens": len(child.token_ids)}
        for k, v in row.items():
            self.cols[k].append(v)
        self.nodes.append(child.to_json())
        return len(self.nodes) - 1

    def build(self, meta: dict[str, Any]) -> SavedTree:
        return SavedTree(meta, {k: np.asarray(v, ARRAYS[k]) for k, v in self.cols.items()}, list(self.nodes))


def save(saved: SavedTree, trees_dir: str | Path) -> Path:
    """Write `{stem}.npz` then `{stem}.json` (atomically); returns the json path."""
    trees_dir = Path(trees_dir)
    trees_dir.mkdir(parents=True, exist_ok=True)
    stem = tree_stem(saved.meta["problem"]["id"])
    npz, js = trees_dir / f"{stem}.npz", trees_dir / f"{stem}.json"
    tmp = trees_dir / f".{stem}.tmp.npz"
    np.savez_compressed(tmp, **saved.arrays)
    os.replace(tmp, npz)
    doc = {"format": FORMAT, "version": VERSION, **saved.meta, "arrays": npz.name, "nodes": saved.nodes}
    tmp = trees_dir / f".{stem}.tmp.json"
    tmp.write_text(json.dumps(doc, ensure_ascii=False))
    os.replace(tmp, js)
    return js


def load(path: str | Path) -> SavedTree:
    """Read a tree back from its `.json` (or `.npz`) path; InputError names the file and what is wrong."""
    path = Path(path)
    js = path.with_suffix(".json")
    if not js.is_file():
        raise InputError(f"{path}: no such tree file (expected a {FORMAT} .json written by `rstar-jax search`)")
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{js}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{js}: not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise InputError(f"{js}: tree format version {doc.get('version')!r}, this reader knows version {VERSION}")
    npz = js.parent / doc["arrays"]
    if not npz.is_file():
        raise InputError(f"{js}: its arrays file {npz.name} is missing")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in ARRAYS if k in data}
    missing = [k for k in ARRAYS if k not in arrays]
    nodes = doc.pop("nodes")
    if missing or any(len(a) != len(nodes) for a in arrays.values()):
        raise InputError(f"{npz}: arrays {missing or 'lengths'} do not match the {len(nodes)} nodes of {js.name}")
    return SavedTree({k: v for k, v in doc.items() if k not in ("format", "version", "arrays")}, arrays, nodes)
