"""Trajectories of a saved search tree, step Q-values, the outcomes below each node, and policy SFT data.

Definitions every tree label uses (`ppm_pairs`, `value_targets`):
* Q of a node = its saved `value`: the mean of the values backed up through it (rStar-Math's Q; in a
  terminal-guided tree, the mean of the +1 / -1 outcomes of the answers found below it).
* A trajectory = the path from the root (exclusive) to a graded answer terminal (`correct` 0 or 1); its steps
  are the node texts (a code terminal's text includes its `<output>` observation, as the policy saw it).
  Answers the search did not grade (inference-mode trees) make no trajectory. Invalid nodes are leaves, so no
  trajectory passes through one (rStar-Math prunes them).
* A problem's trajectory accuracy = correct trajectories / all trajectories.
* Ranking: best first = highest mean step Q, ties to the higher min step Q, then to node order (worst first
  is the reverse ranking, ties to node order). Means are `math.fsum` sums, so equal Q multisets tie exactly.

SFT (rStar-Math, policy SFT data): per problem the top `top` (2) correct trajectories, best first, as
{prompt: build_prompt(question), response: the concatenated step texts}, the zero-shot format of
`data/reference_sft.py`. `min_accuracy` > 0 drops problems whose trajectory accuracy is below it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from rstar_jax.math.steps import StepKind, build_prompt
from rstar_jax.search.tree import Tree
from rstar_jax.search.tree_io import SavedTree


@dataclasses.dataclass(frozen=True)
class Trajectory:
    leaf: int  # node id of the answer terminal
    nodes: tuple[int, ...]  # node ids, root (exclusive) to leaf
    steps: tuple[str, ...]  # node texts
    q: tuple[float, ...]  # Q of each step
    correct: bool

    @property
    def mean_q(self) -> float:
        return math.fsum(self.q) / len(self.q)

    @property
    def min_q(self) -> float:
        return min(self.q)

    @property
    def text(self) -> str:
        return "".join(self.steps)


def question_of(saved: SavedTree) -> str:
    return saved.meta["problem"]["question"]


def path_nodes(saved: SavedTree, node: int) -> tuple[int, ...]:
    """Node ids from the root (exclusive) down to `node`."""
    parent_N = saved.arrays["parent"]
    path = []
    while node > Tree.ROOT:
        path.append(node)
        node = int(parent_N[node])
    return tuple(reversed(path))


def graded_answers(saved: SavedTree) -> list[int]:
    """Answer terminals with a known outcome, in node order."""
    correct_N = saved.arrays["correct"]
    return [i for i, n in enumerate(saved.nodes)
            if n["kind"] == StepKind.ANSWER_TERMINAL.value and correct_N[i] != Tree.UNKNOWN]


def trajectories(saved: SavedTree) -> list[Trajectory]:
    """Every trajectory of the tree, in node order of the leaves."""
    q_N, correct_N = saved.arrays["value"], saved.arrays["correct"]
    out = []
    for leaf in graded_answers(saved):
        nodes = path_nodes(saved, leaf)
        out.append(Trajectory(leaf, nodes, tuple(saved.nodes[i]["text"] for i in nodes),
                              tuple(float(q_N[i]) for i in nodes), bool(correct_N[leaf] == Tree.CORRECT)))
    return out


def best_first(trajs: list[Trajectory]) -> list[Trajectory]:
    return sorted(trajs, key=lambda t: (-t.mean_q, -t.min_q, t.leaf))


def worst_first(trajs: list[Trajectory]) -> list[Trajectory]:
    return sorted(trajs, key=lambda t: (t.mean_q, t.min_q, t.leaf))


def outcomes_below(saved: SavedTree) -> tuple[np.ndarray, np.ndarray]:
    """([N] bool, [N] bool): the node's subtree (itself included) holds a correct / a wrong graded answer."""
    correct_N = saved.arrays["correct"]
    has_correct_N = np.zeros(saved.num_nodes, bool)
    has_wrong_N = np.zeros(saved.num_nodes, bool)
    for leaf in graded_answers(saved):
        mark_N = has_correct_N if correct_N[leaf] == Tree.CORRECT else has_wrong_N
        mark_N[[Tree.ROOT, *path_nodes(saved, leaf)]] = True
    return has_correct_N, has_wrong_N


def accuracy(trajs: list[Trajectory]) -> float:
    return sum(t.correct for t in trajs) / len(trajs) if trajs else 0.0


def sft_records(saved: SavedTree, top: int = 2, min_accuracy: float = 0.0) -> tuple[list[dict[str, Any]], str | None]:
    """(SFT records of one problem, None) or ([], why the problem is dropped: no_answers | low_accuracy |
    no_correct)."""
    trajs = trajectories(saved)
    if not trajs:
        return [], "no_answers"
    acc = accuracy(trajs)
    if acc < min_accuracy:
        return [], "low_accuracy"
    chosen = best_first([t for t in trajs if t.correct])[:top]
    if not chosen:
        return [], "no_correct"
    prompt = build_prompt(question_of(saved))
    return [{"prompt": prompt, "response": t.text, "id": saved.meta["problem"]["id"], "leaf": t.leaf,
             "mean_q": t.mean_q, "min_q": t.min_q, "accuracy": acc} for t in chosen], None
